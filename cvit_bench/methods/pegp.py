"""PEGP (seed 002b): gradient projection (GPM) applied to LoRA.

After each task, the inputs x of every adapted layer and the intermediates h = A x are
collected on that task's data; their covariances grow one orthonormal basis per layer
and side (:class:`~cvit_bench.methods.projection.InputBasis`). On later tasks, A's
gradient is projected off the old-input basis (so A x_old stays fixed) and B's off the
old-intermediate basis (so B A x_old stays fixed), as the authors' ViT code does.

As in the authors' code, the energy of a direction is λ² of the covariance (``energy``;
GPM's λ is the other rule) and one threshold serves both sides (``h_threshold`` sets the
B side apart, a recorded deviation). Only real tokens count: padding positions of the
LLM layers' inputs are left out by the attention mask. Covariances are summed in float32,
a few layers per pass over the data (:data:`COVARIANCE_BUDGET_BYTES`), so a 7B model's
statistics fit next to it.

AdamW rescales each coordinate of the gradient, which would put part of the update back
inside the protected span; ``project_update`` (default on) therefore also projects the
update the optimizer actually made. Adapters cover the LLM linears and the projector
(whose own weights are frozen), so the whole model's output on old inputs is protected
up to the energy threshold.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, forward_passes, option
from cvit_bench.methods.projection import ENERGY_RULES, InputBasis
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, Range

COVARIANCE_BUDGET_BYTES = 4 * 2**30
"""Float32 covariances held at once while the bases grow: layers are visited in groups under this size, one pass over
the basis batches per group (LLaVA-1.5-7B: 0.89 GB per decoder layer, so four layers per pass)."""


@dataclass(frozen=True)
class PegpConfig(LoraMethodConfig):
    threshold: float = option(0.99, "energy kept in each basis per task (the authors' ViT code: 0.99 for LoRA, 0.999 adapters, 0.90 prompts)", Range(0, 1, low_open=True))
    h_threshold: float | None = option(None, "energy kept in the B-side (h = A x) bases; unset = threshold, as the authors' code (set: a recorded deviation)", Range(0, 1, low_open=True))
    energy: str = option("squared", "energy of a direction: 'squared' = λ² of the input covariance (the authors' code), 'eigenvalue' = λ (GPM; a recorded deviation)")
    basis_batches: int = option(8, "batches of 16 of each task's training data whose inputs build the bases", AT_LEAST_ONE)
    project_update: bool = option(True, "also project the optimizer's update (AdamW's per-coordinate scaling leaks into the old span)")

    def __post_init__(self) -> None:
        if self.energy not in ENERGY_RULES:
            raise ValueError(f"energy must be one of {ENERGY_RULES}, not {self.energy!r}")
        for name in ("threshold", "h_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {value}")

    @property
    def b_side_threshold(self) -> float:
        return self.threshold if self.h_threshold is None else self.h_threshold

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' code (recorded with every stage)."""
        found = []
        if self.energy != "squared":
            found.append(f"energy={self.energy}: thresholds λ, not the authors' λ²")
        if self.b_side_threshold != self.threshold:
            found.append(f"h_threshold={self.h_threshold}: the B side has its own threshold (the authors use one for both)")
        return found


@dataclass
class ProtectedLora:
    """One LoRA layer's two factors and the bases their inputs have grown."""

    a: nn.Parameter  # (r, d_in): faces the layer input x
    b: nn.Parameter  # (d_out, r): faces h = A x
    x_basis: InputBasis
    h_basis: InputBasis
    token_rows: bool  # an LLM layer: rows are sequence positions, padding included

    def covariance_bytes(self) -> int:
        return 4 * (self.a.shape[1] ** 2 + self.a.shape[0] ** 2)


def layer_groups(layers: dict[str, ProtectedLora], budget: int) -> list[list[str]]:
    """Consecutive layer names in groups whose float32 covariances stay under ``budget`` bytes (at least one layer each)."""
    groups: list[list[str]] = []
    used = 0
    for name, layer in layers.items():
        size = layer.covariance_bytes()
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


