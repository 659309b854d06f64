"""HiDe-LLaVA (Guo et al., ACL 2025): one LoRA expert per task; lower layers fused, the top layer mixed by task anchors.

Every LLM linear holds one low-rank expert per task (the authors split a total rank r evenly,
r/T each, scaled by α/r with α = 2r, so by 2). Training task t runs expert t alone in every
layer: earlier experts are absent from the forward and kept bit-exact, there is no extra
loss, and the projector trains and is shared. After the task, two anchors are stored: the
mean image feature and the mean text feature of its training samples.

At inference after task t, layers 0 … L−2 use all trained experts fused. The authors' code
sums the A factors and the B factors separately, so cross terms B_i A_j appear
(``lower_fusion="factors"``, the default); the paper's "uniform merging" is offered as the
average of the ΔW_i (``"average"``). The top layer mixes the experts per sample:
``y = Wx + s Σ_k w_k B_k A_k x``, ``w = softmax(sim / 0.1)``,
``sim_k = ½[cos(f_img, a_img,k) + cos(f_txt, a_txt,k)]``, over the tasks seen so far (the
default; the authors hard-code 6 slots) or over all T slots, untrained ones at similarity 0
(``anchor_slots="all"``, MCITlib's choice).

Features: as in the authors' code, CLIP's projected image embedding and the CLIP text encoder's
pooled (unprojected) output of the question, from the CLIP checkpoint of the vision tower: the
suite's ``model.clip`` (for the tiny base, the tiny CLIP built on its tower, see
``models/clip_towers.py``). ``features="llava"`` instead takes features every LLaVA-family
checkpoint has, from frozen weights, and is recorded as a deviation: the vision tower's mean
patch feature (last layer, CLS left out) and the mean input embedding of the prompt's text
tokens (image tokens, padding and answer left out).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import (
    MixtureLoraLinear, Routing, SliceFreezer, inject_mixture, prompt_text_features, question_texts, selection_facts, set_trainable,
)
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE, Choices
from cvit_bench.registry import ConfigError

if TYPE_CHECKING:  # the CLIP module imports the base's, which imports the methods
    from cvit_bench.models.clip_towers import ClipFeatures

FEATURES_DEVIATION = ("features=llava: anchor features are the vision tower's mean patch feature and the prompt's mean input "
                      "embedding, not CLIP's projected image embedding and pooled text output")


@dataclass(frozen=True)
class HideConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of the current expert and the projector (authors: 2e-4 at 7B; tiny runs use seqlora's 1e-3)", POSITIVE)
    expert_rank: int = option(2, "rank of each task's expert (authors: r=48 split over 6 tasks = 8 at hidden 4096; tiny: 2 at hidden 160)", AT_LEAST_ONE)
    scaling: float = option(2.0, "LoRA scaling alpha / r with alpha = 2r, as the authors", POSITIVE)
    init_std: float = option(0.01, "std of the normal init of A (authors: 0.01); B starts at 0", POSITIVE)
    temperature: float = option(0.1, "temperature of the softmax over anchor similarities at the top layer (authors: 0.1)", POSITIVE)
    lower_fusion: str = option("factors", "layers below the top at inference: 'factors' sums the A's and the B's (authors' code), 'average' averages the B_i A_i (paper)")
    anchor_slots: str = option("seen", "top-layer softmax over the 'seen' tasks' anchors, or 'all' T slots with untrained ones at 0 (MCITlib)")
    train_projector: bool = option(True, "train the projector, shared across tasks (authors' projector lr: 2e-5)")
    features: str = option("clip", "anchor features: 'clip', the suite's CLIP (authors), or 'llava', frozen features of the LLaVA "
                           "checkpoint itself (tower's mean patch, prompt's mean embedding; a deviation)", Choices(("clip", "llava")))

    def __post_init__(self) -> None:
        if self.lower_fusion not in ("factors", "average"):
            raise ValueError(f"lower_fusion must be 'factors' or 'average', not {self.lower_fusion!r}")
        if self.anchor_slots not in ("seen", "all"):
            raise ValueError(f"anchor_slots must be 'seen' or 'all', not {self.anchor_slots!r}")

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' code (recorded with every stage)."""
        found = [FEATURES_DEVIATION] if self.features == "llava" else []
        if self.lower_fusion == "average":
            found.append("lower_fusion=average: lower layers average the B_i A_i (the paper's uniform merging), not the code's sum of factors")
        if self.anchor_slots == "all":
            found.append("anchor_slots=all: the top-layer softmax runs over all T anchor slots, untrained ones included (MCITlib)")
        return found


