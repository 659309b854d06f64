"""MoELoRA (CoIN's mixture-of-LoRA baseline): E LoRA experts per adapted linear, a dense softmax router per token."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import MixtureLoraLinear, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE


@dataclass(frozen=True)
class MoeLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of experts, routers and projector (as seqlora)", POSITIVE)
    experts: int = option(8, "experts per adapted linear (paper: 8)", AT_LEAST_ONE)
    expert_rank: int = option(2, "rank of each expert (paper: 16, splitting r=128 at hidden 4096; the tiny model's budget is 8x2=16 at hidden 160)", AT_LEAST_ONE)
    alpha: float = option(32.0, "scaling is alpha / (experts x expert_rank), i.e. 2 as in the paper's alpha=256 over r=128", POSITIVE)
    train_projector: bool = option(True, "train the projector fully, as LLaVA LoRA tuning does")


class DenseTokenRouter(nn.Module):
    """softmax(W x) per token over all experts; trained with the experts."""

    def __init__(self, d_in: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_in))
        nn.init.normal_(self.weight, std=d_in**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.weight.T, dim=-1)


@METHODS.register("moelora")
class MoeLora(Method):
    """Mixture of LoRA experts on every LLM linear, dense per-token softmax routing, trained sequentially."""

    name = "moelora"
    config_class = MoeLoraConfig

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        scaling = c.alpha / (c.experts * c.expert_rank)
        layers = inject_mixture(
            model,
            module_map_for(model).llm_linears,
            lambda name, base: MixtureLoraLinear(base, c.experts, c.expert_rank, scaling, DenseTokenRouter(base.in_features, c.experts)),
        )
        set_trainable(model, layers, c.train_projector)
        return model
