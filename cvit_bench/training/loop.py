"""The training loop: the only one in the project. Methods change it only through hooks.

    cvit-bench run --suite cvit-v1 --method seqlora

Each stage: batch -> per micro-batch (``--grad-accum``): (method.batch_context, autocast) forward ->
CE loss (+ method.extra_loss) -> backward; then method.after_backward -> clip -> step ->
method.after_optimizer_step -> zero grads.
Loss is read back to the host only every ``log_every`` steps.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

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


MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """accelerate's ``--mixed_precision``: weights stay as loaded, forwards run under autocast in ``mode``'s dtype.

    ``fp16`` also scales the loss (its gradients underflow otherwise); ``no`` leaves everything as it is,
    so a run without mixed precision computes exactly what it did before the option existed.
    """

    mode: str = "no"

    def __post_init__(self) -> None:
        if self.mode not in MIXED_PRECISION:
            raise ConfigError(f"--mixed-precision {self.mode!r}: expected one of {', '.join(MIXED_PRECISION)}")

    def autocast(self, device: torch.device) -> ContextManager:
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=MIXED_PRECISION[self.mode])

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """The loss scaler fp16 needs; None otherwise."""
        return torch.amp.GradScaler(device.type) if self.mode == "fp16" else None


def precision_for(weights: torch.dtype, mixed_precision: str) -> Precision:
    """The run's precision: fp16 weights always train under fp16 autocast with loss scaling (see :func:`fp32_trained_weights`)."""
    return Precision("fp16" if weights == torch.float16 and mixed_precision == "no" else mixed_precision)


def fp32_trained_weights(model: nn.Module) -> None:
    """Trainable fp16 weights (a projector, a full fine-tune) become fp32 master weights, as every fp16 trainer keeps them:
    AdamW's epsilon and small updates vanish in fp16 and the loss turns NaN within steps. Autocast computes in fp16."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.float16:
            parameter.data = parameter.data.float()


def micro_batches(chunk: list[Sample], grad_accum: int) -> list[list[Sample]]:
    """``chunk`` in ``grad_accum`` contiguous parts whose sizes differ by at most one (every part non-empty)."""
    if len(chunk) < grad_accum:
        raise ConfigError(f"--grad-accum {grad_accum}: a process's share of the batch holds only {len(chunk)} samples; "
                          "lower --grad-accum or raise --batch-size")
    size, extra = divmod(len(chunk), grad_accum)
    bounds = [i * size + min(i, extra) for i in range(grad_accum + 1)]
    return [chunk[start:end] for start, end in zip(bounds, bounds[1:])]


def _split_images(parts: list[list[Sample]], images: list) -> list[tuple[list[Sample], list]]:
    """Each micro-batch with its own images (a batch's images come one per turn, in sample order)."""
    paired, start = [], 0
    for part in parts:
        count = sum(len(sample.turns) for sample in part)
        paired.append((part, images[start : start + count]))
        start += count
    return paired


def train_step(model: nn.Module, method, micro: list[tuple[list[Sample], dict[str, torch.Tensor]]], optimizer, scheduler, trainable,
               max_grad_norm: float, processes: Processes = Processes(), precision: Precision = Precision(),
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimizer step over the (samples, batch) micro-batches of this process, with every method hook; returns the
    loss without reading it back to the host.

    Gradients of the micro-batches accumulate; each back-propagated loss is weighted by its share of the answer tokens of
    the whole step (all micro-batches of all processes), and the gradients are averaged over processes before any method
    sees them, so the step equals one forward of the whole batch (mean over all its answer tokens) up to summation order.
    """
    weights: list[torch.Tensor | None] = [None] * len(micro)  # one forward of the whole batch needs no weight
    if len(micro) > 1 or processes.distributed:
        tokens = torch.stack([(batch["labels"] != -100).sum().to(torch.float32) for _, batch in micro])
        weights = list(tokens * processes.count / processes.sum(tokens.sum()))
    logged = torch.zeros((), device=processes.device)
    for (chunk, batch), weight in zip(micro, weights):
        with precision.autocast(processes.device), method.batch_context(chunk, batch):
            outputs = model(**batch)
            loss = outputs.loss
            extra = method.extra_loss(batch, outputs)
            if extra is not None:
                loss = loss + extra
        weighted = loss if weight is None else loss * weight
        (weighted if scaler is None else scaler.scale(weighted)).backward()
        logged += loss.detach().float() if weight is None else loss.detach().float() * weight / processes.count
    processes.average_gradients(trainable)
    if scaler is not None:
        scaler.unscale_(optimizer)  # methods edit true gradients
    method.after_backward(model)
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    method.after_optimizer_step(model)
    optimizer.zero_grad(set_to_none=True)
    return logged


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
    grad_accum: int = 1,
    precision: Precision = Precision(),
    track: Callable[[int, float, list[float]], None] | None = None,
) -> StageLog:
    """Train ``steps`` optimizer steps on ``samples``; returns loss and throughput.

    With several processes each trains on its share of every batch (see cvit_bench.distributed), in
    ``grad_accum`` forwards; the logged loss is the global batch's. ``track(step, loss, learning_rates)``, when given,
    receives every step's loss (read back each step, which costs a host sync per step) and the rates the step used;
    under several processes every process must pass one (the loss is summed across them).
    """
    model.train()
    optimizer, scheduler, trainable = make_optimizer(model, method, config, steps)
    scaler = precision.scaler(processes.device)
    batches = method.training_batches(samples, config.batch_size, seed)
    window_loss = torch.zeros((), device=processes.device)
    last_loss, start, window_start = float("nan"), time.perf_counter(), time.perf_counter()
    chunks = [processes.share(next(batches)) for _ in range(steps)]  # drawn ahead, so a DataLoader can decode ahead
    for step, (chunk, images) in enumerate(collator.with_images(chunks), start=1):
        micro = [(part, collator.train_batch(part, part_images)) for part, part_images in _split_images(micro_batches(chunk, grad_accum), images)]
        learning_rates = [group["lr"] for group in optimizer.param_groups]
        loss = train_step(model, method, micro, optimizer, scheduler, trainable, config.max_grad_norm, processes, precision, scaler)
        window_loss += loss
        if track is not None:
            track(step, processes.sum(loss).item(), learning_rates)
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
