"""BranchLoRA (seed 001): asymmetric LoRA with a shared trunk, task-specific routers, tuning-freezing and a task selector.

Each LLM feed-forward linear gets one shared down-projection A (the trunk) and N
up-projections B_e (the branches). The current task's router scores the branches from
the first token of the layer input, keeps the top-k and mixes them with the
renormalised weights. After each task the branches its router used most are frozen
(read, never updated). Each task also learns an image key and a text key (cosine
alignment loss); at test time the task whose keys fit a sample best picks the router,
with no task identity given.

Note for readers of the paper: in a causal decoder the first position only attends to
itself, so its hidden state is the same for every sample (the BOS token). First-token
routing is therefore a per-task decision, not a per-sample one; ``route_on="mean"``
routes on the masked sequence mean instead.

The four components are switches, so the paper's ablation ladder (MoELoRA → + shared A
→ + top-k → + tuning-freezing → + task routers) can be re-run with ``--option``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, forward_passes, option
from cvit_bench.methods.mixture import (
    MixtureLoraLinear, Routing, SliceFreezer, inject_mixture, prompt_text_features, selection_facts, set_trainable,
)
from cvit_bench.models.backend import module_map_for, packed_image_rows
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE


@dataclass(frozen=True)
class BranchLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of trunk, branches, routers, keys and projector (as seqlora)", POSITIVE)
    branches: int = option(8, "B branches per adapted linear (paper: 8)", AT_LEAST_ONE)
    rank: int = option(8, "rank of the trunk and of each branch (paper: 128 at hidden 4096; seqlora's 8 here)", AT_LEAST_ONE)
    alpha: float = option(16.0, "scaling alpha / rank (paper: 256 / 128 = 2)", POSITIVE)
    top_k: int = option(2, "branches mixed per token (paper: 2); 0 = dense softmax over all", NON_NEGATIVE)
    freeze_per_task: int = option(2, "most-used branches frozen after each task (tuning-freezing; 0 turns it off)", NON_NEGATIVE)
    shared_a: bool = option(True, "one shared A (trunk) for all branches; false = one A per branch, as MoELoRA")
    task_routers: bool = option(True, "a new router per task, old ones frozen, chosen by the task selector at test time")
    route_on: str = option("first", "router input: 'first' token of the layer input (paper) or the masked sequence 'mean'")
    selector_weight: float = option(1.0, "lambda of the key-alignment loss (paper: 1)", NON_NEGATIVE)
    image_feature: str = option("projected", "selector image feature: mean of the 'projected' image tokens (unverified reading)")
    usage_batches: int = option(8, "batches of the task's data read to measure branch usage for tuning-freezing", AT_LEAST_ONE)

    def __post_init__(self) -> None:
        if self.route_on not in ("first", "mean"):
            raise ValueError(f"route_on must be 'first' or 'mean', not {self.route_on!r}")
        if self.image_feature != "projected":
            raise ValueError(f"image_feature: only 'projected' is implemented, not {self.image_feature!r}")


class TaskRouterBank(nn.Module):
    """One router per task; each sample is routed by the router of its (given or selected) task."""

    def __init__(self, d_in: int, n_branches: int, n_routers: int, top_k: int, route_on: str, routing: Routing) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_routers, n_branches, d_in) * d_in**-0.5)
        self.top_k, self.route_on, self.routing = top_k, route_on, routing
        self.usage: torch.Tensor | None = None  # summed gates while measuring usage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def decide() -> torch.Tensor:
            summary = self.routing.first_token(x) if self.route_on == "first" else self.routing.sequence_mean(x)
            task = self.routing.facts["task"]().to(x.device)
            logits = torch.einsum("bd,bnd->bn", summary, self.weight[task])
            if 0 < self.top_k < logits.shape[-1]:
                top, index = logits.topk(self.top_k, dim=-1)
                gates = torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))
            else:
                gates = torch.softmax(logits, dim=-1)
            if self.usage is not None:
                self.usage += gates.detach().sum(0)
            return gates[:, None, :]

        return self.routing.cached(self, decide)


class TaskSelector(nn.Module):
    """Learned image and text keys per task; picks the task whose keys a sample's features match best (cosine)."""

    def __init__(self, n_tasks: int, dim: int) -> None:
        super().__init__()
        self.image_keys = nn.Parameter(torch.randn(n_tasks, dim) * dim**-0.5)
        self.text_keys = nn.Parameter(torch.randn(n_tasks, dim) * dim**-0.5)

    def alignment_loss(self, task: int, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cos = nn.functional.cosine_similarity
        image, text = image.to(self.image_keys.dtype), text.to(self.text_keys.dtype)  # features come in the model's dtype
        return (1 - cos(image, self.image_keys[task][None], dim=-1)).mean() + (1 - cos(text, self.text_keys[task][None], dim=-1)).mean()

    def select(self, image: torch.Tensor, text: torch.Tensor, n_trained: int) -> torch.Tensor:
        cos = nn.functional.cosine_similarity
        image, text = image.to(self.image_keys.dtype), text.to(self.text_keys.dtype)
        score = cos(image[:, None], self.image_keys[None, :n_trained], dim=-1) + cos(text[:, None], self.text_keys[None, :n_trained], dim=-1)
        return score.argmax(-1)


@METHODS.register("branchlora")
class BranchLora(Method):
    """Shared-trunk LoRA with top-k branches, task-specific routers, tuning-freezing and a task selector."""

    name = "branchlora"
    config_class = BranchLoraConfig

    def __init__(self, config: BranchLoraConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.freezer = SliceFreezer()
        self.tasks: list[str] = []
        self.trained = 0  # tasks whose router and keys are learned
        self.selections: list[tuple[str, int]] = []  # per evaluated sample of a trained task: (its task, 1 if the selector picked it)
        self.route_task: int | None = None  # the router in use while training; None = let the selector choose
        self.image_features: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None
        self._model: nn.Module | None = None

    # --- model -------------------------------------------------------------
    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        self.tasks = list(tasks)
        n_routers = len(tasks) if c.task_routers else 1
        self.layers = inject_mixture(
            model,
            module_map_for(model).llm_ffn,
            lambda name, base: MixtureLoraLinear(
                base, c.branches, c.rank, c.alpha / c.rank,
                TaskRouterBank(base.in_features, c.branches, n_routers, c.top_k, c.route_on, self.routing), shared_a=c.shared_a,
            ),
        )
        model.task_selector = TaskSelector(n_routers, model.get_input_embeddings().embedding_dim)
        set_trainable(model, self.layers, train_projector=True)
        for parameter in model.task_selector.parameters():
            parameter.requires_grad_(c.task_routers)
        projector_output = module_map_for(model).matching(model, module_map_for(model).projector)[-1]
        model.get_submodule(projector_output).register_forward_hook(self._capture_image_features)
        self._model = model
        return model

    def _capture_image_features(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        """The selector's image feature: mean of the projected image tokens (detached: keys learn, the projector does not chase them)."""
        self.image_features = self.routing.sequence_mean(output.detach())

    # --- routing -----------------------------------------------------------
    def _per_sample_image_features(self, samples: list[Sample]) -> torch.Tensor:
        """Few-shot samples carry several images: average their features per sample."""
        if len(self.image_features) == len(samples):
            return self.image_features
        return torch.stack([chunk.mean(0) for chunk in self.image_features.split([len(s.turns) for s in samples])])

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        """Training (and usage measurement) routes with the stage's own router; evaluation asks the selector."""
        if self.route_task is None and self.config.task_routers and self.trained:
            return self._selected_routing(samples, batch)
        task = torch.full((len(samples),), self.route_task or 0, dtype=torch.long)
        if self.route_task is not None and self.config.task_routers and self.config.selector_weight:
            self.text_features = prompt_text_features(self._model, batch)  # only the alignment loss reads it
        return self.routing.bind(attention_mask=batch["attention_mask"], task=lambda: task,
                                 rows_per_image=packed_image_rows(self._model.config, batch))

    @contextlib.contextmanager
    def _selected_routing(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        text = prompt_text_features(self._model, batch)

        def select() -> torch.Tensor:  # called at the first adapted layer, after the projector ran on this batch
            return self._model.task_selector.select(self._per_sample_image_features(samples), text, self.trained)

        with self.routing.bind(attention_mask=batch["attention_mask"], task=lambda: self.routing.cached("selected_task", select),
                               rows_per_image=packed_image_rows(self._model.config, batch)):
            yield
            picked = self.routing.cache.get("selected_task")
        if picked is not None:
            for sample, task in zip(samples, picked.tolist()):
                if sample.task in self.tasks[: self.trained]:
                    self.selections.append((sample.task, int(self.tasks[task] == sample.task)))

    # --- training ----------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.route_task = self.tasks.index(tasks[0]) if self.config.task_routers else 0
        if self.route_task > 0:  # earlier routers and keys stay as learned
            old = torch.arange(self.route_task)
            for layer in self.layers.values():
                self.freezer.freeze(layer.router.weight, old)
            self.freezer.freeze(model.task_selector.image_keys, old)
            self.freezer.freeze(model.task_selector.text_keys, old)

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        if not self.config.task_routers or self.config.selector_weight == 0:
            return None
        selector = self._model.task_selector
        return self.config.selector_weight * selector.alignment_loss(self.route_task, self.image_features, self.text_features)

    def after_backward(self, model: nn.Module) -> None:
        self.freezer.zero_grads()

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.freezer.restore()

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Tuning-freezing: freeze the branches this task's router used most, per layer."""
        self.trained = self.route_task + 1
        frozen = {}
        if self.config.freeze_per_task:
            for layer in self.layers.values():
                layer.router.usage = torch.zeros(self.config.branches, device=layer.lora_B.device)
            for _ in forward_passes(self, model, samples, collator, batch_size=16, max_batches=self.config.usage_batches):
                pass
            for name, layer in self.layers.items():
                usage, layer.router.usage = layer.router.usage, None
                top = usage.topk(self.config.freeze_per_task).indices
                self.freezer.freeze(layer.lora_B, top)
                if not self.config.shared_a:
                    self.freezer.freeze(layer.lora_A, top)
                frozen[name] = self.freezer.frozen_rows(layer.lora_B)
        self.route_task = None
        counts = [len(rows) for rows in frozen.values()]
        return {"frozen_branches_per_layer": {"min": min(counts, default=0), "max": max(counts, default=0)}}

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"trained": torch.tensor(self.trained), **self.freezer.state_dict(self._model)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.trained = int(state["trained"])
        self.freezer.load_state_dict(state, self._model)

    def evaluation_records(self) -> list[Any]:
        records, self.selections = self.selections, []
        return records

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        return selection_facts(records, "selector")
