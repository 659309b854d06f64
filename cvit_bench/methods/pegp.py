"""PEGP (seed 002b): gradient projection (GPM) applied to LoRA.

After each task, the inputs x of every adapted layer and the intermediates h = A x are
collected on that task's data; their covariances grow one orthonormal basis per layer
and side (:class:`~cvit_bench.methods.projection.InputBasis`). On later tasks, A's
gradient is projected off the old-input basis (so A x_old stays fixed) and B's off the
old-intermediate basis (so B A x_old stays fixed), as the authors' ViT code does.

AdamW rescales each coordinate of the gradient, which would put part of the update back
inside the protected span; ``project_update`` (default on) therefore also projects the
update the optimizer actually made. Adapters cover the LLM linears and the projector
(whose own weights are frozen), so the whole model's output on old inputs is protected
up to the energy threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, forward_passes, option
from cvit_bench.methods.projection import InputBasis
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, Range


@dataclass(frozen=True)
class PegpConfig(LoraMethodConfig):
    threshold: float = option(0.99, "energy kept in each basis per task (the authors' ViT code: 0.99 for LoRA, 0.999 adapters, 0.90 prompts)", Range(0, 1, low_open=True))
    basis_batches: int = option(8, "batches of 16 of each task's training data whose inputs build the bases", AT_LEAST_ONE)
    project_update: bool = option(True, "also project the optimizer's update (AdamW's per-coordinate scaling leaks into the old span)")


@dataclass
class ProtectedLora:
    """One LoRA layer's two factors and the bases their inputs have grown."""

    a: nn.Parameter  # (r, d_in): faces the layer input x
    b: nn.Parameter  # (d_out, r): faces h = A x
    x_basis: InputBasis
    h_basis: InputBasis


@METHODS.register("pegp")
class Pegp(Method):
    """LoRA whose updates are projected off the span of earlier tasks' layer inputs (GPM on both LoRA factors)."""

    name = "pegp"
    config_class = PegpConfig

    def __init__(self, config: PegpConfig | None = None) -> None:
        super().__init__(config)
        self.layers: dict[str, ProtectedLora] = {}
        self.before_step: list[torch.Tensor] = []

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        modules = module_map_for(model)
        model = attach_lora(model, self.config, targets=f"(?:{modules.llm_linears})|(?:{modules.projector})", train_projector=False)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                self.layers[name] = ProtectedLora(a, b, InputBasis(a.shape[1]), InputBasis(a.shape[0]))
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{side}": getattr(layer, f"{side}_basis").basis for name, layer in self.layers.items() for side in ("x", "h")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            for side in ("x", "h"):
                getattr(layer, f"{side}_basis").basis = state[f"{name}.{side}"].clone()

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
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Grow every layer's bases from this task's layer inputs and intermediates."""
        covariances: dict[tuple[str, str], torch.Tensor] = {}

        def accumulate(key: tuple[str, str]):
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                covariances[key] = covariances.get(key, 0) + x.T @ x

            return hook

        handles = []
        for name in self.layers:
            module = model.get_submodule(name)
            handles.append(module.lora_A["default"].register_forward_pre_hook(accumulate((name, "x"))))
            handles.append(module.lora_B["default"].register_forward_pre_hook(accumulate((name, "h"))))
        try:
            for _ in forward_passes(self, model, samples, collator, batch_size=16, max_batches=self.config.basis_batches):
                pass
        finally:
            for handle in handles:
                handle.remove()
        for name, layer in self.layers.items():
            layer.x_basis.extend(covariances[(name, "x")], self.config.threshold)
            layer.h_basis.extend(covariances[(name, "h")], self.config.threshold)
        x_fill = [layer.x_basis.size / layer.a.shape[1] for layer in self.layers.values()]
        h_fill = [layer.h_basis.size / layer.a.shape[0] for layer in self.layers.values()]
        return {"basis_fill": {"x_mean": sum(x_fill) / len(x_fill), "h_mean": sum(h_fill) / len(h_fill), "x_max": max(x_fill), "h_max": max(h_fill)}}
