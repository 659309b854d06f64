"""BranchLoRA (seed 001): asymmetric LoRA with a shared trunk, task-specific routers, tuning-freezing and a task selector.

Every LLM linear gets one shared down-projection A (the trunk) and N up-projections B_e
(the branches), trunk and branches at MoELoRA's expert rank: the paper's own counts
(222 M against MoELoRA's 350 M at 7B) are met by all seven linears at rank 16 with one
router set, and by no feed-forward-only reading. The current task's router scores the
branches, keeps the top-k and mixes them with the renormalised weights. After each task
the branches its router used most are frozen (read, never updated). Each task gets its
own router, created for it: only the current task's router trains, so a stage trains one
router set, as the paper counts it, and BranchLoRA trains fewer parameters than MoELoRA.

Task selector: each task has an image key and a text key; at test time the task whose keys
fit a sample best (summed cosine) picks the router, with no task identity given. The
paper leaves open what the features are. Keys matched against the trained projector's
output go stale as later stages train it (the selector then collapses onto the newest
task), so the default image feature is the frozen vision tower's mean patch feature
(``image_feature="vision"``, the projector's input) and the text feature the mean of the
frozen input embeddings of the prompt's text tokens; no stage trains either. Where a
suite's tasks share one image distribution the image key cannot tell them apart and
``image_feature="none"`` lets the text key select alone, recorded in each stage's
``deviations``: cvit-v2 (one scene generator) sets it in its suite defaults, because summed
with the text key the image key cost its selector up to 11 points. The paper
fits keys with L_align = Σ(1 − cos(e, k)); its minimiser over a task's data is the mean
of the normalised features, so ``key_fit="mean"`` sets each key to exactly that after its
stage (fitted to convergence in closed form); ``key_fit="loss"`` trains keys by λ·L_align
during the stage at ``key_lr`` instead.

First-token routing (``route_on="first"``, the paper's text): in a causal decoder the first
position only attends to itself, so its hidden state is the same for every sample (BOS);
routing is then one decision per task. ``route_on="token"`` routes every token (as
MoELoRA), ``"mean"`` on the masked sequence mean.

The authors' code is linked from the paper but is not in the reference index searched for
this module (2026-12); the readings above follow the paper and its parameter counts.
The four components are switches, so the paper's ablation ladder (MoELoRA → + shared A →
+ top-k → + tuning-freezing → + task routers) can be re-run with ``--option``.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample, question_removed
from cvit_bench.methods.base import METHODS, Method, Rung, TuningConfig, forward_passes, option
from cvit_bench.methods.mixture import MixtureLoraLinear, Routing, SliceFreezer, inject_mixture, prompt_text_features, set_trainable
from cvit_bench.methods.moelora import EXPERT_RANK
from cvit_bench.models.backend import module_map_for, packed_image_rows
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Choices

PROBE_BATCH = 32  # batch size of the gradient-free passes after a stage


@dataclass(frozen=True)
class BranchLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of trunk, branches, routers and projector (as seqlora)", POSITIVE)
    branches: int = option(8, "B branches per adapted linear (paper: 8)", AT_LEAST_ONE)
    rank: int = option(EXPERT_RANK, "rank of the trunk and of each branch: MoELoRA's expert rank (paper: 16 at hidden 4096)", AT_LEAST_ONE)
    alpha: float = option(2.0 * EXPERT_RANK, "scaling is alpha / rank (paper: 2, as MoELoRA's and LoRA's)", POSITIVE)
    top_k: int = option(2, "branches mixed per decision (paper: 2); 0 = dense softmax over all", NON_NEGATIVE)
    freeze_per_task: int = option(2, "most-used branches frozen after each task (tuning-freezing; 0 turns it off)", NON_NEGATIVE)
    shared_a: bool = option(True, "one shared A (trunk) for all branches; false = one A per branch, as MoELoRA")
    task_routers: bool = option(True, "a new router per task, old ones frozen, chosen by the task selector at test time")
    route_on: str = option("first", "router input: the 'first' token of the layer input (paper), every 'token' (MoELoRA), "
                           "or the masked sequence 'mean'", Choices(("first", "token", "mean")))
    selector: str = option("keys", "test-time router choice: the learned 'keys' (paper) or the true task ('oracle'; unseen "
                           "tasks still use the keys)", Choices(("keys", "oracle")))
    image_feature: str = option("vision", "selector image feature: the frozen vision tower's mean patch feature ('vision'), "
                                "the mean of the trained projector's output ('projected'), or 'none' (text key only: for "
                                "suites whose tasks share one image distribution)", Choices(("vision", "projected", "none")))
    text_feature: str = option("embedding", "selector text feature: mean frozen input embedding of the prompt's text tokens "
                               "('embedding'), of the instruction alone, the phrasing without its question ('instruction'), "
                               "or 'none' (image key only)", Choices(("embedding", "instruction", "none")))
    key_fit: str = option("mean", "'mean': after its stage each key is set to the minimiser of L_align over the probe (the "
                          "mean normalised feature); 'loss': keys train by selector_weight * L_align at key_lr",
                          Choices(("mean", "loss")))
    key_lr: float | None = option(None, "learning rate of the keys under key_fit='loss'; null = lr", POSITIVE)
    selector_weight: float = option(1.0, "lambda of the key-alignment loss under key_fit='loss' (paper: 1)", NON_NEGATIVE)
    probe_samples: int = option(256, "training samples per task read after its stage (branch usage for tuning-freezing, the "
                                "keys' fit) and kept to measure cos(key, task mean) at later stages", AT_LEAST_ONE)

    def __post_init__(self) -> None:
        if self.task_routers and self.image_feature == "none" and self.text_feature == "none":
            raise ValueError("image_feature and text_feature are both 'none': the task selector would have no key to match")

    def deviations(self) -> list[str]:
        """Where the task selector departs from the paper's image key plus text key (recorded with every stage)."""
        if self.task_routers and "none" in (self.image_feature, self.text_feature):
            dropped = "image" if self.image_feature == "none" else "text"
            return [f"{dropped}_feature=none: the paper's selector sums an image and a text key; this one matches the other key alone"]
        return []


