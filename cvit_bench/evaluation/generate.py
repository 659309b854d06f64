"""Batched greedy generation with KV cache, length-bucketed so padding stays small."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import Sample


def generate(
    model: nn.Module,
    collator: Collator,
    samples: list[Sample],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
    batch_context: Callable[[list[Sample], dict], ContextManager] | None = None,
) -> tuple[list[str], int]:
    """Greedy replies for ``samples`` (in input order) and the number of generated tokens.

    ``batch_context(samples, batch)`` wraps each ``generate`` call (a method's per-batch routing).
    """
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].turns), len(collator.prompt_text(samples[i]))))
    replies: list[str] = [""] * len(samples)
    generated_tokens = 0
    tokenizer = collator.tokenizer
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = [[samples[i] for i in indices] for indices in chunks]
    with torch.inference_mode():
        for indices, (chunk, images) in zip(chunks, collator.with_images(batches)):
            batch = collator.generation_batch(chunk, images)
            with (batch_context or _no_context)(chunk, batch):
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
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
