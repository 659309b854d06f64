"""Targets of the supervised vision-tower stage come straight from the generator's scene metadata."""
from __future__ import annotations

import torch

from cvit_bench.models.vision_pretrain import ALPHABET, scene_targets
from cvit_bench.suites import synthetic


def test_scene_targets_encode_shapes_colours_background_count_and_glyphs():
    shapes = [{"name": "star", "colour": "red"}, {"name": "ring", "colour": "red"}]
    with_shapes = {"shapes": shapes, "background": "forest", "word": ""}
    with_word = {"shapes": [], "background": "white", "word": "cat"}
    targets = scene_targets([with_shapes, with_word])
    shape_names, colour_names = synthetic.shape_names(), synthetic.colour_names()
    assert targets["shape"][0].nonzero().flatten().tolist() == sorted([shape_names.index("star"), shape_names.index("ring")])
    assert targets["colour"][0].tolist() == [float(c == "red") for c in colour_names]
    assert targets["shape"][1].sum() == 0
    assert targets["count"].tolist() == [2, 0]
    assert targets["glyphs"][0].tolist() == [-100, -100, -100]
    assert targets["glyphs"][1].tolist() == [ALPHABET.index("c"), ALPHABET.index("a"), ALPHABET.index("t")]
    assert targets["background"][0] != targets["background"][1]
    assert targets["background"].dtype == torch.long


def test_vision_scenes_are_deterministic_pictures_of_the_pretraining_mix():
    scenes = synthetic.vision_scenes(14, seed=3)
    assert scenes == synthetic.vision_scenes(14, seed=3)
    assert scenes != synthetic.vision_scenes(14, seed=4)
    assert all(scene.shapes or scene.word for scene in scenes)  # no blank format-practice canvases
