"""ModalPrompt (Zeng et al., EMNLP 2025): per-task prompt tokens chosen by image and text prototypes; the model stays frozen.

Each task t owns ``prompt_length`` prompt embeddings (initialised from random rows of the
vocabulary's embedding table) and a small MLP ``g_t: d → d → SiLU → d``; its prototype is
``p_t = mean_i g_t(e_i)`` over its prompt embeddings. A sample scores every prototype with
``s_t = ½ cos(image feature, p_t) + ½ cos(text feature, p_t)``.

Training task t (1-based): the chosen prompts are spliced right after BOS with their labels
ignored, per sample: for t ≤ 2 every prompt so far in task order; later, the two earlier
prompts of highest score in ascending score order, then the current one (nearest the text),
as the authors' code orders them. The loss adds ``(1 − cos(img, p_t)) + (1 − cos(txt, p_t))``,
batch means, to the cross-entropy. Only task t's prompt embeddings and ``g_t`` train: the
others are separate tensors that never require a gradient.

Inference after t tasks: the top ``min(3, t)`` prompts of the pool by score, in ascending
score order, after BOS; no task identity is used.

How the prompts enter the model: :meth:`ModalPrompt.batch_context` lengthens the batch the
model sees (placeholder ids after BOS, attention 1, label -100) and an embedding-layer hook
writes the selected prompt embeddings at those positions. ``generate`` is wrapped for the
batch so its prefill sees the lengthened prompt (its KV cache then holds the prompts) and its
output starts with the caller's own input ids, as ``generate`` returns them unwrapped.

Features: as in the authors' code, CLIP's projected image embedding and CLIP's unprojected
pooled text output of the instruction (a quirk of their code that works because both are 768
wide at ViT-L/14), from the suite's ``model.clip`` (for the tiny base, the tiny CLIP built on
its tower, whose projection is as wide as its text encoder); ``g_t`` ends in that width.
``features="llava"`` instead uses frozen features every LLaVA-family checkpoint has and is
recorded as a deviation: the mean of the frozen projector's image tokens and the mean input
embedding of the prompt's text tokens, both d wide (``g_t`` then ends in d).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import prompt_text_features, question_texts, selection_facts
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE, Choices
from cvit_bench.registry import ConfigError

if TYPE_CHECKING:  # the CLIP module imports the base's, which imports the methods
    from cvit_bench.models.clip_towers import ClipFeatures

FEATURES_DEVIATION = ("features=llava: selection features are the frozen projector's mean image token and the prompt's mean input "
                      "embedding, not CLIP's projected image embedding and pooled text output; prototypes are d_model wide")
IGNORE = -100


@dataclass(frozen=True)
class ModalPromptConfig(TuningConfig):
    lr: float | None = option(1e-2, "learning rate of the current prompts and prototype MLP (MCITlib: 2e-5 at 7B, 10 epochs; "
                              "tiny runs of a few steps need a larger one)", POSITIVE)
    prompt_length: int = option(4, "prompt tokens per task (paper: 10 on UCIT, 20 on MLLM-DCL; tiny: 4)", AT_LEAST_ONE)
    inference_prompts: int = option(3, "prompts inserted at inference, the top by score (authors: 3; MCITlib hard-codes 1)", AT_LEAST_ONE)
    image_weight: float = option(0.5, "weight of the image cosine in the selection score; the text cosine gets the rest (authors: 0.5)",
                                 POSITIVE)
    features: str = option("clip", "selection features: 'clip', the suite's CLIP (authors), or 'llava', frozen features of the LLaVA "
                           "checkpoint itself (projector's mean image token, prompt's mean embedding; a deviation)", Choices(("clip", "llava")))

    def __post_init__(self) -> None:
        if self.image_weight > 1:
            raise ValueError(f"image_weight must be at most 1, not {self.image_weight}")

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' code (recorded with every stage)."""
        found = [FEATURES_DEVIATION] if self.features == "llava" else []
        if self.inference_prompts != 3:
            found.append(f"inference_prompts={self.inference_prompts}: the authors insert the top 3 prompts")
        return found


class PromptPool(nn.Module):
    """Every task's prompt embeddings (one tensor per task, so a task trains alone) and prototype MLP, attached to the model."""

    def __init__(self, embeddings: torch.Tensor, tasks: int, length: int, feature_width: int) -> None:
        super().__init__()
        width = embeddings.shape[1]
        rows = torch.randint(embeddings.shape[0], (tasks, length))
        self.prompts = nn.ParameterList(nn.Parameter(embeddings[r].detach().float().clone()) for r in rows)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, feature_width)) for _ in range(tasks))

    def prototype(self, task: int) -> torch.Tensor:
        """``p_t = mean_i g_t(e_i)``: (d,)."""
        return self.heads[task](self.prompts[task]).mean(0)

    def prototypes(self, tasks: int) -> torch.Tensor:
        """The first ``tasks`` prototypes, (tasks, d), as selection reads them (no gradient)."""
        with torch.no_grad():
            return torch.stack([self.prototype(t) for t in range(tasks)])

    def gathered(self, chosen: torch.Tensor) -> torch.Tensor:
        """The prompt embeddings of ``chosen`` (samples, k) task indices, concatenated in that order: (samples, k·L, d)."""
        stacked = torch.stack(list(self.prompts))  # keeps the gradient of the trainable task's rows
        return stacked[chosen].flatten(1, 2)


