"""Batched greedy generation with KV cache, length-bucketed so padding stays small."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import Sample


@dataclass(frozen=True)
class Lockstep:
    """Run exactly ``batches`` generate calls, each until every process is done (``synced_gpus``).

    Needed when weights are sharded (FSDP): every forward gathers them collectively, so a process
    whose replies are finished must keep stepping with the others. A process with fewer samples
    splits them into smaller batches; one with none generates for ``filler`` (the set's first
    sample) and drops the reply.
    """

    batches: int
    filler: Sample


def generate(
    model: nn.Module,
    collator: Collator,
    samples: list[Sample],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
    batch_context: Callable[[list[Sample], dict], ContextManager] | None = None,
    lockstep: Lockstep | None = None,
) -> tuple[list[str], int]:
    """Greedy replies for ``samples`` (in input order) and the number of generated tokens.

    ``batch_context(samples, batch)`` wraps each ``generate`` call (a method's per-batch routing).
    """
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].turns), len(collator.prompt_text(samples[i]))))
    replies: list[str] = [""] * len(samples)
    generated_tokens = 0
    tokenizer = collator.tokenizer
    synced = {}
    if lockstep is None:
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:  # exactly `batches` calls of near-equal size (none above batch_size); an empty one generates for the filler
        synced = {"synced_gpus": True}
        n = lockstep.batches
        chunks = [order[i * len(order) // n : (i + 1) * len(order) // n] for i in range(n)]
    batches = [[samples[i] for i in indices] or [lockstep.filler] for indices in chunks]
    # FSDP gathers sharded weights into buffers that training reuses, which inference tensors cannot be.
    with torch.no_grad() if lockstep is not None else torch.inference_mode():
        for indices, (chunk, images) in zip(chunks, collator.with_images(batches)):
            batch = collator.generation_batch(chunk, images)
            with (batch_context or _no_context)(chunk, batch):
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, **synced)
            if not indices:
                continue
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            finished = new_tokens != tokenizer.pad_token_id
            generated_tokens += int(finished.sum())
            for index, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                replies[index] = text.strip()
            if on_batch is not None:
                on_batch(len(indices), len(samples))
    return replies, generated_tokens


def _no_context(samples: list[Sample], batch: dict) -> ContextManager:
    return contextlib.nullcontext()