class TaskRouterBank(nn.Module):
    """One router per task, each its own tensor; each sample is routed by the router of its (given or selected) task."""

    def __init__(self, d_in: int, n_branches: int, n_routers: int, top_k: int, route_on: str, routing: Routing) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(n_branches, d_in) * d_in**-0.5) for _ in range(n_routers))
        self.top_k, self.route_on, self.routing = top_k, route_on, routing
        self.usage: torch.Tensor | None = None  # summed gates while measuring usage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route_on == "token":
            return self._gates(x)
        summary = (lambda: self.routing.first_token(x)) if self.route_on == "first" else (lambda: self.routing.sequence_mean(x))
        return self.routing.cached(self, lambda: self._gates(summary())[:, None, :])

    def _gates(self, inputs: torch.Tensor) -> torch.Tensor:
        """Top-k renormalised (or dense) gates of ``inputs`` (B, d) or (B, T, d) under each sample's task router."""
        task = self.routing.facts["task"]().to(inputs.device)
        weight = torch.stack(list(self.weights))[task]
        logits = torch.einsum("b...d,bnd->b...n", inputs, weight)
        if 0 < self.top_k < logits.shape[-1]:
            top, index = logits.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))
        else:
            gates = torch.softmax(logits, dim=-1)
        if self.usage is not None:
            self.usage += self._real_tokens(gates.detach()).sum(tuple(range(gates.dim() - 1)))
        return gates

    def _real_tokens(self, gates: torch.Tensor) -> torch.Tensor:
        """Per-token gates with padding positions zeroed, so branch usage counts real tokens only."""
        mask = self.routing.facts.get("attention_mask")
        if gates.dim() == 3 and mask is not None and mask.shape == gates.shape[:2]:
            return gates * mask.to(gates.device, gates.dtype).unsqueeze(-1)
        return gates


