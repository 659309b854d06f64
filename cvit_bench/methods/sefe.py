"""SEFE (Chen et al., ICML 2025): Answer Style Diversification of the training data, and RegLoRA.

RegLoRA, as the authors' code does it (see REFERENCE-FIELD.md). Every LLM linear carries one LoRA.
Each task trains a fresh one on a base into which every earlier task's LoRA is merged
(``W <- W + s·B_t A_t`` after task t, ``s = alpha / r``). Before the merge, the positions of the
top ``mask_fraction`` (2 %) of ``|B_t A_t|`` of each module, unscaled as in the authors'
key-element script, are added to the positions kept so far. While a later task trains, the loss
is ``CE + λ · mean over modules of mean over kept positions of |(B A)_ij|`` of the current LoRA,
λ = 2500. ``(B A)_ij = <B[i,:], A[:,j]>`` is computed at the kept positions only; the authors form
the whole ``B A`` per module at every step, which is the same value.

Kept positions are stored per module as int32 flat indices (``i · d_in + j``). A position kept
by several tasks is kept several times, as the authors' code concatenates the tasks' index lists
without de-duplicating: such a position weighs more in the mean, which protects what several
tasks found important more strongly. ``unique_positions=true`` de-duplicates instead and is
recorded as a deviation.

The merged base is not a trained tensor, so stage checkpoints do not hold it. The method's state
keeps every finished task's LoRA factors and a resumed run merges them again, in order, with the
same arithmetic (autocast off), which gives bit-identical base weights.

ASD. The authors rewrite a share X (20 %) of each task's training samples into the other answer
styles (yes/no, multiple choice, short answer, brief and detailed explanation) with a generator
model and release the converted files, not the converter. Offline, only rule-built styles are
possible: ``yes_no`` (is a candidate answer right? half ask about the right answer, half about a
distractor) and ``multiple_choice`` (the right answer among up to three distractors). Distractors
are a multiple-choice sample's other options, or else other answers of the same task. The chosen
samples alternate between the two styles, each taking the other one where it already has the
style. Every stage records the styles built and those not built.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cvit_bench.data.samples import Sample, Turn
from cvit_bench.methods.base import METHODS, Method, TuningConfig, option
from cvit_bench.methods.mixture import MixtureLoraLinear, inject_mixture, set_trainable
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Range
from cvit_bench.registry import ConfigError

ASD_STYLES = ("yes_no", "multiple_choice")
ASD_NOT_BUILT = ("short_answer", "brief_explanation", "detailed_explanation")  # explanations need a generator; short answer left out
YES_NO_INSTRUCTION = "{question}\nAnswer the question with yes or no."
CHOICE_INSTRUCTION = "{question}\nAnswer with the option's letter from the given choices directly."  # LLaVA-1.5's
LETTERS = "ABCD"
CHUNK_VALUES = 1 << 22  # gathered values per chunk of the penalty: bounds its memory at any number of kept positions


@dataclass(frozen=True)
class SefeConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of the LoRA and the projector (authors: 2e-4 at 7B, projector 2e-5; tiny runs use seqlora's 1e-3)", POSITIVE)
    r: int = option(8, "LoRA rank (authors: 128 at hidden 4096; tiny: seqlora's 8)", AT_LEAST_ONE)
    alpha: float = option(16.0, "LoRA alpha; the merge scales B A by alpha / r = 2, as the authors' 256 / 128", POSITIVE)
    reg_lambda: float = option(2500.0, "λ of the RegLoRA penalty (authors: 2500; kept at the tiny scale, the penalty being a mean)", NON_NEGATIVE)
    mask_fraction: float = option(0.02, "share of each module's |B A| positions kept after a task (authors: top 2 %)", Range(0, 1, low_open=True))
    unique_positions: bool = option(False, "de-duplicate positions kept by several tasks (authors' code keeps duplicates: they weigh more)")
    asd_share: float = option(0.2, "share X of each task's training samples rewritten into other answer styles (authors: 20 %)", FRACTION)
    train_projector: bool = option(True, "train the projector, shared across tasks, as LLaVA LoRA tuning does")

    def deviations(self) -> list[str]:
        """Where this configuration departs from the authors' method (recorded with every stage); ASD always does, by its styles or its absence."""
        if self.asd_share == 0:
            found = ["asd_share=0: no answer style diversification (MCITlib's SEFE, RegLoRA only)"]
        else:
            found = [f"ASD builds only the rule-buildable styles {list(ASD_STYLES)}, not {list(ASD_NOT_BUILT)}"]
        if self.unique_positions:
            found.append("unique_positions: positions kept by several tasks count once in the penalty (authors' code: once per task)")
        return found