class ExpertSchedule:
    """Which experts a forward uses, shared by every layer of one model and set by the method.

    ``current`` is the task being trained (None at inference); ``trained`` counts finished tasks;
    the top layer reads per-sample expert weights from ``routing``.
    """

    def __init__(self, n_experts: int, lower_fusion: str, routing: Routing) -> None:
        self.n_experts, self.lower_fusion, self.routing = n_experts, lower_fusion, routing
        self.current: int | None = None
        self.trained = 0

    def trained_mask(self, device: torch.device) -> torch.Tensor:
        return (torch.arange(self.n_experts, device=device) < self.trained).float()


class HideGates(nn.Module):
    """Gates of one layer: the current expert while training; at inference the uniform average (lower layers,
    ``lower_fusion="average"``) or the anchor weights (top layer)."""

    def __init__(self, schedule: ExpertSchedule, top: bool) -> None:
        super().__init__()
        self.schedule, self.top = schedule, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.schedule
        if s.current is not None:
            return nn.functional.one_hot(torch.tensor(s.current, device=x.device), s.n_experts).to(x.dtype)
        if s.trained == 0:
            return torch.zeros(s.n_experts, device=x.device, dtype=x.dtype)
        if self.top:
            return s.routing.facts["expert_weights"].to(x.device, x.dtype)[:, None, :]
        return s.trained_mask(x.device).to(x.dtype) / s.trained


