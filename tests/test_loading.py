"""Images are decoded per batch through a DataLoader: same batches in the same order with or without worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvit_bench.data.llava_format import DataError
from cvit_bench.data.loading import with_images
from cvit_bench.data.samples import Sample, Turn


def sample(path: Path, shots: tuple[Path, ...] = ()) -> Sample:
    turns = tuple(Turn(p, "q", "a") for p in shots) + (Turn(path, "q"),)
    return Sample(path.stem, "t", turns, "a", "a", ("a",), (), (), "short", "p", "{question}")


@pytest.fixture
def images(tmp_path) -> list[Path]:
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (30 * i, 0, 0)).save(paths[-1])
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_comes_with_its_images_in_order(images, workers):
    batches = [[sample(images[0]), sample(images[1], shots=(images[2],))], [sample(images[3])], [sample(images[i]) for i in (4, 5, 6)]]
    loaded = list(with_images(batches, workers))
    assert [chunk for chunk, _ in loaded] == batches
    reds = [[int(np.asarray(image)[0, 0, 0]) for image in decoded] for _, decoded in loaded]
    assert reds == [[0, 60, 30], [90], [120, 150, 180]]  # each sample's shots first, then its question's image


def test_an_unreadable_image_fails_with_its_path(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        list(with_images([[sample(broken)]], 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_random_state_alone(images, workers):
    """Results must not depend on how images are loaded: adapter initialisation and dropout draw from the global RNG."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(with_images([[sample(images[0])]], workers))
    assert torch.equal(torch.rand(3), expected)
