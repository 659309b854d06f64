"""The Method interface: explicit hooks the training loop and the runner call.

Every hook is defined here as a no-op, so a method overrides only what it changes
and the runner never asks ``hasattr``. Hooks return what they produce (a model, a
dataset, a loss term) rather than mutating shared state.
"""
from __future__ import annotations

import contextlib
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, ContextManager, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.models.backend import projector_parameters, vision_parameters
from cvit_bench.ranges import ANY, POSITIVE, Choices, Range, range_problem
from cvit_bench.registry import ConfigError, Registry
from cvit_bench.training.batches import shuffled_batches


@dataclass(frozen=True)
class StagePlan:
    """One training stage: which tasks it trains on, for how many steps, and which matrix rows its evaluation fills."""

    tasks: tuple[str, ...]
    steps: int
    rows: tuple[int, ...]


def option(default: Any, help: str, allowed: Range | Choices | None = None, *, added_later: bool = False) -> Any:
    """A config field whose help text and allowed range (or, for a text field, its :class:`Choices`) ``cvit-bench ls``
    prints; a numeric field without ``allowed`` takes any finite value.

    ``added_later``: the option came after results were published; at its default it is left out
    of the recorded config (see :func:`recorded_config`), so those results keep their config hash.
    """
    return field(default=default, metadata={"help": help, "allowed": allowed, "added_later": added_later})


def _numeric(hint: Any) -> type | None:
    """int or float when a config field holds a number (``float | None`` too), else None."""
    allowed = typing.get_args(hint) or (hint,)
    return int if int in allowed else float if float in allowed else None


def option_range(config_class: type[MethodConfig], name: str) -> Range | Choices | None:
    """The range a numeric config field allows, the choices of a text field that declares them (None for other fields)."""
    f = {f.name: f for f in fields(config_class)}[name]
    allowed = f.metadata.get("allowed")
    if isinstance(allowed, Choices):
        return allowed
    return allowed or ANY if _numeric(typing.get_type_hints(config_class)[name]) else None


def build_config(method: str, config_class: type[MethodConfig], options: dict[str, Any]) -> MethodConfig:
    """A method's config from ``options`` (``--option`` values, a suite's ``method_defaults``): every value typed against
    its field and checked against its range; all problems are reported at once as a ConfigError naming the options."""
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise ConfigError(f"method {method!r}: unknown option(s) {unknown} (valid: {sorted(hints)})")
    values, problems = {}, []
    for key, value in options.items():
        try:
            values[key] = _typed_option(method, key, value, hints[key])
        except ConfigError as error:
            problems.append(str(error))
            continue
        allowed = option_range(config_class, key)
        if allowed is not None and values[key] is not None:
            problem = range_problem(f"method {method!r}: option {key}", values[key], allowed, integer=_numeric(hints[key]) is int)
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        return config_class(**values)
    except ValueError as error:  # a config's own cross-field checks (__post_init__)
        raise ConfigError(f"method {method!r}: {error}") from None


def _typed_option(method: str, key: str, value: Any, hint: Any) -> Any:
    """An option value of its field's type; YAML reads ``1e-4`` as a string, so numbers written that way are parsed."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if bool in allowed and isinstance(value, bool):
        return value
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    if str in allowed and isinstance(value, str):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"method {method!r}: option {key}={value!r} must be {names}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options (a method that trains nothing has none)."""


@dataclass(frozen=True)
class TuningConfig(MethodConfig):
    """Options shared by methods that train."""

    lr: float | None = option(None, "learning rate; overrides the suite's training.lr when set", POSITIVE)
    projector_lr: float | None = option(None, "learning rate of the projector (LLaVA's mm_projector_lr); null = lr", POSITIVE, added_later=True)


def recorded_config(config: MethodConfig) -> dict[str, Any]:
    """The method's options as a run records and hashes them: every option, except those added later while at their default."""
    return {f.name: getattr(config, f.name) for f in fields(config)
            if not (f.metadata.get("added_later") and getattr(config, f.name) == f.default)}


@dataclass(frozen=True)
class Rung:
    """One configuration of a method's ablation ladder (``cvit-bench ablate``): option values as ``--option`` takes
    them, and the score its paper reports for that configuration (None where it reports none)."""

    name: str
    options: tuple[tuple[str, str], ...]
    paper: float | None = None

    def option_args(self) -> list[str]:
        return [arg for key, value in self.options for arg in ("--option", f"{key}={value}")]


