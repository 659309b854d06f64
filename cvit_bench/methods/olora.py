"""O-LoRA: one LoRA slice per task, kept orthogonal to the earlier slices; inference sums all slices.

The slices of one layer are the experts of a :class:`MixtureLoraLinear` whose gates are
1 for every slice learned so far (and the current one) and 0 for later ones, so the
sum is one batched matmul. Old slices are frozen bit-exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import MixtureLoraLinear, SliceFreezer, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE


@dataclass(frozen=True)
class OLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of the current slice and the projector (as seqlora)", POSITIVE)
    rank: int = option(8, "rank of each task's slice (seqlora's 8; the O-LoRA paper uses 8 per task)", AT_LEAST_ONE)
    alpha: float = option(16.0, "scaling alpha / rank = 2, as seqlora", POSITIVE)
    orthogonality: float = option(0.5, "lambda_1 of sum_{s<t} |A_t A_s^T|_1 (paper's code: 0.5; some reproductions use 0.05)", NON_NEGATIVE)
    train_projector: bool = option(True, "train the projector fully, as LLaVA LoRA tuning does")


class SliceGates(nn.Module):
    """Constant gates: 1 for active slices, 0 for slices of tasks not reached yet."""

    def __init__(self, n_slices: int) -> None:
        super().__init__()
        self.register_buffer("active", torch.zeros(n_slices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active


@METHODS.register("olora")
class OLora(Method):
    """Per-task LoRA slices with an orthogonality loss against earlier slices; inference on their sum."""

    name = "olora"
    config_class = OLoraConfig

    def __init__(self, config: OLoraConfig | None = None) -> None:
        super().__init__(config)
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.freezer = SliceFreezer()
        self.current = 0
        self.orthogonality_trace: list[torch.Tensor] = []

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        self.layers = inject_mixture(
            model,
            module_map_for(model).llm_linears,
            lambda name, base: MixtureLoraLinear(base, len(tasks), c.rank, c.alpha / c.rank, SliceGates(len(tasks))),
        )
        set_trainable(model, self.layers, c.train_projector)
        return model

    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.current = stage - 1
        self.orthogonality_trace = []
        for layer in self.layers.values():
            layer.router.active[: stage] = 1
            if self.current:
                self.freezer.freeze(layer.lora_A, torch.arange(self.current))
                self.freezer.freeze(layer.lora_B, torch.arange(self.current))

    def orthogonality_loss(self) -> torch.Tensor:
        """sum over layers and earlier slices s of |A_t A_s^T|_1 (entrywise L1)."""
        t = self.current
        total = sum((torch.einsum("rd,esd->ers", layer.lora_A[t], layer.lora_A[:t]).abs().sum() for layer in self.layers.values()))
        return torch.as_tensor(total)

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        if self.current == 0:
            return None
        loss = self.orthogonality_loss()
        self.orthogonality_trace.append(loss.detach())
        return self.config.orthogonality * loss

    def after_backward(self, model: nn.Module) -> None:
        self.freezer.zero_grads()

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.freezer.restore()

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        if not self.orthogonality_trace:
            return {}
        trace = torch.stack(self.orthogonality_trace)
        return {"orthogonality_first": float(trace[0]), "orthogonality_last": float(trace[-1])}
