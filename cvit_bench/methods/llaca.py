"""LLaCA (seed 002a): an exponential moving average of the weights with a gradient-derived balance weight.

After every optimizer step, for each trainable tensor separately (L1 norms, one scalar
per tensor)::

    beta = 2 (1 + |g_t|) / (|theta_t - theta*| * |g_t - g_{t-1}|),   beta := fallback if beta not in (0, 1)
    theta* <- (1 - beta) theta* + beta theta_t

theta* is created at the task's first update, which has no g_{t-1} and so takes the
fallback. At the end of the task the live weights are replaced by theta* (that model is
evaluated and carried on); the EMA starts fresh for the next task. The gradients are
the ones the optimizer step used (after clipping). As in the paper's setup the projector
is trained too, at a tenth of the LoRA learning rate.

L1 sums grow with a tensor's element count: on tensors of ~10³ elements the formula
leaves (0, 1) on most steps, and the in-range values sit near 1 (theta* jumps to the
live weights), whereas the paper's ~5·10⁵-element tensors keep it in range. So each
stage records, per kind of tensor (LoRA A, LoRA B, projector), the medians of the three
norms, the fallback share, and the weight ∏(1 − beta) that theta* still puts on the
weights it was created from. ``beta_scope=global`` computes one beta per step from the
norms summed over all trainable tensors; it is a recorded deviation, never the default.
The authors' code falls back silently inside a bare ``except``; here every fallback is
counted. The EMA and all statistics are float32 whatever the weights' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.models.backend import projector_parameters
from cvit_bench.ranges import NON_NEGATIVE, Range

BETA_SCOPES = ("tensor", "global")


@dataclass(frozen=True)
class LlacaConfig(LoraMethodConfig):
    fallback_beta: float = option(0.01, "beta used when the formula leaves (0, 1) or has no previous gradient (paper's code: 0.01)", Range(0, 1, low_open=True, high_open=True))
    beta_scope: str = option("tensor", "'tensor': one beta per trainable tensor (paper's code); 'global': one beta per step from "
                                       "norms summed over all trainable tensors (a recorded deviation)")
    projector_lr_scale: float = option(0.1, "projector lr relative to lr (paper: 2e-5 for the projector, 2e-4 for LoRA) unless projector_lr is set", NON_NEGATIVE)

    def __post_init__(self) -> None:
        if self.beta_scope not in BETA_SCOPES:
            raise ValueError(f"beta_scope must be one of {BETA_SCOPES}, not {self.beta_scope!r}")

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' code (recorded with every stage)."""
        if self.beta_scope != "tensor":
            return [f"beta_scope={self.beta_scope}: one beta per step from L1 norms summed over all trainable tensors"]
        return []


def l1_norms(grads: list[torch.Tensor], previous: list[torch.Tensor] | None, params: list[torch.Tensor],
             ema: list[torch.Tensor]) -> torch.Tensor:
    """(3, tensors) float32: |g_t|, |theta_t - theta*| and |g_t - g_{t-1}| per tensor (the last NaN without a previous gradient)."""
    grads = [g.to(torch.float32) for g in grads]
    gradient = torch.stack(torch._foreach_norm(grads, 1))
    distance = torch.stack(torch._foreach_norm(torch._foreach_sub([p.to(torch.float32) for p in params], ema), 1))
    if previous is None:
        change = torch.full_like(gradient, float("nan"))
    else:
        change = torch.stack(torch._foreach_norm(torch._foreach_sub(grads, previous), 1))
    return torch.stack([gradient, distance, change])


