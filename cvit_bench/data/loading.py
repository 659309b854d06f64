"""Images decoded per batch through a torch DataLoader, in worker processes when asked.

Training and generation know their batches before they start (a stage's batch stream is
deterministic, generation's length-sorted chunks too), so each batch is an item of a
map-style dataset. A DataLoader decodes the images of the next batches while the model works
on this one; no decoded image outlives its batch, so host memory stays flat however many
images a task has.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cvit_bench.data.samples import Sample, load_image


class BatchImages(Dataset):
    """Item k: the decoded images of batch k, in the order the collator feeds them (each sample's turns in turn)."""

    def __init__(self, batches: Sequence[Sequence[Sample]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Image.Image]:
        return [load_image(turn.image) for sample in self.batches[index] for turn in sample.turns]


def _as_is(images: list[Image.Image]) -> list[Image.Image]:
    """The DataLoader's per-item conversion: PIL images pass through (a module function, so workers can pickle it)."""
    return images


def with_images(batches: Sequence[Sequence[Sample]], workers: int = 0) -> Iterator[tuple[Sequence[Sample], list[Image.Image]]]:
    """Each batch with its decoded images, in order; ``workers`` > 0 decodes ahead in that many processes."""
    # Its own generator: a DataLoader draws its workers' base seed from the global torch RNG otherwise, which would
    # shift every later random draw (adapter initialisation, dropout) and so the results.
    loader = DataLoader(BatchImages(batches), batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                        generator=torch.Generator())
    return zip(batches, loader)