class Method:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = TuningConfig
    # the paper's ablation, bottom rung first; empty where the method's paper has none that options express
    ablation_ladder: ClassVar[tuple[Rung, ...]] = ()

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config or self.config_class()

    # --- schedule -----------------------------------------------------------
    def stage_plan(self, tasks: list[str], steps_per_task: int) -> list[StagePlan]:
        """Default: one stage per task, in order, filling row ``i`` after task ``i``."""
        return [StagePlan((task,), steps_per_task, (i,)) for i, task in enumerate(tasks, start=1)]

    # --- model --------------------------------------------------------------
    def declare_tasks(self, training_prompts: dict[str, tuple[str, ...]], unseen: tuple[str, ...]) -> None:
        """Called once before :meth:`wrap_model` with the suite's seen tasks, each with the prompt templates it trains on,
        and its unseen tasks. Methods that route by task (SMoLoRA's instruction router) keep them; others need nothing."""

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Called once after :meth:`wrap_model` with the run's tokenizer, for methods that embed text of their own
        (BranchLoRA's instruction key); others need nothing."""

    def needs_clip(self) -> bool:
        """Whether the method reads CLIP image and text features (HiDe-LLaVA's anchors, ModalPrompt's selection); the
        runner then passes the suite's CLIP (``model.clip``) to :meth:`bind_clip` before :meth:`wrap_model`."""
        return False

    def bind_clip(self, clip: Any) -> None:
        """Called once before :meth:`wrap_model` with the run's frozen CLIP features (a ``ClipFeatures``) when :meth:`needs_clip`."""

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        """Attach adapters / choose trainable parameters for a run over ``tasks``. Default: train projector + LLM, freeze the vision tower."""
        for parameter in vision_parameters(model):
            parameter.requires_grad_(False)
        return model

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The trained tensors at the method's lr; a trained projector at ``projector_lr`` when set (LLaVA tunes it 10x slower)."""
        own = getattr(self.config, "lr", None)
        lr = lr if own is None else own
        trainable = [p for p in model.parameters() if p.requires_grad]
        projector_lr = getattr(self.config, "projector_lr", None)
        if projector_lr is None:
            return [{"params": trainable, "lr": lr}]
        projector = {id(p) for p in projector_parameters(model)}
        groups = [{"params": [p for p in trainable if id(p) not in projector], "lr": lr},
                  {"params": [p for p in trainable if id(p) in projector], "lr": projector_lr}]
        return [group for group in groups if group["params"]]

    # --- training hooks -----------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        """Called before stage ``stage`` trains."""

    def batch_context(self, samples: list[Sample], batch: dict[str, torch.Tensor]) -> ContextManager:
        """Wraps each training forward and each ``generate`` call: per-batch routing facts (templates, masks)."""
        return contextlib.nullcontext()

    def train_data(self, stage: int, samples: list[Sample]) -> list[Sample]:
        """The samples the stage trains on (and that ``after_stage`` sees)."""
        return samples

    def training_batches(self, samples: list[Sample], batch_size: int, seed: str) -> Iterator[list[Sample]]:
        """The stage's endless batch stream (replay mixes its memory into every batch here)."""
        return shuffled_batches(samples, batch_size, seed)

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """A regulariser added to the cross-entropy (EWC, LwF, O-LoRA)."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Gradient surgery between backward and the optimizer step (gradient projection)."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Weight updates after each step (EMA); the step's gradients are still readable."""

    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Consolidate after a stage (freeze, store bases, Fisher). Returns facts to record in the results."""
        return {}

    # --- evaluation ---------------------------------------------------------
    def eval_context(self, task: str, model: nn.Module) -> ContextManager:
        """Set up routing for evaluating ``task`` (task selectors, routers)."""
        return contextlib.nullcontext()

    def evaluation_records(self) -> list[Any]:
        """What the evaluation batches since the last call observed, one picklable record per sample (then forgotten).

        Collected after each evaluation set and gathered from every process in sample-share order.
        """
        return []

    def evaluation_facts(self, records: list[Any]) -> dict[str, Any]:
        """Facts (task-selector accuracy) from one stage's evaluation records of all processes, recorded with that stage."""
        return {}

    def trains(self) -> bool:
        return True

    # --- resume -------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that outlives a stage and is not in the model (bases, Fisher, frozen-row masks, replay memory).

        Stage checkpoints store this next to every parameter that has been trainable and every
        buffer; a resumed run rebuilds the model with the same seed, loads both, and must then
        behave exactly as the uninterrupted run did. Per-stage scratch (EMA within a stage,
        optimizer moments) need not be saved: a stage never resumes half-way.
        """
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""

    @classmethod
    def describe_config(cls) -> list[tuple[str, str, str, str]]:
        """(field, default, allowed range, help) for ``cvit-bench ls``."""
        rows = []
        for f in fields(cls.config_class):
            allowed = option_range(cls.config_class, f.name)
            rows.append((f.name, repr(f.default), "" if allowed is None else str(allowed), f.metadata.get("help", "")))
        return rows


METHODS: Registry[type[Method]] = Registry("method")


@torch.no_grad()
def forward_passes(method: Method, model: nn.Module, samples: list[Sample], collator, batch_size: int, max_batches: int) -> Iterator[dict]:
    """Gradient-free forwards over the first ``max_batches`` batches of ``samples``, under the method's routing.

    For consolidation after a stage (GPM bases, branch usage); yields each batch after its forward.
    """
    was_training = model.training
    model.eval()
    for start in range(0, min(len(samples), batch_size * max_batches), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collator.train_batch(chunk)
        with method.batch_context(chunk, batch):
            model(**batch)
        yield batch
    model.train(was_training)


def freeze_all_but_projector(model: nn.Module) -> None:
    """Adapter methods train only their adapters and the projector, as LLaVA-style CVIT does."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in projector_parameters(model):
        parameter.requires_grad_(True)