class HideLoraLinear(MixtureLoraLinear):
    """One expert per task; a lower layer at inference with ``lower_fusion="factors"`` runs (Σ B_i)(Σ A_i) x over trained experts."""

    def __init__(self, base: nn.Linear, n_experts: int, rank: int, scaling: float, gates: HideGates, init_std: float) -> None:
        super().__init__(base, n_experts, rank, scaling, gates)
        nn.init.normal_(self.lora_A, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.router.schedule
        if s.current is not None or self.router.top or s.lower_fusion != "factors" or s.trained == 0:
            return super().forward(x)
        result = self.base(x)
        mask = s.trained_mask(self.lora_A.device)[:, None, None]
        a, b = (self.lora_A * mask).sum(0), (self.lora_B * mask).sum(0)  # (r, d_in), (d_out, r)
        return result + ((x.to(a.dtype) @ a.T @ b.T) * self.scaling).to(result.dtype)


def anchor_weights(image: torch.Tensor, text: torch.Tensor, image_anchors: torch.Tensor, text_anchors: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """softmax over anchors k of ½[cos(image, a_img,k) + cos(text, a_txt,k)] / temperature: (samples, anchors)."""
    cos = nn.functional.cosine_similarity
    similarity = 0.5 * (cos(image[:, None], image_anchors[None], dim=-1) + cos(text[:, None], text_anchors[None], dim=-1))
    return torch.softmax(similarity / temperature, dim=-1)


def _layer_index(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


@METHODS.register("hide")
class Hide(Method):
    """One LoRA expert per task on every LLM linear; lower layers fused at inference, the top layer mixed by task anchors."""

    name = "hide"
    config_class = HideConfig

    def __init__(self, config: HideConfig | None = None) -> None:
        super().__init__(config)
        self.routing = Routing()
        self.schedule: ExpertSchedule | None = None
        self.layers: dict[str, HideLoraLinear] = {}
        self.freezer = SliceFreezer()
        self.tasks: list[str] = []
        self.image_anchors = torch.zeros(0)
        self.text_anchors = torch.zeros(0)
        self.choices: list[tuple[str, int]] = []  # per evaluated sample of a trained task: (its task, 1 if its expert weighed most)
        self._model: nn.Module | None = None
        self.clip: ClipFeatures | None = None

    # --- model -------------------------------------------------------------
    def needs_clip(self) -> bool:
        return self.config.features == "clip"

    def bind_clip(self, clip: ClipFeatures) -> None:
        self.clip = clip

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        self.tasks = list(tasks)
        self.schedule = ExpertSchedule(len(tasks), c.lower_fusion, self.routing)
        pattern = module_map_for(model).llm_linears
        top = max(_layer_index(name) for name in module_map_for(model).matching(model, pattern))
        self.layers = inject_mixture(
            model, pattern,
            lambda name, base: HideLoraLinear(base, len(tasks), c.expert_rank, c.scaling,
                                              HideGates(self.schedule, _layer_index(name) == top), c.init_std),
        )
        set_trainable(model, self.layers, c.train_projector)
        self._model = model
        if self.clip is not None:
            widths = self.clip.image_width, self.clip.text_width
        else:
            widths = self._vision_tower().config.hidden_size, model.get_input_embeddings().embedding_dim
        self.image_anchors, self.text_anchors = (torch.zeros(len(tasks), width) for width in widths)
        return model

    def _vision_tower(self) -> nn.Module:
        names = [name for name, _ in self._model.named_modules() if name.split(".")[-1] == "vision_tower"]
        if not names:
            raise ConfigError("hide: its image anchors need a LLaVA-family vision tower (a module named vision_tower)")
        return self._model.get_submodule(min(names, key=len))

    # --- features ----------------------------------------------------------
    @torch.no_grad()
    def features(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features per sample, fp32, on the CPU (see the module docstring)."""
        per_sample = [len(s.turns) for s in samples]
        if self.clip is not None:
            return self.clip.image(batch["pixel_values"], per_sample), self.clip.text(question_texts(samples))
        tower = self._vision_tower()
        pixels = batch["pixel_values"].to(next(tower.parameters()).dtype)
        patches = tower(pixel_values=pixels).last_hidden_state[:, 1:].float().mean(1)  # per image, CLS left out
        image = patches if len(patches) == len(samples) else torch.stack([chunk.mean(0) for chunk in patches.split(per_sample)])
        return image.cpu(), prompt_text_features(self._model, batch).float().cpu()

    # --- routing -----------------------------------------------------------
    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        """At inference after training, the top layer's weights for each sample come from its features and the anchors."""
        if self.schedule.current is not None or self.schedule.trained == 0:
            return self.routing.bind()
        image, text = self.features(samples, batch)
        slots = len(self.tasks) if self.config.anchor_slots == "all" else self.schedule.trained
        weights = anchor_weights(image, text, self.image_anchors[:slots], self.text_anchors[:slots], self.config.temperature)
        weights = nn.functional.pad(weights, (0, len(self.tasks) - slots))
        for sample, pick in zip(samples, weights.argmax(-1).tolist()):
            if sample.task in self.tasks[: self.schedule.trained]:
                self.choices.append((sample.task, int(self.tasks[pick] == sample.task)))
        return self.routing.bind(expert_weights=weights)

    # --- training ----------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        """Train the stage's expert alone: every other expert's rows are kept bit-exact (weight decay included)."""
        current = self.tasks.index(tasks[0])
        self.schedule.current = current
        others = torch.tensor([k for k in range(len(self.tasks)) if k != current], dtype=torch.long)
        self.freezer = SliceFreezer()
        for layer in self.layers.values():
            self.freezer.freeze(layer.lora_A, others)
            self.freezer.freeze(layer.lora_B, others)

    def after_backward(self, model: nn.Module) -> None:
        self.freezer.zero_grads()

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.freezer.restore()

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Store the task's anchors: the mean image and text features of all its training samples (the authors' running means)."""
        task = self.schedule.current
        images, texts = [], []
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            image, text = self.features(chunk, collator.train_batch(chunk))
            images.append(image)
            texts.append(text)
        self.image_anchors[task] = torch.cat(images).mean(0)
        self.text_anchors[task] = torch.cat(texts).mean(0)
        self.schedule.current, self.schedule.trained = None, task + 1
        self.freezer = SliceFreezer()
        return {"experts_trained": task + 1, "anchor_samples": sum(len(t) for t in texts), "deviations": self.config.deviations()}

    # --- evaluation --------------------------------------------------------
    def evaluation_records(self) -> list[Any]:
        records, self.choices = self.choices, []
        return records

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        """How often the top layer weighed a sample's own task's expert most (no task identity is given)."""
        return selection_facts(records, "anchor")

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"trained": torch.tensor(self.schedule.trained), "image_anchors": self.image_anchors, "text_anchors": self.text_anchors}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.schedule.trained = int(state["trained"])
        self.image_anchors, self.text_anchors = state["image_anchors"].clone(), state["text_anchors"].clone()
