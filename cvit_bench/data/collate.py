"""Batches for training (answer-only labels) and for generation (left padding), via the model's processor.

The processor does the model-specific work (chat template, image-token expansion,
pixel normalisation), so the same code serves the tiny default and real checkpoints.
Prompt and target are tokenized separately: the model is trained on exactly the
token boundary it will see when generating after the prompt.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cvit_bench.data.loading import with_images
from cvit_bench.data.samples import Sample, load_image

# Processor outputs with one entry per input token (Qwen2-VL marks image tokens in mm_token_type_ids).
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")


def chat_messages(sample: Sample) -> list[dict[str, Any]]:
    """Few-shot turns then the question, in the processor's chat-message format."""
    messages: list[dict[str, Any]] = []
    for turn in sample.turns:
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn.prompt}]})
        if turn.reply:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.reply}]})
    return messages


class Collator:
    """Batches on the model's device; floating-point inputs (pixels) in the model's dtype, as the vision tower expects.

    ``workers``: DataLoader processes that decode the images of the coming batches (``with_images``).
    A batch built without its images decodes them itself (one-off passes: Fisher, routing, bases).
    """

    def __init__(self, processor: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 workers: int = 0) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.workers = workers
        self.device = torch.device(device)
        self.dtype = dtype
        self._prompt_cache: dict[tuple, str] = {}

    def _placed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        placed = {}
        for key, value in batch.items():
            value = torch.as_tensor(value)
            placed[key] = value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
        return placed

    def prompt_text(self, sample: Sample) -> str:
        key = tuple((t.prompt, t.reply) for t in sample.turns)
        text = self._prompt_cache.get(key)
        if text is None:
            text = self.processor.apply_chat_template(chat_messages(sample), add_generation_prompt=True, tokenize=False)
            self._prompt_cache[key] = text
        return text

    def with_images(self, batches: Sequence[list[Sample]]) -> Iterator[tuple[list[Sample], list[Image.Image]]]:
        """Each batch with its images, decoded ahead by ``workers`` processes."""
        return with_images(batches, self.workers)

    def _encode_prompts(self, samples: list[Sample], images: list[Image.Image] | None, **kwargs) -> dict[str, Any]:
        if images is None:
            images = [load_image(turn.image) for s in samples for turn in s.turns]
        return self.processor(images=images, text=[self.prompt_text(s) for s in samples], **kwargs)

    def train_batch(self, samples: list[Sample], images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """input_ids/attention_mask/labels (right padded, loss only on target + EOS) and pixel_values."""
        encoded = self._encode_prompts(samples, images)
        eos = self.tokenizer.eos_token_id
        sequences, label_rows = [], []
        for prompt_ids, sample in zip(encoded["input_ids"], samples):
            target_ids = self.tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [eos]
            sequences.append(list(prompt_ids) + target_ids)
            label_rows.append([-100] * len(prompt_ids) + target_ids)
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (sequence, label_row) in enumerate(zip(sequences, label_rows)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, : len(label_row)] = torch.tensor(label_row)
            attention_mask[row, : len(sequence)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key, value in encoded.items():
            if key in TOKEN_ALIGNED:  # one entry per prompt token; the target tokens are text (0)
                aligned = torch.zeros((len(samples), width), dtype=torch.long)
                for row, entries in enumerate(value):
                    aligned[row, : len(entries)] = torch.as_tensor(np.asarray(entries))
                batch[key] = aligned
            elif key not in ("input_ids", "attention_mask"):
                batch[key] = torch.as_tensor(np.asarray(value))
        return self._placed(batch)

    def generation_batch(self, samples: list[Sample], images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded prompts so every row's generation starts at the same position."""
        self.tokenizer.padding_side = "left"
        return self._placed(self._encode_prompts(samples, images, padding=True, return_tensors="pt"))

    def target_length(self, samples: list[Sample]) -> int:
        """Longest reference reply in tokens (used to bound generation length)."""
        return max(len(self.tokenizer(s.target, add_special_tokens=False)["input_ids"]) for s in samples)
