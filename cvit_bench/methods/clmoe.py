"""CL-MoE (Huai et al., CVPR 2025): a mixture of LoRA experts with an instance router and a momentum merge after each task.

Built as the authors' released code does it, not as the paper's equations read (see
REFERENCE-FIELD.md): E experts of rank r/E on every LLM linear and one trainable dense
per-token softmax router (no top-k in the forward, no balancing loss). The paper's task
router G^T (mixed with the instance router by its β) is commented out in that code and is
not built here.

After each task the instance router's top-2 picks are counted on the task's tokens, per
layer; the ``task_experts`` most-picked experts form the task's expert set. Each expert is
then merged against its value before the task (the previous task's expert):
``θ_e = (1 − w_e)·old_e + w_e·new_e`` with ``w_e = beta`` (0.7) for experts the previous
task used and this task did not, and ``w_e = lam`` (0.3) for every other expert. Router and
projector are kept as trained. As released the merge matches no parameter name and does
nothing, and MCITlib's copy has neither counting nor merge; this module does the merge the
code describes, since that is the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, forward_passes, option
from cvit_bench.methods.mixture import MixtureLoraLinear, Routing, inject_mixture, set_trainable
from cvit_bench.methods.moelora import DenseTokenRouter
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE, Range

UNIT = Range(0, 1)


@dataclass(frozen=True)
class ClMoeConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of experts, router and projector (paper: 2e-4 at 7B; tiny runs use seqlora's 1e-3)", POSITIVE)
    experts: int = option(4, "experts per adapted linear (paper's code: 4)", AT_LEAST_ONE)
    expert_rank: int = option(2, "rank of each expert (paper: r=32 over 4 experts = 8 at hidden 4096; tiny: 4x2 = seqlora's r=8 at hidden 160)", AT_LEAST_ONE)
    alpha: float = option(16.0, "scaling is alpha / (experts x expert_rank) = 2, as the paper's alpha=64 over r=32", POSITIVE)
    counted_picks: int = option(2, "router picks per token counted as usage after a task (code: top-2)", AT_LEAST_ONE)
    task_experts: int = option(2, "experts in a task's expert set: the most-picked ones of each layer", AT_LEAST_ONE)
    beta: float = option(0.7, "weight of the new expert for experts the previous task used and this one did not (code: 0.7)", UNIT)
    lam: float = option(0.3, "weight of the new expert for every other expert (code: 0.3); 1 with beta=1 turns the merge off", UNIT)
    usage_batches: int = option(8, "batches of the task's data read to count expert usage", AT_LEAST_ONE)
    train_projector: bool = option(True, "train the projector fully, as LLaVA LoRA tuning does")

    def __post_init__(self) -> None:
        if self.counted_picks > self.experts or self.task_experts > self.experts:
            raise ValueError(f"counted_picks ({self.counted_picks}) and task_experts ({self.task_experts}) must not exceed experts ({self.experts})")


class CountingTokenRouter(DenseTokenRouter):
    """The instance router: softmax(W x) per token; while ``counts`` is set it also counts each real token's top picks."""

    def __init__(self, d_in: int, n_experts: int, picks: int, routing: Routing) -> None:
        super().__init__(d_in, n_experts)
        self.picks, self.routing = picks, routing
        self.counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = super().forward(x)
        if self.counts is not None:
            picked = gates.detach().topk(self.picks, dim=-1).indices  # (B, T, picks)
            mask = self.routing.facts.get("attention_mask")
            real = torch.ones(picked.shape[:-1], device=x.device) if mask is None or mask.shape != picked.shape[:-1] else mask.to(x.device)
            weights = real.unsqueeze(-1).expand_as(picked).to(self.counts.dtype)
            self.counts.index_add_(0, picked.flatten(), weights.flatten())
        return gates


def merge_experts(old: torch.Tensor, new: torch.Tensor, weight_new: torch.Tensor) -> torch.Tensor:
    """Per-expert momentum merge along dim 0: ``(1 − w_e)·old_e + w_e·new_e``."""
    w = weight_new.to(new.dtype).view(-1, *([1] * (new.dim() - 1)))
    return (1 - w) * old + w * new


def merge_weights(shifted: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    """The new experts' weight per expert: ``beta`` for shifted experts (in the previous task's set, not the current one's), else ``lam``."""
    return torch.where(shifted, torch.tensor(beta), torch.tensor(lam))


@METHODS.register("clmoe")
class ClMoe(Method):
    """Mixture of LoRA experts with a dense instance router; per-task usage counts and a momentum merge of experts after each task."""

    name = "clmoe"
    config_class = ClMoeConfig

    def __init__(self, config: ClMoeConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.usage: list[torch.Tensor] = []  # per finished task: (layers, experts) counts of the router's top picks
        self.old: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the experts before the current task, per layer

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        scaling = c.alpha / (c.experts * c.expert_rank)
        self.layers = inject_mixture(
            model,
            module_map_for(model).llm_linears,
            lambda name, base: MixtureLoraLinear(base, c.experts, c.expert_rank, scaling,
                                                 CountingTokenRouter(base.in_features, c.experts, c.counted_picks, self.routing)),
        )
        set_trainable(model, self.layers, c.train_projector)
        return model

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        return self.routing.bind(attention_mask=batch["attention_mask"])

    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        """Keep the experts as the previous task left them: the merge's old side."""
        self.old = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in self.layers.items()}

    def count_usage(self, model: nn.Module, samples: list[Sample], collator) -> torch.Tensor:
        """(layers, experts): how often each expert is among the router's top picks on the samples' real tokens."""
        for layer in self.layers.values():
            layer.router.counts = torch.zeros(self.config.experts, device=layer.lora_B.device)
        for _ in forward_passes(self, model, samples, collator, batch_size=16, max_batches=self.config.usage_batches):
            pass
        counts = torch.stack([layer.router.counts.cpu() for layer in self.layers.values()])
        for layer in self.layers.values():
            layer.router.counts = None
        return counts

    def expert_set(self, counts: torch.Tensor) -> torch.Tensor:
        """(layers, experts) bool: each layer's ``task_experts`` most-picked experts (lower index first on ties)."""
        top = counts.sort(dim=-1, descending=True, stable=True).indices[..., : self.config.task_experts]
        return torch.zeros_like(counts, dtype=torch.bool).scatter(-1, top, True)

    @torch.no_grad()
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        counts = self.count_usage(model, samples, collator)
        current = self.expert_set(counts)
        facts: dict[str, Any] = {"expert_usage_share": (counts.sum(0) / counts.sum().clamp_min(1)).tolist()}
        if self.usage:
            shifted = self.expert_set(self.usage[-1]) & ~current
            weights = merge_weights(shifted, self.config.beta, self.config.lam)
            for row, (name, layer) in enumerate(self.layers.items()):
                old_a, old_b = self.old[name]
                layer.lora_A.copy_(merge_experts(old_a, layer.lora_A, weights[row].to(old_a.device)))
                layer.lora_B.copy_(merge_experts(old_b, layer.lora_B, weights[row].to(old_b.device)))
            facts["shifted_experts"] = int(shifted.sum())
        self.usage.append(counts)
        self.old = {}
        return facts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The usage counts of every finished task; the experts themselves are in the model, merged."""
        return {f"usage.{i}": counts for i, counts in enumerate(self.usage)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.usage = [state[f"usage.{i}"] for i in range(len(state))]
