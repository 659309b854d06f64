"""LLaCA (seed 002a): an exponential moving average of the weights with a gradient-derived balance weight.

After every optimizer step, for each trainable tensor separately (L1 norms, one scalar
per tensor)::

    beta = 2 (1 + |g_t|) / (|theta_t - theta*| * |g_t - g_{t-1}|),   beta := fallback if beta not in (0, 1)
    theta* <- (1 - beta) theta* + beta theta_t

theta* is created at the task's first update, which has no g_{t-1} and so takes the
fallback. At the end of the task the live weights are replaced by theta* (that model is
evaluated and carried on); the EMA starts fresh for the next task. The gradients are
the ones the optimizer step used (after clipping). The authors' code falls back silently
inside a bare ``except``; here every step's beta is counted so a run where the fallback
always fires (plain EMA) is visible in the results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.ranges import Range


@dataclass(frozen=True)
class LlacaConfig(LoraMethodConfig):
    fallback_beta: float = option(0.01, "beta used when the formula leaves (0, 1) or has no previous gradient (paper's code: 0.01)", Range(0, 1, low_open=True, high_open=True))


def balance_weights(
    grads: list[torch.Tensor], previous: list[torch.Tensor] | None, params: list[torch.Tensor], ema: list[torch.Tensor], fallback: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaCA's beta per tensor as one vector, and where the fallback replaced it (undefined or outside (0, 1))."""
    if previous is None:
        device = params[0].device
        return torch.full((len(params),), fallback, device=device), torch.ones(len(params), dtype=torch.bool, device=device)
    g = torch.stack(torch._foreach_norm(grads, 1))
    distance = torch.stack(torch._foreach_norm(torch._foreach_sub(params, ema), 1))
    change = torch.stack(torch._foreach_norm(torch._foreach_sub(grads, previous), 1))
    beta = 2 * (1 + g) / (distance * change)
    fell_back = ~((beta > 0) & (beta < 1))  # also catches NaN and inf (0/0, x/0)
    return torch.where(fell_back, torch.full_like(beta, fallback), beta), fell_back


@METHODS.register("llaca")
class Llaca(Method):
    """LoRA (as seqlora) whose weights follow a gradient-balanced EMA, replaced by the EMA at each task's end."""

    name = "llaca"
    config_class = LlacaConfig

    def __init__(self, config: LlacaConfig | None = None) -> None:
        super().__init__(config)
        self.params: list[nn.Parameter] = []
        self.reset()

    def reset(self) -> None:
        self.ema: list[torch.Tensor] | None = None
        self.previous_grads: list[torch.Tensor] | None = None
        self.betas: list[torch.Tensor] = []
        self.fallbacks: list[torch.Tensor] = []

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        model = attach_lora(model, self.config)
        self.params = [p for p in model.parameters() if p.requires_grad]
        return model

    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.reset()

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        params = [p.detach() for p in self.params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.ema is None:
            self.ema = [p.clone() for p in params]
        beta, fell_back = balance_weights(grads, self.previous_grads, params, self.ema, self.config.fallback_beta)
        # theta* += beta (theta - theta*), one scalar per tensor
        torch._foreach_add_(self.ema, torch._foreach_mul(torch._foreach_sub(params, self.ema), list(beta.unbind())))
        self.previous_grads = [g.clone() for g in grads]
        self.betas.append(beta)
        self.fallbacks.append(fell_back)

    @torch.no_grad()
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        if self.ema is None:
            return {}
        torch._foreach_copy_([p.data for p in self.params], self.ema)
        betas = torch.stack(self.betas)
        fallback = torch.stack(self.fallbacks)
        return {
            "llaca_beta": {
                "mean": float(betas.mean()),
                "min": float(betas.min()),
                "max": float(betas.max()),
                "fallback_rate": float(fallback.float().mean()),
                "steps_all_fallback": int(fallback.all(dim=1).sum()),
                "steps": len(self.betas),
            }
        }
