"""Elastic weight consolidation on seqlora's trainable tensors (adapters and projector).

After each task the diagonal empirical Fisher, the mean of squared per-sample gradients of the
training loss, is added to the running sum, and the anchor θ* moves to the current weights:
the penalty is λ/2 · Σ F (θ − θ*)² with F summed over all tasks so far (a single anchor with
accumulated importance, as in online EWC with γ = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE


@dataclass(frozen=True)
class EwcConfig(LoraMethodConfig):
    ewc_lambda: float = option(1e4, "penalty weight λ (λ/2 · Σ F (θ − θ*)²)", NON_NEGATIVE)
    fisher_samples: int = option(64, "training samples of each task whose squared gradients estimate its Fisher", AT_LEAST_ONE)


@METHODS.register("ewc")
class Ewc(Method):
    """LoRA with a quadratic penalty pulling important weights towards their values after the previous tasks."""

    name = "ewc"
    config_class = EwcConfig

    def __init__(self, config: EwcConfig | None = None) -> None:
        super().__init__(config)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.fisher: list[torch.Tensor] = []
        self.anchor: list[torch.Tensor] = []

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        model = attach_lora(model, self.config)
        self.names, self.params = map(list, zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad)))
        return model

    def penalty(self) -> torch.Tensor | None:
        """λ/2 · Σ F (θ − θ*)², or None before the first task has ended."""
        if not self.fisher:
            return None
        differences = torch._foreach_sub(self.params, self.anchor)
        return 0.5 * self.config.ewc_lambda * sum(
            (f * d * d).sum() for f, d in zip(self.fisher, differences)
        )

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        return self.penalty()

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        fisher = self.empirical_fisher(model, samples[: self.config.fisher_samples], collator)
        self.fisher = fisher if not self.fisher else torch._foreach_add(self.fisher, fisher)
        self.anchor = [p.detach().clone() for p in self.params]
        total = torch.stack([f.sum() for f in self.fisher]).sum()
        return {"fisher_sum": float(total), "fisher_max": float(torch.stack([f.max() for f in self.fisher]).max())}

    def empirical_fisher(self, model: nn.Module, samples: list[Sample], collator) -> list[torch.Tensor]:
        """Mean over samples of each gradient squared; one backward per sample, since squaring a batch mean is not the Fisher."""
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the model that is evaluated
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]  # fp32 sums also for bf16 weights (the projector)
        for sample in samples:
            loss = model(**collator.train_batch([sample])).loss
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            torch._foreach_add_(fisher, [torch.zeros_like(f) if g is None else g.float() ** 2 for g, f in zip(grads, fisher)])
        model.train(was_training)
        return torch._foreach_div(fisher, max(len(samples), 1))

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{kind}.{name}": tensor for kind, tensors in (("fisher", self.fisher), ("anchor", self.anchor))
                for name, tensor in zip(self.names, tensors)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.fisher = [state[f"fisher.{name}"].clone() for name in self.names]
            self.anchor = [state[f"anchor.{name}"].clone() for name in self.names]
