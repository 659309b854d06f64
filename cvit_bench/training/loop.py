"""The training loop: the only one in the project. Methods change it only through hooks.

    cvit-bench run --suite cvit-v1 --method seqlora

Each stage: batch -> (method.batch_context) forward -> CE loss (+ method.extra_loss) ->
backward -> method.after_backward -> clip -> step -> method.after_optimizer_step -> zero grads.
Loss is read back to the host only every ``log_every`` steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import Sample
from cvit_bench.distributed import Processes
from cvit_bench.registry import ConfigError
from cvit_bench.suites.schema import TrainingConfig


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf loss; the stage is abandoned and the previous checkpoint kept."""


@dataclass
class StageLog:
    steps: int
    final_loss: float
    seconds: float
    samples_per_s: float


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10% — the LLaVA fine-tuning schedule, scaled."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: nn.Module, method, config: TrainingConfig, steps: int):
    """AdamW over the method's parameter groups and the warm-up + cosine schedule; also returns the trained tensors."""
    optimizer = torch.optim.AdamW(method.parameter_groups(model, config.lr), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, steps))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in trainable):
        raise ConfigError(f"{method.name} trains a weight that FSDP sharded; only weights trainable when the model is "
                          "wrapped are kept whole -- run this method without --use_fsdp")
    return optimizer, scheduler, trainable


def train_step(model: nn.Module, method, chunk: list[Sample], batch: dict[str, torch.Tensor], optimizer, scheduler, trainable,
               max_grad_norm: float, processes: Processes = Processes()) -> torch.Tensor:
    """One optimizer step with every method hook; returns the loss without reading it back to the host.

    With several processes the back-propagated loss is weighted by this process's share of the
    batch's answer tokens and the gradients are averaged before any method sees them.
    """
    with method.batch_context(chunk, batch):
        outputs = model(**batch)
        loss = outputs.loss
        extra = method.extra_loss(batch, outputs)
        if extra is not None:
            loss = loss + extra
    weight = processes.loss_weight(batch["labels"])
    (loss if weight is None else loss * weight).backward()
    processes.average_gradients(trainable)
    method.after_backward(model)
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    method.after_optimizer_step(model)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach() if weight is None else loss.detach() * weight / processes.count


def train_stage(
    model: nn.Module,
    method,
    samples: list[Sample],
    collator: Collator,
    config: TrainingConfig,
    *,
    steps: int,
    seed: str,
    report: Callable[[int, float, float], None] | None = None,
    log_every: int = 10,
    processes: Processes = Processes(),
) -> StageLog:
    """Train ``steps`` optimizer steps on ``samples``; returns loss and throughput.

    With several processes each trains on its share of every batch (see cvit_bench.distributed);
    the logged loss is the global batch's.
    """
    model.train()
    optimizer, scheduler, trainable = make_optimizer(model, method, config, steps)
    batches = method.training_batches(samples, config.batch_size, seed)
    window_loss = torch.zeros((), device=processes.device)
    last_loss, start, window_start = float("nan"), time.perf_counter(), time.perf_counter()
    chunks = [processes.share(next(batches)) for _ in range(steps)]  # drawn ahead, so a DataLoader can decode ahead
    for step, (chunk, images) in enumerate(collator.with_images(chunks), start=1):
        window_loss += train_step(model, method, chunk, collator.train_batch(chunk, images), optimizer, scheduler, trainable,
                                  config.max_grad_norm, processes)
        if step % log_every == 0 or step == steps:
            window = step % log_every or log_every
            last_loss = processes.sum(window_loss).item() / window
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(f"loss became {last_loss} by step {step}; stage abandoned")
            if report is not None:
                now = time.perf_counter()
                report(step, last_loss, window * config.batch_size / (now - window_start))
                window_start = now
            window_loss.zero_()
    seconds = time.perf_counter() - start
    model.eval()
    return StageLog(steps, last_loss, seconds, steps * config.batch_size / max(seconds, 1e-9))
