"""The cvit-v1 generator must be reproducible to the byte, keep splits disjoint and emit valid LLaVA records."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from cvit_bench.suites import synthetic
from cvit_bench.suites.schema import TEMPLATES_DIR
from cvit_bench.suites.synthetic import (
    TASK_KINDS, colour_names, generate_task, place_names, shape_names, words,
)

SIZES = {"train": 30, "test": 14}
SEED = 7
VQA_STYLE = ("ocr", "vqa", "unanswerable")
CAPTION_STYLE = ("caption", "textcap")
NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for kind in TASK_KINDS:
        generate_task(kind, SIZES, seed=SEED, out_dir=root / kind)
    return root


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _records(directory: Path, split: str = "train") -> list[dict]:
    return json.loads((directory / f"{split}.json").read_text())


def _all_records(directory: Path) -> list[dict]:
    return [r for split in SIZES for r in _records(directory, split)]


def _normalize(answer: str) -> str:
    """Enough of the official VQA normalization for the variants the generator emits."""
    text = answer.lower().strip().rstrip(".")
    return NUMBERS.get(text, text)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_same_seed_gives_byte_identical_files(generated: Path, tmp_path: Path, kind: str) -> None:
    paths = generate_task(kind, SIZES, seed=SEED, out_dir=tmp_path)
    assert paths == {split: tmp_path / f"{split}.json" for split in SIZES}
    assert _digests(tmp_path) == _digests(generated / kind)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_different_seed_gives_different_content(generated: Path, tmp_path: Path, kind: str) -> None:
    generate_task(kind, SIZES, seed=SEED + 1, out_dir=tmp_path)
    ours, theirs = _digests(tmp_path), _digests(generated / kind)
    assert ours.keys() == theirs.keys()
    assert sum(ours[name] != theirs[name] for name in ours) > 0.9 * len(ours)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_train_and_test_never_share_a_scene(generated: Path, kind: str) -> None:
    train = {r["meta"]["scene_key"] for r in _records(generated / kind, "train")}
    test = {r["meta"]["scene_key"] for r in _records(generated / kind, "test")}
    assert not train & test


def _tiny_ocr(word_pool: tuple[str, ...]) -> synthetic.Builder:
    """A builder with only len(word_pool) possible scenes, to force collisions across splits."""
    def build(rng, index):
        word = rng.choice(word_pool)
        scene = synthetic.Scene(background="white", word=word, glyph_top=21, glyph_height=21,
                                glyph_jitter=(0, 0, 0), ink="black")
        return synthetic.Sample(scene, "What word is written in the image?", word, [word])
    return build


def test_scenes_seen_in_an_earlier_split_are_redrawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(synthetic._BUILDERS, "ocr", _tiny_ocr(words()[:12]))
    generate_task("ocr", {"train": 6, "test": 20}, seed=0, out_dir=tmp_path)
    train = {r["answer"] for r in _records(tmp_path, "train")}
    test = {r["answer"] for r in _records(tmp_path, "test")}
    assert train and test and not train & test


def test_exhausted_scene_space_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(synthetic._BUILDERS, "ocr", _tiny_ocr(words()[:3]))
    with pytest.raises(RuntimeError, match="too large"):
        generate_task("ocr", {"train": 30, "test": 1}, seed=0, out_dir=tmp_path)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_records_are_valid_llava(generated: Path, kind: str) -> None:
    for split, count in SIZES.items():
        records = _records(generated / kind, split)
        assert len(records) == count
        for index, record in enumerate(records):
            assert record["id"] == f"{kind}-{split}-{index:05d}"
            assert record["image"] == f"images/{split}/{index:05d}.png"
            with Image.open(generated / kind / record["image"]) as image:
                assert (image.size, image.mode) == ((64, 64), "RGB")
            assert record["conversations"] == [
                {"from": "human", "value": "<image>\n" + record["question"]},
                {"from": "gpt", "value": record["answer"]},
            ]
            assert record["answer"] and record["meta"]["background"]
            if kind not in VQA_STYLE + CAPTION_STYLE:
                assert record["answers"] == [record["answer"]]


@pytest.mark.parametrize("kind", VQA_STYLE)
def test_vqa_style_kinds_have_ten_mostly_agreeing_annotators(generated: Path, kind: str) -> None:
    for record in _all_records(generated / kind):
        assert len(record["answers"]) == 10
        agreeing = sum(_normalize(a) == record["answer"] for a in record["answers"])
        assert agreeing >= 6 or record["answer"] == "unanswerable" and agreeing >= 9


def test_annotators_vary_realistically(generated: Path) -> None:
    answers = [a for r in _all_records(generated / "vqa") for a in r["answers"]]
    assert any(a in NUMBERS or a.endswith(".") or a[0].isupper() for a in answers)


@pytest.mark.parametrize("kind", CAPTION_STYLE)
def test_captions_are_five_sentences(generated: Path, kind: str) -> None:
    for record in _all_records(generated / kind):
        assert len(record["answers"]) == 5 and record["answer"] == record["answers"][0]
        for caption in record["answers"]:
            assert caption.endswith(".") and caption == caption.lower() and len(caption.split()) > 4
            if kind == "textcap":
                assert record["meta"]["word"] in caption.split() or f"{record['meta']['word']}." in caption


def test_mcq_letter_indexes_the_correct_option(generated: Path) -> None:
    for record in _all_records(generated / "mcq"):
        options, shapes = record["options"], record["meta"]["shapes"]
        assert len(set(options)) == 4
        assert record["question"].endswith("".join(f"\n{t}. {o}" for t, o in zip("ABCD", options)))
        chosen = options["ABCD".index(record["answer"])]
        asked = re.match(r"What is the colour of the (\w+)\?|Which shape is (\w+)\?", record["question"])
        if asked[1]:
            assert chosen == next(s["colour"] for s in shapes if s["name"] == asked[1])
        else:
            assert chosen == next(s["name"] for s in shapes if s["colour"] == asked[2])


def test_ground_boxes_are_normalized_and_match_the_answer(generated: Path) -> None:
    for record in _all_records(generated / "ground"):
        x1, y1, x2, y2 = box = record["box"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert record["answer"] == "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
        target = record["meta"]["shapes"][record["meta"]["target"]]
        assert record["question"] == f"Give the bounding box of the {target['colour']} {target['name']}."


def test_unanswerable_is_about_half_and_only_on_degraded_images(generated: Path) -> None:
    records = _all_records(generated / "unanswerable")
    degraded = [r["meta"]["degradation"] != "none" for r in records]
    assert [r["answer"] == "unanswerable" for r in records] == degraded
    assert 0.35 <= sum(degraded) / len(records) <= 0.65


@pytest.mark.parametrize(("kind", "vocabulary"), [
    ("ocr", words()), ("classify", shape_names()), ("scene", place_names()),
    ("relation", shape_names() + colour_names()),
])
def test_short_answers_come_from_the_vocabulary(generated: Path, kind: str, vocabulary: tuple[str, ...]) -> None:
    assert {r["answer"] for r in _all_records(generated / kind)} <= set(vocabulary)


def test_pretrain_covers_every_skill_and_no_task_phrasing(generated: Path) -> None:
    records = _all_records(generated / "pretrain")
    assert {r["meta"]["skill"] for r in records} == {
        "shape", "colour", "count", "position", "read", "place", "describe", "format"}
    assert {r["meta"]["background"] in place_names() for r in records} == {True, False}
    visual = [r for r in records if r["meta"]["skill"] != "format"]
    assert all(r["answer"][0].isupper() and r["answer"].endswith(".") for r in visual)
    template_text = "".join(p.read_text() for p in TEMPLATES_DIR.glob("*.yaml"))
    for record in records:  # pretraining never uses a task instruction's wording
        assert record["question"].splitlines()[-1] not in template_text


def test_image_size_changes_resolution_not_content(tmp_path: Path) -> None:
    small = generate_task("textcap", {"train": 3}, seed=SEED, out_dir=tmp_path / "small")["train"]
    large = generate_task("textcap", {"train": 3}, seed=SEED, out_dir=tmp_path / "large", image_size=128)["train"]
    assert json.loads(small.read_text()) == json.loads(large.read_text())
    with Image.open(tmp_path / "large" / "images" / "train" / "00000.png") as image:
        assert image.size == (128, 128)


def test_unknown_kind_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid kinds: pretrain, mcq"):
        generate_task("nope", {"train": 1}, seed=0, out_dir=tmp_path)


def test_vocabularies() -> None:
    assert len(colour_names()) == 6 and len(shape_names()) == 8 and len(place_names()) == 6
    assert len(set(words())) == 40 and all(len(w) == 3 and w.isalpha() and w.islower() for w in words())