class AlwaysOn(nn.Module):
    """The gate of a one-expert :class:`MixtureLoraLinear`: the single LoRA is always on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, device=x.device, dtype=x.dtype)


# --- RegLoRA -------------------------------------------------------------------------------
def top_positions(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat int32 indices of the top ``fraction`` of ``|delta|``: ``int(fraction · numel)`` of them as the authors' script,
    at least one (their count of 0 on a tiny module would make the penalty's mean NaN)."""
    k = max(1, int(fraction * delta.numel()))
    return delta.abs().flatten().topk(k).indices.to(torch.int32).cpu()


class KeptPositionsAbsMean(torch.autograd.Function):
    """``mean_p |<B[i_p,:], A[:,j_p]>|`` over kept positions p, without forming ``B A``.

    Plain autograd would keep the gathered rows of B and columns of A, (positions × r) twice, which
    outgrows ``B A`` itself once more than 1/r of a module is kept; this keeps only the signs and
    computes the gradients chunk by chunk: dB[i] += sign_p · A[:, j_p] / n, dA[:, j] += sign_p · B[i_p] / n.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        step = max(1, CHUNK_VALUES // a.shape[0])
        values = torch.cat([(b[rows[s : s + step]] * a[:, cols[s : s + step]].T).sum(-1) for s in range(0, len(rows), step)])
        ctx.save_for_backward(a, b, rows, cols, values.sign())
        return values.abs().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, rows, cols, sign = ctx.saved_tensors
        weights = sign * (grad / len(sign))
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        step = max(1, CHUNK_VALUES // a.shape[0])
        for s in range(0, len(rows), step):
            r, c, w = rows[s : s + step], cols[s : s + step], weights[s : s + step, None]
            grad_b.index_add_(0, r, w * a[:, c].T)
            grad_a.index_add_(1, c, (w * b[r]).T)
        return grad_a, grad_b, None, None


def kept_abs_mean(a: torch.Tensor, b: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``mean |(B A)_ij|`` over flat positions ``i · d_in + j`` (duplicates count once each): A (r, d_in), B (d_out, r)."""
    positions = positions.to(a.device, torch.long)
    return KeptPositionsAbsMean.apply(a, b, positions // a.shape[1], positions % a.shape[1])


@torch.no_grad()
def merge_into_base(layer: MixtureLoraLinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """``W <- W + s·B A`` in fp32, rounded once to the weight's dtype; autocast off, so a resumed run's merge is bit-identical."""
    weight = layer.base.weight
    with torch.autocast(weight.device.type, enabled=False):
        delta = layer.scaling * (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32))
        weight.copy_((weight.float() + delta).to(weight.dtype))


# --- ASD -----------------------------------------------------------------------------------
def bare_question(sample: Sample) -> str:
    """The record's question: the sample's last prompt without its phrasing's instruction around ``{question}``."""
    prefix, _, suffix = (part.replace("{{", "{").replace("}}", "}") for part in sample.instruction.partition("{question}"))
    prompt = sample.turns[-1].prompt
    if not (prompt.startswith(prefix) and prompt.endswith(suffix)):
        raise ValueError(f"sample {sample.id}: its prompt does not follow its instruction {sample.instruction!r}")
    return prompt[len(prefix) : len(prompt) - len(suffix)]


def answer_text(sample: Sample) -> str:
    """The right answer as text: a multiple-choice sample's option behind its letter, else its answer."""
    if sample.options and len(sample.answer) == 1 and 0 <= ord(sample.answer) - ord("A") < len(sample.options):
        return sample.options[ord(sample.answer) - ord("A")]
    return sample.answer


def answer_style(sample: Sample) -> str:
    """The sample's own answer style: multiple_choice, yes_no or open."""
    if sample.options:
        return "multiple_choice"
    return "yes_no" if sample.answer.strip().lower() in ("yes", "no") else "open"


def _stem(sample: Sample) -> str:
    """The question without a multiple-choice listing of options."""
    return re.split(r"\n[A-Z]\. ", bare_question(sample), maxsplit=1)[0]


def _rewritten(sample: Sample, style: str, question: str, instruction: str, answer: str, options: tuple[str, ...]) -> Sample:
    image = sample.turns[-1].image
    return replace(sample, id=f"{sample.id}-asd", turns=sample.turns[:-1] + (Turn(image, instruction.format(question=question)),),
                   target=answer, answer=answer, answers=(answer,), options=options, box=(),
                   contract="yes_no" if style == "yes_no" else "letter", phrasing_id=f"asd/{style}", instruction=instruction)


def yes_no_sample(sample: Sample, candidate: str) -> Sample:
    """Is ``candidate`` the answer? yes when it is the sample's right answer."""
    answer = "yes" if candidate.strip().lower() == answer_text(sample).strip().lower() else "no"
    return _rewritten(sample, "yes_no", f'{_stem(sample)}\nIs the answer "{candidate}"?', YES_NO_INSTRUCTION, answer, ())


def multiple_choice_sample(sample: Sample, distractors: list[str], rng: random.Random) -> Sample:
    """The right answer among ``distractors`` (at most three) in shuffled order; the answer is its letter."""
    options = [answer_text(sample), *distractors[: len(LETTERS) - 1]]
    rng.shuffle(options)
    listing = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, options))
    return _rewritten(sample, "multiple_choice", _stem(sample) + listing, CHOICE_INSTRUCTION, LETTERS[options.index(answer_text(sample))],
                      tuple(options))