def balance_weights(norms: torch.Tensor, fallback: float, scope: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """LLaCA's beta per tensor from :func:`l1_norms`, and where the fallback replaced it (undefined or outside (0, 1)).

    ``scope="global"`` sums each norm over the tensors first and gives every tensor that one beta.
    """
    if scope == "global":
        norms = norms.sum(dim=1, keepdim=True).expand_as(norms)
    gradient, distance, change = norms
    beta = 2 * (1 + gradient) / (distance * change)
    fell_back = ~((beta > 0) & (beta < 1))  # also catches NaN and inf (0/0, x/0, no previous gradient)
    return torch.where(fell_back, torch.full_like(beta, fallback), beta), fell_back


def stage_statistics(norms: torch.Tensor, betas: torch.Tensor, fell_back: torch.Tensor, kinds: list[str]) -> dict[str, Any]:
    """What a stage's betas did: overall range and fallback share, and per kind of tensor the medians of the L1 norms
    over tensor-steps and of the weight ∏(1 - beta) left on the weights theta* was created from.

    ``norms`` is (steps, 3, tensors) from :func:`l1_norms`; ``betas`` and ``fell_back`` are (steps, tensors).
    """
    start_weight = (1 - betas.double()).prod(dim=0)
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        columns = torch.tensor([k == kind for k in kinds], device=betas.device)
        gradient, distance, change = norms[:, :, columns].transpose(0, 1).flatten(1)
        per_kind[kind] = {
            "tensors": int(columns.sum()),
            "fallback_rate": float(fell_back[:, columns].float().mean()),
            "median_grad_l1": float(gradient.quantile(0.5)),
            "median_distance_l1": float(distance.quantile(0.5)),
            "median_grad_change_l1": float(change.nanquantile(0.5)),  # a stage's first step has no change
            "median_start_weight": float(start_weight[columns].quantile(0.5)),
        }
    return {
        "mean": float(betas.mean()),
        "min": float(betas.min()),
        "max": float(betas.max()),
        "fallback_rate": float(fell_back.float().mean()),
        "steps_all_fallback": int(fell_back.all(dim=1).sum()),
        "steps": betas.shape[0],
        "kinds": per_kind,
    }


@METHODS.register("llaca")
class Llaca(Method):
    """LoRA (as seqlora) whose weights follow a gradient-balanced EMA, replaced by the EMA at each task's end."""

    name = "llaca"
    config_class = LlacaConfig

    def __init__(self, config: LlacaConfig | None = None) -> None:
        super().__init__(config)
        self.params: list[nn.Parameter] = []
        self.kinds: list[str] = []  # per parameter: lora_A, lora_B, projector (or other)
        self.reset()

    def reset(self) -> None:
        self.ema: list[torch.Tensor] | None = None
        self.previous_grads: list[torch.Tensor] | None = None
        self.norms: list[torch.Tensor] = []
        self.betas: list[torch.Tensor] = []
        self.fallbacks: list[torch.Tensor] = []

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        model = attach_lora(model, self.config)
        projector = {id(p) for p in projector_parameters(model)}
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.kinds = [
            "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "projector" if id(p) in projector else "other"
            for name, p in named
        ]
        return model

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """LoRA at the method's lr, the projector at ``projector_lr_scale`` of it (the paper's 2e-4 and 2e-5),
        or at the shared ``projector_lr`` option where the configuration has one set (a suite's recipe)."""
        lr = lr if self.config.lr is None else self.config.lr
        shared = getattr(self.config, "projector_lr", None)
        projector_lr = lr * self.config.projector_lr_scale if shared is None else shared
        groups = [
            {"params": [p for p, kind in zip(self.params, self.kinds) if kind != "projector"], "lr": lr},
            {"params": [p for p, kind in zip(self.params, self.kinds) if kind == "projector"], "lr": projector_lr},
        ]
        return [group for group in groups if group["params"]]

    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.reset()

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        params = [p.detach() for p in self.params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.ema is None:
            self.ema = [p.to(torch.float32, copy=True) for p in params]
        norms = l1_norms(grads, self.previous_grads, params, self.ema)
        beta, fell_back = balance_weights(norms, self.config.fallback_beta, self.config.beta_scope)
        # theta* += beta (theta - theta*), one scalar per tensor
        steps = torch._foreach_sub([p.to(torch.float32) for p in params], self.ema)
        torch._foreach_mul_(steps, list(beta.unbind()))  # in place: one float32 copy of the trainable weights, not two
        torch._foreach_add_(self.ema, steps)
        self.previous_grads = [g.to(torch.float32, copy=True) for g in grads]
        self.norms.append(norms)
        self.betas.append(beta)
        self.fallbacks.append(fell_back)

    @torch.no_grad()
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        if self.ema is None:
            return {}
        torch._foreach_copy_([p.data for p in self.params], self.ema)
        statistics = stage_statistics(torch.stack(self.norms), torch.stack(self.betas), torch.stack(self.fallbacks), self.kinds)
        facts: dict[str, Any] = {"llaca_beta": {"scope": self.config.beta_scope, **statistics}}
        if self.config.deviations():
            facts["deviations"] = self.config.deviations()
        return facts
