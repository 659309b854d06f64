"""Batch streams for training: endless, reshuffled each epoch, deterministic per seed string."""
from __future__ import annotations

import random
from typing import Iterator, TypeVar

T = TypeVar("T")


def shuffled_batches(samples: list[T], batch_size: int, seed: str) -> Iterator[list[T]]:
    """Endless reshuffled epochs of ``samples``; an epoch's tail joins the next epoch's head, so every batch is full."""
    if not samples:
        raise ValueError("no samples to train on")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            extra = list(range(len(samples)))
            rng.shuffle(extra)
            order.extend(extra)
        yield [samples[i] for i in order[:batch_size]]
        del order[:batch_size]
