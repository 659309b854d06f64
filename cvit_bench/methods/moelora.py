"""MoELoRA (CoIN's mixture-of-LoRA baseline): E LoRA experts per adapted linear, a dense softmax router per token.

Rank budget: the papers that report MoELoRA beside LoRA (CoIN, SMoLoRA) split LoRA's budget
between the experts — 8 experts of rank 16 against one LoRA of rank 128 at 7B — so that the
two adapt the same linears with the same total rank. Here seqlora's rank is 8 (its committed
cvit-v2 rows are at 8, and every LoRA-family method shares it), so MoELoRA's default is 8
experts of rank 1: experts x expert_rank = seqlora's r, and alpha / (experts x expert_rank)
= seqlora's alpha / r = 2. Rank 1 of the tiny model's hidden 160 is about the paper's share
(16 of 4096). BranchLoRA's trunk and branches take the same expert rank
(:data:`EXPERT_RANK`), as its paper sets them to MoELoRA's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import MixtureLoraLinear, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE

EXPERT_RANK = 1  # 8 experts x rank 1 = seqlora's rank 8; BranchLoRA's trunk and branch rank

@dataclass(frozen=True)
class MoeLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of experts, routers and projector (as seqlora)", POSITIVE)
    experts: int = option(8, "experts per adapted linear (paper: 8)", AT_LEAST_ONE)
    expert_rank: int = option(EXPERT_RANK, "rank of each expert; experts x expert_rank is the budget, seqlora's r (paper: 16 x 8 = "
                              "LoRA's 128 at hidden 4096; here 1 x 8 = seqlora's 8)", AT_LEAST_ONE)
    alpha: float = option(16.0, "scaling is alpha / (experts x expert_rank), 2 as seqlora's alpha / r and the paper's 256 / 128", POSITIVE)
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