def mean_direction(features: torch.Tensor) -> torch.Tensor:
    """The mean of the normalised features: the minimiser (up to scale) of Σ(1 − cos(e, k)) over k."""
    return nn.functional.normalize(features.float(), dim=-1).mean(0)


class TaskSelector(nn.Module):
    """Image and text keys per task (one tensor per task, trained only in its stage); picks the best-matching task.

    A dimension of 0 leaves that feature out: the other key alone selects.
    """

    def __init__(self, n_tasks: int, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.image_keys = nn.ParameterList(nn.Parameter(torch.randn(image_dim) * image_dim**-0.5) for _ in range(n_tasks if image_dim else 0))
        self.text_keys = nn.ParameterList(nn.Parameter(torch.randn(text_dim) * text_dim**-0.5) for _ in range(n_tasks if text_dim else 0))

    def _pairs(self, image: torch.Tensor | None, text: torch.Tensor | None) -> list[tuple[str, torch.Tensor, nn.ParameterList]]:
        return [(kind, feature, keys) for kind, feature, keys in (("image", image, self.image_keys), ("text", text, self.text_keys)) if len(keys)]

    def alignment_loss(self, task: int, image: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        cos = nn.functional.cosine_similarity
        return sum((1 - cos(feature.to(keys[task].dtype), keys[task][None], dim=-1)).mean() for _, feature, keys in self._pairs(image, text))

    def select(self, image: torch.Tensor, text: torch.Tensor | None, n_trained: int) -> torch.Tensor:
        cos = nn.functional.cosine_similarity
        score = sum(cos(feature[:, None].to(keys[0].dtype), torch.stack(list(keys)[:n_trained])[None], dim=-1)
                    for _, feature, keys in self._pairs(image, text))
        return score.argmax(-1)

    @torch.no_grad()
    def fit(self, task: int, image: torch.Tensor, text: torch.Tensor | None) -> None:
        """Set the task's keys to the minimiser of its alignment loss over these features."""
        for _, feature, keys in self._pairs(image, text):
            keys[task].copy_(mean_direction(feature))

    @torch.no_grad()
    def key_cosines(self, task: int, image: torch.Tensor, text: torch.Tensor | None) -> dict[str, float]:
        """cos(key, mean normalised feature) per feature kind: 1 for a key fitted to these features."""
        return {kind: float(nn.functional.cosine_similarity(keys[task].float(), mean_direction(feature), dim=0))
                for kind, feature, keys in self._pairs(image, text)}

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack([key.detach() for key in keys]) for name, keys in (("image_keys", self.image_keys), ("text_keys", self.text_keys))
                if len(keys)}

    @torch.no_grad()
    def load_stacked(self, state: dict[str, torch.Tensor]) -> None:
        for name, keys in (("image_keys", self.image_keys), ("text_keys", self.text_keys)):
            for key, value in zip(keys, state.get(name, ())):
                key.copy_(value)


@METHODS.register("branchlora")
class BranchLora(Method):
    """Shared-trunk LoRA with top-k branches, task-specific routers, tuning-freezing and a task selector."""

    name = "branchlora"
    config_class = BranchLoraConfig
    # The paper's Table 4 on CoIN (ACC): each rung adds one part to the one below. The bottom rung is MoELoRA's
    # design on this code path (an A per expert, dense per-token softmax, one router throughout); every rung routes
    # per token, so the top rung differs from the defaults (first token, the paper's text) only in that.
    ablation_ladder = (
        Rung("moelora-equivalent", (("shared_a", "false"), ("top_k", "0"), ("freeze_per_task", "0"),
                                    ("task_routers", "false"), ("route_on", "token")), 37.13),
        Rung("shared-a", (("top_k", "0"), ("freeze_per_task", "0"), ("task_routers", "false"), ("route_on", "token")), 38.19),
        Rung("top-k", (("freeze_per_task", "0"), ("task_routers", "false"), ("route_on", "token")), 39.96),
        Rung("tuning-freezing", (("task_routers", "false"), ("route_on", "token")), 42.22),
        Rung("task-routers", (("route_on", "token"),), 44.20),
    )

    def __init__(self, config: BranchLoraConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.freezer = SliceFreezer()
        self.tasks: list[str] = []
        self.trained = 0  # tasks whose router and keys are learned
        self.probes: dict[str, list[Sample]] = {}  # per trained task: the training samples read after its stage
        self.phrasings: dict[str, list[str]] = {}  # per trained task: the phrasing ids it trained on
        self.selections: list[tuple[str, str, int]] = []  # per evaluated sample of a trained task: (task, phrasing, 1 if selected)
        self.route_task: int | None = None  # the router in use while training or probing; None = let the selector choose
        self.stage_task = ""  # the task the current stage trains
        self.image_features: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None
        self.selector: TaskSelector | None = None
        self._model: nn.Module | None = None
        self._tokenizer: Any = None
        self._instruction_features: dict[str, torch.Tensor] = {}  # per instruction text, under text_feature: instruction

    # --- model -------------------------------------------------------------
    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        self.tasks = list(tasks)
        n_routers = len(tasks) if c.task_routers else 1
        modules = module_map_for(model)
        self.layers = inject_mixture(
            model,
            modules.llm_linears,
            lambda name, base: MixtureLoraLinear(
                base, c.branches, c.rank, c.alpha / c.rank,
                TaskRouterBank(base.in_features, c.branches, n_routers, c.top_k, c.route_on, self.routing), shared_a=c.shared_a,
            ),
        )
        set_trainable(model, self.layers, train_projector=True)
        if c.task_routers:
            projector = [model.get_submodule(name) for name in modules.matching(model, modules.projector)]
            image_dim = 0
            if c.image_feature == "vision":  # the projector's input: the frozen tower's (selected) patch features
                projector[0].register_forward_pre_hook(lambda module, inputs: self._capture_image_features(inputs[0]))
                image_dim = projector[0].in_features
            elif c.image_feature == "projected":
                projector[-1].register_forward_hook(lambda module, inputs, output: self._capture_image_features(output))
                image_dim = projector[-1].out_features
            text_dim = 0 if c.text_feature == "none" else model.get_input_embeddings().embedding_dim
            self.selector = model.task_selector = TaskSelector(n_routers, image_dim, text_dim)
        self._model = model
        self._train_only(0)
        return model

    def _train_only(self, task: int) -> None:
        """Only ``task``'s router (and, when keys learn by loss, its keys) trains; earlier ones stay as learned."""
        for layer in self.layers.values():
            for index, weight in enumerate(layer.router.weights):
                weight.requires_grad_(index == task)
        if self.selector is not None:
            for keys in (self.selector.image_keys, self.selector.text_keys):
                for index, key in enumerate(keys):
                    key.requires_grad_(self.config.key_fit == "loss" and index == task)

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """As every method, with the keys at their own ``key_lr`` when set."""
        groups = super().parameter_groups(model, lr)
        if self.selector is None or self.config.key_lr is None:
            return groups
        keys = {id(p) for p in self.selector.parameters() if p.requires_grad}
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in keys]} for group in groups]
        groups.append({"params": [p for p in self.selector.parameters() if p.requires_grad], "lr": self.config.key_lr})
        return [group for group in groups if group["params"]]

    def _capture_image_features(self, tokens: torch.Tensor) -> None:
        """The selector's image feature, one row per image (detached: keys learn, nothing upstream chases them)."""
        self.image_features = self.routing.sequence_mean(tokens.detach())

    # --- routing -----------------------------------------------------------
    def bind_tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def _text_features(self, batch: dict[str, torch.Tensor], samples: list[Sample]) -> torch.Tensor | None:
        """Mean frozen input embedding of each prompt's text tokens, or of its instruction alone, or None under ``text_feature: none``."""
        if self.config.text_feature == "none":
            return None
        if self.config.text_feature == "instruction":
            return torch.stack([self._instruction_feature(question_removed(sample.instruction)) for sample in samples])
        return prompt_text_features(self._model, batch)

    def _instruction_feature(self, text: str) -> torch.Tensor:
        """The instruction's mean frozen input embedding: what a task asks for, apart from the question asked, which
        the whole prompt's mean mixes in (tasks whose questions look alike then share a text key)."""
        if text not in self._instruction_features:
            embeddings = self._model.get_input_embeddings()
            ids = self._tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(embeddings.weight.device)
            with torch.no_grad():
                self._instruction_features[text] = (embeddings(ids).mean(0) if len(ids)
                                                    else embeddings.weight.new_zeros(embeddings.embedding_dim))
        return self._instruction_features[text]

    def _per_sample_image_features(self, samples: list[Sample]) -> torch.Tensor | None:
        """Few-shot samples carry several images: average their features per sample (None without an image key)."""
        if self.image_features is None or len(self.image_features) == len(samples):
            return self.image_features
        return torch.stack([chunk.mean(0) for chunk in self.image_features.split([len(s.turns) for s in samples])])

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        """Training and probing route with the stage's own router; evaluation asks the selector."""
        if self.route_task is None and self.selector is not None and self.trained:
            return self._selected_routing(samples, batch)
        task = torch.full((len(samples),), self.route_task or 0, dtype=torch.long)
        if self.route_task is not None and self.selector is not None:
            self.text_features = self._text_features(batch, samples)  # the alignment loss and the probe read it
        return self.routing.bind(attention_mask=batch["attention_mask"], task=lambda: task,
                                 rows_per_image=packed_image_rows(self._model.config, batch))

    @contextlib.contextmanager
    def _selected_routing(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        text = self._text_features(batch, samples)

        def select() -> torch.Tensor:  # called at the first adapted layer, after the projector ran on this batch
            picked = self.selector.select(self._per_sample_image_features(samples), text, self.trained)
            if self.config.selector == "oracle":
                known = self.tasks[: self.trained]
                truth = torch.tensor([known.index(s.task) if s.task in known else -1 for s in samples], device=picked.device)
                picked = torch.where(truth >= 0, truth, picked)
            return picked

        with self.routing.bind(attention_mask=batch["attention_mask"], task=lambda: self.routing.cached("selected_task", select),
                               rows_per_image=packed_image_rows(self._model.config, batch)):
            yield
            picked = self.routing.cache.get("selected_task")
        if picked is not None:
            for sample, task in zip(samples, picked.tolist()):
                if sample.task in self.tasks[: self.trained]:
                    self.selections.append((sample.task, sample.phrasing_id, int(self.tasks[task] == sample.task)))

    # --- training ----------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.stage_task = tasks[0]
        self.route_task = self.tasks.index(tasks[0]) if self.config.task_routers else 0
        self._train_only(self.route_task)

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        if self.selector is None or self.config.key_fit != "loss" or self.config.selector_weight == 0:
            return None
        return self.config.selector_weight * self.selector.alignment_loss(self.route_task, self.image_features, self.text_features)

    def after_backward(self, model: nn.Module) -> None:
        self.freezer.zero_grads()

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.freezer.restore()

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Read the task's probe under its router: freeze the branches it used most, fit its keys; then check every key."""
        task = self.route_task
        self.probes[self.stage_task] = samples[: self.config.probe_samples]
        self.phrasings[self.stage_task] = sorted({s.phrasing_id for s in samples})
        facts = self._consolidate(model, collator, task) if self.config.freeze_per_task or self.selector is not None else {}
        self.trained, self.route_task = max(self.trained, task + 1), None
        return facts

    def _consolidate(self, model: nn.Module, collator, task: int) -> dict[str, Any]:
        for layer in self.layers.values():
            layer.router.usage = torch.zeros(self.config.branches, device=layer.lora_B.device)
        image, text = self._probe(model, self.probes[self.stage_task], collator, task)
        usage = {name: layer.router.usage for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.router.usage = None
        facts: dict[str, Any] = {}
        if self.config.freeze_per_task:
            facts["frozen_branches_per_layer"] = self._freeze_most_used(usage)
        if self.selector is not None:
            if self.config.key_fit == "mean":
                self.selector.fit(task, image, text)
            facts["key_cosine"] = self._key_cosines(model, collator, task, image, text)
            if deviations := self.config.deviations():
                facts["deviations"] = deviations
        return facts

    def _freeze_most_used(self, usage: dict[str, torch.Tensor]) -> dict[str, int]:
        for name, layer in self.layers.items():
            top = usage[name].topk(min(self.config.freeze_per_task, self.config.branches)).indices
            self.freezer.freeze(layer.lora_B, top)
            if not self.config.shared_a:
                self.freezer.freeze(layer.lora_A, top)
        counts = [len(self.freezer.frozen_rows(layer.lora_B)) for layer in self.layers.values()]
        return {"min": min(counts), "max": max(counts)}

    def _key_cosines(self, model: nn.Module, collator, task: int, image: torch.Tensor, text: torch.Tensor | None) -> dict[str, dict[str, float]]:
        """cos(key, task mean) for every trained task, on its probe's features as the model computes them now."""
        cosines: dict[str, dict[str, float]] = {}
        for name, probe in self.probes.items():
            earlier = self.tasks.index(name)
            features = (image, text) if earlier == task else self._probe(model, probe, collator, earlier)
            for kind, value in self.selector.key_cosines(earlier, *features).items():
                cosines.setdefault(kind, {})[name] = value
        return cosines

    def _probe(self, model: nn.Module, samples: list[Sample], collator, task: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradient-free forwards of ``samples`` under ``task``'s router; the selector features, one row per sample."""
        was, self.route_task = self.route_task, task
        images, texts = [], []
        batches = forward_passes(self, model, samples, collator, batch_size=PROBE_BATCH, max_batches=math.ceil(len(samples) / PROBE_BATCH))
        for index, _ in enumerate(batches):
            if self.selector is not None:
                images.append(self._per_sample_image_features(samples[index * PROBE_BATCH : (index + 1) * PROBE_BATCH]))
                texts.append(self.text_features)
        self.route_task = was
        if not images:
            return None, None
        return None if images[0] is None else torch.cat(images), None if texts[0] is None else torch.cat(texts)

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Frozen-branch masks, the keys (fitted in closed form they are never trainable, so no checkpoint holds them
        otherwise), and the probes and phrasings later stages read."""
        probes = {"probes": {task: [s.to_json() for s in samples] for task, samples in self.probes.items()}, "phrasings": self.phrasings}
        state = {"trained": torch.tensor(self.trained), "probes": torch.tensor(list(json.dumps(probes).encode()), dtype=torch.uint8),
                 **self.freezer.state_dict(self._model)}
        if self.selector is not None:
            state.update({f"selector.{name}": value.clone() for name, value in self.selector.stacked().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.trained = int(state["trained"])
        probes = json.loads(state["probes"].numpy().tobytes())
        self.probes = {task: [Sample.from_json(fields) for fields in samples] for task, samples in probes["probes"].items()}
        self.phrasings = probes["phrasings"]
        self.freezer.load_state_dict(state, self._model)
        if self.selector is not None:
            self.selector.load_stacked({k.removeprefix("selector."): v for k, v in state.items() if k.startswith("selector.")})

    # --- evaluation --------------------------------------------------------
    def evaluation_records(self) -> list[Any]:
        records, self.selections = self.selections, []
        return records

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        """Selector accuracy (percent) on the phrasings each task trained on and, where evaluated, on held-out ones."""
        if not records:
            return {}
        hits: dict[str, dict[str, list[int]]] = {"train": {}, "heldout": {}}
        for task, phrasing, hit in records:
            hits["train" if phrasing in self.phrasings.get(task, ()) else "heldout"].setdefault(task, []).append(hit)
        facts: dict[str, Any] = {"selector_samples": len(records)}
        for kind, per_task in hits.items():
            if per_task:
                every = [hit for task_hits in per_task.values() for hit in task_hits]
                facts[f"selector_accuracy_{kind}"] = 100 * sum(every) / len(every)
                facts[f"selector_accuracy_{kind}_per_task"] = {t: 100 * sum(v) / len(v) for t, v in per_task.items()}
        return facts