def selection_scores(image: torch.Tensor, text: torch.Tensor, prototypes: torch.Tensor, image_weight: float) -> torch.Tensor:
    """``s = w·cos(image, p) + (1 − w)·cos(text, p)`` for every sample and prototype: (samples, prototypes)."""
    cos = nn.functional.cosine_similarity
    return (image_weight * cos(image[:, None], prototypes[None], dim=-1)
            + (1 - image_weight) * cos(text[:, None], prototypes[None], dim=-1))


def ascending_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best columns per row, lowest score first, so the best prompt sits next to the text (the authors' flip of topk)."""
    return scores.topk(k, dim=-1).indices.flip(-1)


def training_choice(scores: torch.Tensor, current: int, earlier: int = 2) -> torch.Tensor:
    """Prompts for training task ``current`` (0-based), per sample: all prompts so far in task order while there are at most
    ``earlier`` + 1 of them (t ≤ 2 in the paper's 1-based count with 2 earlier), else the ``earlier`` best earlier ones in
    ascending score order, then the current one."""
    samples = scores.shape[0]
    if current <= earlier - 1:
        return torch.arange(current + 1).expand(samples, -1)
    best = ascending_top(scores[:, :current], earlier)
    return torch.cat([best, torch.full((samples, 1), current, dtype=best.dtype, device=best.device)], dim=1)


def splice_after_bos(batch: dict[str, torch.Tensor], count: int, bos_id: int | None, placeholder: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``batch`` with ``count`` placeholder tokens after each row's BOS (its first real token; at the start where it is no
    BOS), attention 1 and labels ignored; also the (rows, length) mask of the inserted positions.

    Padding stays where it was (left for generation, right for training), since every row grows by ``count``.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = mask.argmax(dim=1)
    after = first + (ids[rows, first] == bos_id).long() if bos_id is not None else first
    length = ids.shape[1] + count
    positions = torch.arange(length, device=ids.device)[None]
    inserted = (positions >= after[:, None]) & (positions < after[:, None] + count)
    source = positions - count * (positions >= after[:, None] + count).long()  # where each kept position comes from
    source = source.clamp(max=ids.shape[1] - 1)

    def spread(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(inserted, torch.full_like(source, fill, dtype=values.dtype), values.gather(1, source))

    spliced = {**batch, "input_ids": spread(ids, placeholder), "attention_mask": spread(mask, 1)}
    if "labels" in batch:
        spliced["labels"] = spread(batch["labels"], IGNORE)
    return spliced, inserted


@METHODS.register("modalprompt")
class ModalPrompt(Method):
    """Per-task prompt tokens after BOS, chosen per sample by image and text prototypes; the base model is frozen."""

    name = "modalprompt"
    config_class = ModalPromptConfig

    def __init__(self, config: ModalPromptConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: list[str] = []
        self.pool: PromptPool | None = None
        self.current: int | None = None  # the task being trained, 0-based; None at inference
        self.trained = 0
        self.aligned: tuple[torch.Tensor, torch.Tensor] | None = None  # the training batch's (image, text) features
        self.choices: list[tuple[str, int]] = []  # per evaluated sample of a trained task: (its task, 1 if its prompt scored best)
        self._model: nn.Module | None = None
        self.clip: ClipFeatures | None = None

    # --- model -------------------------------------------------------------
    def needs_clip(self) -> bool:
        return self.config.features == "clip"

    def bind_clip(self, clip: ClipFeatures) -> None:
        if clip.image_width != clip.text_width:
            raise ConfigError(f"modalprompt: {clip.source}: one prototype is compared with CLIP's projected image embedding ({clip.image_width} wide) "
                              f"and its unprojected text output ({clip.text_width} wide); this CLIP's widths differ")
        self.clip = clip

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        embeddings = model.get_input_embeddings().weight
        if self.clip is None and (getattr(model.config, "vision_feature_layer", None) is None or not hasattr(model, "get_image_features")):
            raise ConfigError("modalprompt: features=llava needs a LLaVA-family model (projected image tokens)")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.tasks = list(tasks)
        width = self.clip.image_width if self.clip is not None else embeddings.shape[1]
        self.pool = PromptPool(embeddings, len(tasks), self.config.prompt_length, width)
        self.pool.requires_grad_(False)
        model.modal_prompt = self.pool  # a submodule: placed with the model, its trained tensors checkpointed with it
        self._model = model
        return model

    # --- features and selection ----------------------------------------------
    @torch.no_grad()
    def features(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features per sample, fp32, on the model's device, both as wide as the prototypes (see the module docstring)."""
        per_sample = [len(s.turns) for s in samples]
        if self.clip is not None:
            device = self._model.get_input_embeddings().weight.device
            return self.clip.image(batch["pixel_values"], per_sample).to(device), self.clip.text(question_texts(samples)).to(device)
        config = self._model.config
        pixels = batch["pixel_values"].to(self._model.get_input_embeddings().weight.dtype)
        images = self._model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                                vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
        per_image = torch.stack([tokens.float().mean(0) for tokens in images])
        image = per_image if len(per_image) == len(samples) else torch.stack([c.mean(0) for c in per_image.split(per_sample)])
        return image, prompt_text_features(self._model, batch).float()

    def choose(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's prompts (samples, k) as task indices in insertion order, and its scores over the prototypes read."""
        if self.current is not None:
            scores = selection_scores(image, text, self.pool.prototypes(self.current + 1).to(image.device), self.config.image_weight)
            return training_choice(scores, self.current).to(image.device), scores
        scores = selection_scores(image, text, self.pool.prototypes(self.trained).to(image.device), self.config.image_weight)
        return ascending_top(scores, min(self.config.inference_prompts, self.trained)), scores

    # --- the batch the model sees --------------------------------------------
    @contextlib.contextmanager
    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Splices each sample's chosen prompts after BOS for the forward (or ``generate``) of ``batch``; nothing before task 1."""
        if self.current is None and self.trained == 0:
            yield
            return
        image, text = self.features(samples, batch)
        chosen, scores = self.choose(image, text)
        if self.current is None:
            self._note_choices(samples, scores)
        self.aligned = (image, text) if self.current is not None else None
        embedding = self._model.get_input_embeddings()
        spliced, inserted = splice_after_bos(batch, chosen.shape[1] * self.config.prompt_length,
                                             self._model.config.get_text_config().bos_token_id, self._placeholder())
        prompts = self.pool.gathered(chosen)

        def write_prompts(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if output.dim() != 3 or output.shape[0] != inserted.shape[0] or output.shape[1] < inserted.shape[1]:
                return output  # a cached decoding step (one token), or an unrelated lookup
            at = nn.functional.pad(inserted, (0, output.shape[1] - inserted.shape[1]))  # uncached steps append tokens
            return output.masked_scatter(at.unsqueeze(-1), prompts.to(output.dtype))

        def lengthen(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if kwargs.get("input_ids") is batch["input_ids"]:  # this batch's own forward, not a step inside generate
                kwargs = {**kwargs, **{k: spliced[k] for k in ("input_ids", "attention_mask", "labels") if k in kwargs}}
            return args, kwargs

        original_generate = self._model.generate

        def generate(**kwargs: Any) -> torch.Tensor:
            if kwargs.get("input_ids") is not batch["input_ids"]:
                return original_generate(**kwargs)
            output = original_generate(**{**kwargs, "input_ids": spliced["input_ids"], "attention_mask": spliced["attention_mask"]})
            return torch.cat([batch["input_ids"], output[:, spliced["input_ids"].shape[1]:]], dim=1)

        handles = [embedding.register_forward_hook(write_prompts), self._model.register_forward_pre_hook(lengthen, with_kwargs=True)]
        self._model.generate = generate
        try:
            yield
        finally:
            del self._model.generate
            for handle in handles:
                handle.remove()
            self.aligned = None

    def _placeholder(self) -> int:
        """The id written at prompt positions before their embeddings replace it: any id but the image token's."""
        return int(self._model.config.image_token_id == 0)

    def _note_choices(self, samples: list[Sample], scores: torch.Tensor) -> None:
        for sample, best in zip(samples, scores.argmax(-1).tolist()):
            if sample.task in self.tasks[: self.trained]:
                self.choices.append((sample.task, int(self.tasks[best] == sample.task)))

    # --- training ----------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        """Only the stage's task's prompt embeddings and prototype MLP train."""
        self.current = self.tasks.index(tasks[0])
        self.pool.requires_grad_(False)
        self.pool.prompts[self.current].requires_grad_(True)
        self.pool.heads[self.current].requires_grad_(True)

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """``(1 − cos(img, p_t)) + (1 − cos(txt, p_t))``, each a batch mean, pulling the current prototype to its task's features."""
        if self.aligned is None:
            return None
        return alignment_loss(*self.aligned, self.pool.prototype(self.current))

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        self.trained, self.current = self.current + 1, None
        self.pool.requires_grad_(False)
        return {"prompts_trained": self.trained, "deviations": self.config.deviations()}

    # --- evaluation --------------------------------------------------------
    def evaluation_records(self) -> list[Any]:
        records, self.choices = self.choices, []
        return records

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        """How often a sample's own task's prototype scored highest (no task identity is given)."""
        return selection_facts(records, "prototype")

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tasks trained; the prompts and MLPs are model parameters, stored with the checkpoint's trained tensors."""
        return {"trained": torch.tensor(self.trained)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.trained = int(state["trained"])


def alignment_loss(image: torch.Tensor, text: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """``(1 − mean cos(image, p)) + (1 − mean cos(text, p))`` over the batch, as the authors' two terms."""
    cos = nn.functional.cosine_similarity
    p = prototype.to(image.dtype)[None]
    return (1 - cos(image, p, dim=-1).mean()) + (1 - cos(text, p, dim=-1).mean())
