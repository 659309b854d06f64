"""Experience replay: a fixed-size memory of earlier tasks' samples, a set share of every batch.

The adapter is seqlora's; only the data changes. The memory is filled after each task, by
reservoir sampling over every training sample seen so far or by an equal quota per task, and
each training batch takes ``round(fraction * batch_size)`` samples from it (none while it is
empty), so the fraction holds batch by batch, not only on average.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.ranges import AT_LEAST_ONE, FRACTION
from cvit_bench.training.batches import shuffled_batches

POLICIES = ("reservoir", "quota")


@dataclass(frozen=True)
class ReplayConfig(LoraMethodConfig):
    memory_size: int = option(240, "samples kept from earlier tasks (cvit-v1: 40 per task after six tasks, 6.7% of their data)", AT_LEAST_ONE)
    fraction: float = option(0.25, "share of every training batch drawn from the memory once it holds samples (at least 1, at most batch-1)", FRACTION)
    policy: str = option("reservoir", "reservoir: uniform over all samples seen; quota: memory_size split evenly over the tasks so far")

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"replay policy {self.policy!r}: expected one of {POLICIES}")
        if not 0 <= self.fraction < 1:
            raise ValueError(f"replay fraction {self.fraction}: expected 0 <= fraction < 1")
        if self.memory_size < 1:
            raise ValueError(f"replay memory_size {self.memory_size}: expected at least 1")


@METHODS.register("replay")
class Replay(Method):
    """LoRA trained on each task with a fixed-size memory of earlier tasks mixed into every batch."""

    name = "replay"
    config_class = ReplayConfig

    def __init__(self, config: ReplayConfig | None = None) -> None:
        super().__init__(config)
        self.memory: list[Sample] = []
        self.seen = 0  # training samples offered to the reservoir so far

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        return attach_lora(model, self.config)

    def replayed_per_batch(self, batch_size: int) -> int:
        """round(fraction * batch), but at least one old and one new sample whenever both are wanted."""
        if not self.memory or self.config.fraction == 0 or batch_size < 2:
            return 0
        return min(max(round(self.config.fraction * batch_size), 1), batch_size - 1)

    def training_batches(self, samples: list[Sample], batch_size: int, seed: str) -> Iterator[list[Sample]]:
        replayed = self.replayed_per_batch(batch_size)
        if not replayed:
            return shuffled_batches(samples, batch_size, seed)
        return (new + old for new, old in zip(
            shuffled_batches(samples, batch_size - replayed, seed),
            shuffled_batches(self.memory, replayed, f"{seed}-memory"),
        ))

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict:
        rng = random.Random(f"{torch.initial_seed()}-replay-{stage}")
        if self.config.policy == "reservoir":
            for sample in samples:
                self.seen += 1
                if len(self.memory) < self.config.memory_size:
                    self.memory.append(sample)
                else:
                    slot = rng.randrange(self.seen)
                    if slot < self.config.memory_size:
                        self.memory[slot] = sample
        else:
            by_task: dict[str, list[Sample]] = {}
            for sample in self.memory:
                by_task.setdefault(sample.task, []).append(sample)
            for sample in rng.sample(samples, len(samples)):
                by_task.setdefault(sample.task, []).append(sample)
            quota, extra = divmod(self.config.memory_size, len(by_task))  # the first `extra` tasks keep one more
            self.memory = [sample for i, kept in enumerate(by_task.values()) for sample in kept[: quota + (i < extra)]]
        return {"memory_per_task": dict(Counter(sample.task for sample in self.memory))}

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        memory = json.dumps([sample.to_json() for sample in self.memory]).encode()
        return {"memory": torch.tensor(list(memory), dtype=torch.uint8), "seen": torch.tensor(self.seen)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.memory = [Sample.from_json(fields) for fields in json.loads(state["memory"].numpy().tobytes())]
        self.seen = int(state["seen"])