def distractor_pool(sample: Sample, task_answers: list[str]) -> list[str]:
    """Wrong answers for ``sample``, case-insensitively distinct: its other options, the opposite of a yes/no answer, or else
    the task's other open answers."""
    right = answer_text(sample).strip().lower()
    if sample.options:
        pool = list(sample.options)
    elif answer_style(sample) == "yes_no":
        pool = ["no" if right == "yes" else "yes"]
    else:  # an open question's distractors are open answers: "yes" is no plausible count or colour
        pool = [text for text in task_answers if text.strip().lower() not in ("yes", "no")]
    seen, distinct = {right}, []
    for text in pool:
        if text.strip().lower() not in seen:
            seen.add(text.strip().lower())
            distinct.append(text)
    return distinct


def diversify(samples: list[Sample], share: float, rng: random.Random) -> tuple[list[Sample], Counter]:
    """ASD: ``round(share · n)`` of each task's samples rewritten in place, alternating yes/no and multiple choice (a sample
    already in one style takes the other); a sample without any distractor stays as it is. Returns the samples and the
    count of each style built."""
    result, built = list(samples), Counter()
    by_task: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(index)
    for indices in by_task.values():
        answers = sorted({answer_text(samples[i]) for i in indices})
        for turn, index in enumerate(rng.sample(indices, round(share * len(indices)))):
            sample = samples[index]
            style = ASD_STYLES[turn % 2]
            if style == answer_style(sample):
                style = ASD_STYLES[1 - turn % 2]
            distractors = distractor_pool(sample, answers)
            if not distractors:
                continue
            rng.shuffle(distractors)
            if style == "yes_no":
                result[index] = yes_no_sample(sample, answer_text(sample) if built["yes_no"] % 2 == 0 else distractors[0])
            else:
                result[index] = multiple_choice_sample(sample, distractors, rng)
            built[style] += 1
    return result, built