@METHODS.register("pegp")
class Pegp(Method):
    """LoRA whose updates are projected off the span of earlier tasks' layer inputs (GPM on both LoRA factors)."""

    name = "pegp"
    config_class = PegpConfig

    def __init__(self, config: PegpConfig | None = None) -> None:
        super().__init__(config)
        self.layers: dict[str, ProtectedLora] = {}
        self.before_step: list[torch.Tensor] = []
        self.token_mask: torch.Tensor | None = None

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        modules = module_map_for(model)
        model = attach_lora(model, self.config, targets=f"(?:{modules.llm_linears})|(?:{modules.projector})", train_projector=False)
        llm = re.compile(modules.llm_linears)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                self.layers[name] = ProtectedLora(a, b, InputBasis(a.shape[1]), InputBasis(a.shape[0]), bool(llm.fullmatch(name)))
        return model

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        return self._masked(batch["attention_mask"])

    @contextlib.contextmanager
    def _masked(self, mask: torch.Tensor) -> Iterator[None]:
        """Binds the batch's attention mask, which tells the covariance hooks the real tokens."""
        self.token_mask = mask
        try:
            yield
        finally:
            self.token_mask = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.layers.items():
            for side in ("x", "h"):
                basis = getattr(layer, f"{side}_basis")
                state[f"{name}.{side}"] = basis.basis
                state[f"{name}.{side}.tasks"] = torch.tensor([basis.tasks])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            for side in ("x", "h"):
                basis = getattr(layer, f"{side}_basis")
                basis.basis = state[f"{name}.{side}"].clone()
                basis.tasks = int(state[f"{name}.{side}.tasks"])

    def _protected(self) -> list[tuple[nn.Parameter, InputBasis]]:
        return [pair for layer in self.layers.values() for pair in ((layer.a, layer.x_basis), (layer.b, layer.h_basis)) if pair[1].size]

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        protected = self._protected()
        for parameter, basis in protected:
            if parameter.grad is not None:
                parameter.grad.copy_(basis.project_out(parameter.grad))
        if self.config.project_update:
            self.before_step = [parameter.detach().clone() for parameter, _ in protected]

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        if not self.config.project_update:
            return
        for (parameter, basis), old in zip(self._protected(), self.before_step):
            parameter.copy_(old + basis.project_out(parameter - old))

    @torch.no_grad()
    def covariances(self, model: nn.Module, names: list[str], samples: list[Sample], collator) -> dict[tuple[str, str], torch.Tensor]:
        """Float32 sums of x xᵀ (side "x") and h hᵀ (side "h", h = A x) over the real tokens of ``samples``, for the layers ``names``."""
        sums: dict[tuple[str, str], torch.Tensor] = {}

        def accumulate(key: tuple[str, str], token_rows: bool):
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0]
                rows = x.reshape(-1, x.shape[-1])
                if token_rows:
                    if self.token_mask is None or self.token_mask.shape != x.shape[:-1]:
                        shape = None if self.token_mask is None else tuple(self.token_mask.shape)
                        raise RuntimeError(f"{key[0]}: input of shape {tuple(x.shape)} has no matching attention mask ({shape})")
                    rows = rows[self.token_mask.reshape(-1).to(torch.bool)]
                rows = rows.to(torch.float32)
                if key not in sums:
                    sums[key] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
                sums[key].addmm_(rows.T, rows)

            return hook

        handles = []
        for name in names:
            module, layer = model.get_submodule(name), self.layers[name]
            handles.append(module.lora_A["default"].register_forward_pre_hook(accumulate((name, "x"), layer.token_rows)))
            handles.append(module.lora_B["default"].register_forward_pre_hook(accumulate((name, "h"), layer.token_rows)))
        try:
            for _ in forward_passes(self, model, samples, collator, batch_size=16, max_batches=self.config.basis_batches):
                pass
        finally:
            for handle in handles:
                handle.remove()
        return sums

    @torch.no_grad()
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Grow every layer's bases from this task's layer inputs and intermediates, a group of layers per pass."""
        for names in layer_groups(self.layers, COVARIANCE_BUDGET_BYTES):
            sums = self.covariances(model, names, samples, collator)
            for name in names:
                layer = self.layers[name]
                layer.x_basis.extend(sums.pop((name, "x")), self.config.threshold, self.config.energy)
                layer.h_basis.extend(sums.pop((name, "h")), self.config.b_side_threshold, self.config.energy)
        x_fill = [layer.x_basis.size / layer.a.shape[1] for layer in self.layers.values()]
        h_fill = [layer.h_basis.size / layer.a.shape[0] for layer in self.layers.values()]
        facts: dict[str, Any] = {"basis_fill": {
            "energy": self.config.energy,
            "x_mean": sum(x_fill) / len(x_fill), "x_max": max(x_fill),
            "h_mean": sum(h_fill) / len(h_fill), "h_max": max(h_fill),
            "h_full": sum(fill == 1 for fill in h_fill) / len(h_fill),  # share of layers whose B no longer moves
        }}
        if self.config.deviations():
            facts["deviations"] = self.config.deviations()
        return facts