@METHODS.register("sefe")
class Sefe(Method):
    """A fresh LoRA per task on the merged base, regularised at the top 2 % positions of earlier tasks; ASD on the data."""

    name = "sefe"
    config_class = SefeConfig

    def __init__(self, config: SefeConfig | None = None) -> None:
        super().__init__(config)
        self.layers: dict[str, MixtureLoraLinear] = {}
        self.positions: list[torch.Tensor] = []  # per module: int32 flat indices kept so far (empty before the first task ends)
        self.finished: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per merged task, per module: its LoRA (A, B) on the CPU
        self.device_positions: list[torch.Tensor] = []
        self.penalty_trace: list[torch.Tensor] = []
        self.asd_built: Counter = Counter()

    # --- model -------------------------------------------------------------
    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        c = self.config
        self.layers = inject_mixture(model, module_map_for(model).llm_linears,
                                     lambda name, base: MixtureLoraLinear(base, 1, c.r, c.alpha / c.r, AlwaysOn()))
        set_trainable(model, self.layers, c.train_projector)
        return model

    # --- data --------------------------------------------------------------
    def train_data(self, stage: int, samples: list[Sample]) -> list[Sample]:
        """ASD: a share of the stage's samples in other answer styles (the same ones on a resumed run: the seed is the run's)."""
        diversified, self.asd_built = diversify(samples, self.config.asd_share, random.Random(f"{torch.initial_seed()}-sefe-asd-{stage}"))
        return diversified

    # --- training ----------------------------------------------------------
    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        if any(isinstance(layer.base.weight, DTensor) for layer in self.layers.values()):
            raise ConfigError("sefe merges each task's LoRA into the base weights, which FSDP shards; run it without --use_fsdp")
        self.penalty_trace = []
        self.device_positions = [p.to(layer.lora_A.device, torch.long) for p, layer in zip(self.positions, self.layers.values())]

    def penalty(self) -> torch.Tensor:
        """Mean over modules of the mean |(B A)_ij| of the current LoRA at the kept positions (unscaled, as the authors)."""
        terms = [kept_abs_mean(layer.lora_A[0], layer.lora_B[0], kept) for layer, kept in zip(self.layers.values(), self.device_positions)]
        return torch.stack(terms).mean()

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        if not self.device_positions or self.config.reg_lambda == 0:
            return None
        penalty = self.penalty()
        self.penalty_trace.append(penalty.detach())
        return self.config.reg_lambda * penalty

    @torch.no_grad()
    def after_stage(self, stage: int, model: nn.Module, samples: list[Sample], collator) -> dict[str, Any]:
        """Keep the task's top positions, merge its LoRA into the base, and start the next task from a fresh LoRA."""
        factors, positions, generator = [], [], torch.Generator().manual_seed(torch.initial_seed() + stage)
        for index, layer in enumerate(self.layers.values()):
            a, b = layer.lora_A[0].detach().float(), layer.lora_B[0].detach().float()
            with torch.autocast(a.device.type, enabled=False):
                kept = top_positions(b @ a, self.config.mask_fraction)
            if self.positions:
                kept = torch.cat([self.positions[index], kept])
            positions.append(kept.unique() if self.config.unique_positions else kept)
            factors.append((a.cpu().clone(), b.cpu().clone()))
            merge_into_base(layer, a, b)
            fresh = torch.empty(layer.lora_A.shape[1:]).uniform_(-1, 1, generator=generator) / layer.base.in_features ** 0.5
            layer.lora_A[0] = fresh.to(layer.lora_A.device, layer.lora_A.dtype)
            layer.lora_B.zero_()
        self.positions = positions
        self.finished.append(factors)
        facts: dict[str, Any] = {"kept_positions": sum(len(p) for p in self.positions), "asd_styles_built": dict(self.asd_built),
                                 "asd_styles_not_built": list(ASD_NOT_BUILT), "deviations": self.config.deviations()}
        if self.penalty_trace:
            facts.update(regularizer_first=float(self.penalty_trace[0]), regularizer_last=float(self.penalty_trace[-1]))
        self.penalty_trace = []
        return facts

    # --- resume ------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Kept positions per module and every merged task's LoRA factors (the merged base is rebuilt from them)."""
        state = {f"positions.{m}": kept for m, kept in enumerate(self.positions)}
        for t, factors in enumerate(self.finished):
            for m, (a, b) in enumerate(factors):
                state[f"task{t}.A.{m}"], state[f"task{t}.B.{m}"] = a, b
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the kept positions and merge every finished task's LoRA into the freshly loaded base again, in order."""
        modules = len(self.layers)
        self.positions = [state[f"positions.{m}"].clone() for m in range(modules) if f"positions.{m}" in state]
        self.finished = []
        while f"task{len(self.finished)}.A.0" in state:
            t = len(self.finished)
            self.finished.append([(state[f"task{t}.A.{m}"].clone(), state[f"task{t}.B.{m}"].clone()) for m in range(modules)])
        for factors in self.finished:
            for layer, (a, b) in zip(self.layers.values(), factors):
                merge_into_base(layer, a, b)
