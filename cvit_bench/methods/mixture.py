"""Mixture-of-LoRA building blocks shared by MoELoRA, SMoLoRA, BranchLoRA and O-LoRA.

:class:`MixtureLoraLinear` wraps a base ``nn.Linear`` (as peft's LoRA layers do) with
E low-rank experts and computes all of them in two matmuls: the stacked down-projections
give an (E·r)-wide activation, the router's gates scale each expert's r columns, and the
stacked up-projections map back. A gate of 0 removes an expert exactly, so dense,
top-k, top-1 and "sum of all slices" routing are the same code path; the cost equals
one LoRA of rank E·r (for top-k at 7B a gather would save the unused experts' work).

Routers are small modules that turn the layer input into gates; what they need beyond
it (an attention mask, per-sample template embeddings, a task index) comes from the
:class:`Routing` the method binds around each batch.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cvit_bench.data.samples import Sample
from cvit_bench.methods.base import freeze_all_but_projector


class Routing:
    """Per-batch facts the routers of one model read, bound by the method for one forward or one ``generate``.

    Routers that decide once per sequence compute on the first call of a batch (the
    prefill) and reuse the decision for the cached decoding steps, whose input is one
    token.
    """

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}
        self.cache: dict[Any, Any] = {}

    @contextlib.contextmanager
    def bind(self, **facts: Any) -> Iterator["Routing"]:
        self.facts, self.cache = facts, {}
        try:
            yield self
        finally:
            self.facts, self.cache = {}, {}

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def per_row(self, name: str, rows: int) -> torch.Tensor:
        """A per-sample fact repeated to per-image rows where a layer sees one row per image (the projector)."""
        value = self.facts[name]
        if value.shape[0] == rows:
            return value
        return value.repeat_interleave(self.facts["images_per_sample"].to(value.device), dim=0)

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, d) at each row's first real token: generation batches are left-padded, so position 0 may be padding."""
        mask = self.facts.get("attention_mask")
        if mask is None or mask.shape != x.shape[:2]:
            return x[:, 0]
        return x[torch.arange(x.shape[0], device=x.device), mask.argmax(dim=1)]

    def sequence_mean(self, x: torch.Tensor) -> torch.Tensor:
        """One summary row per sample (B, T, d), or per image where a projector sees images.

        Padding is ignored where the attention mask covers ``x``. A packed projector input
        (Qwen2-VL's merger: all images' tokens in one (N, d) matrix) is averaged per image.
        """
        if x.dim() == 2:
            return _segment_mean(x, self.facts["rows_per_image"])
        mask = self.facts.get("attention_mask")
        if mask is None or mask.shape != x.shape[:2]:
            return x.mean(dim=1)
        weights = mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)

    def spread(self, per_unit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample (or per-image) values made broadcastable against ``x``'s rows: over positions, or over packed image tokens."""
        if x.dim() == 2:
            return per_unit.repeat_interleave(self.facts["rows_per_image"], dim=0)
        return per_unit[:, None]


def _segment_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths.to(x.device))
    sums = torch.zeros(len(lengths), x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, segment, x)
    return sums / lengths.to(x.device, x.dtype)[:, None]


class MixtureLoraLinear(nn.Module):
    """``base(x) + scaling · Σ_e gate_e(x) · B_e A_e x`` with all experts in two matmuls.

    ``shared_a`` keeps one down-projection for every expert (BranchLoRA's trunk). Experts and
    router are created in fp32 whatever the base's dtype, as peft keeps LoRA weights
    (``autocast_adapter_dtype``): bf16 weights would round away small optimizer updates.
    The input is cast to the experts' dtype and the delta back to the base output's.
    """

    def __init__(self, base: nn.Linear, n_experts: int, rank: int, scaling: float, router: nn.Module, shared_a: bool = False) -> None:
        super().__init__()
        self.base = base
        self.n_experts, self.rank, self.scaling = n_experts, rank, scaling
        self.router = router
        a_rows = 1 if shared_a else n_experts
        self.lora_A = nn.Parameter(torch.empty(a_rows, rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, base.out_features, rank))
        bound = 1 / math.sqrt(base.in_features)  # peft's kaiming_uniform(a=√5) bound for the A matrix
        nn.init.uniform_(self.lora_A, -bound, bound)

    def expert_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``A_e x`` for every expert: (..., E, r)."""
        h = (x @ self.lora_A.flatten(0, 1).T).unflatten(-1, (self.lora_A.shape[0], self.rank))
        return h.expand(*h.shape[:-2], self.n_experts, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.dtype)  # experts and routers compute in their own dtype (fp32 under a bf16 base, as peft's LoRA)
        gates = self.router(x)  # broadcastable to (..., E)
        h = self.expert_activations(x) * gates.unsqueeze(-1)
        up = self.lora_B.permute(1, 0, 2).flatten(1)  # (d_out, E·r), column e·r + k = B_e[:, k]
        return result + ((h.flatten(-2) @ up.T) * self.scaling).to(result.dtype)


def inject_mixture(model: nn.Module, pattern: str, build: Callable[[str, nn.Linear], MixtureLoraLinear]) -> dict[str, MixtureLoraLinear]:
    """Replace every ``nn.Linear`` whose full name matches ``pattern`` by ``build(name, linear)``."""
    compiled = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and compiled.fullmatch(n)]
    if not names:
        raise ValueError(f"no linear layer matches {pattern!r}")
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = build(name, getattr(parent, child))
        setattr(parent, child, layers[name])
    return layers


class SliceFreezer:
    """Keeps chosen rows (experts, branches, task slices) of parameters bit-identical while the rest trains.

    Gradients of frozen rows are zeroed (so they neither move nor count in clipping) and
    the rows are restored after the optimizer step, which also undoes weight decay.
    """

    def __init__(self) -> None:
        self.frozen: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}

    def freeze(self, parameter: nn.Parameter, rows: torch.Tensor) -> None:
        """Freeze ``rows`` (indices along dim 0) of ``parameter`` at their current values, adding to earlier ones."""
        mask = torch.zeros(parameter.shape[0], dtype=torch.bool, device=parameter.device)
        if parameter in self.frozen:
            mask |= self.frozen[parameter][0]
        mask[rows] = True
        self.frozen[parameter] = (mask, parameter.detach().clone())

    def zero_grads(self) -> None:
        for parameter, (mask, _) in self.frozen.items():
            if parameter.grad is not None:
                parameter.grad[mask] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, (mask, saved) in self.frozen.items():
            parameter[mask] = saved[mask]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Frozen-row masks by parameter name; the frozen values live in the model's own weights."""
        names = {parameter: name for name, parameter in model.named_parameters()}
        return {f"frozen.{names[parameter]}": mask for parameter, (mask, _) in self.frozen.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Re-freeze the saved rows at the model's current (restored) values, which are the values they were frozen at."""
        parameters = dict(model.named_parameters())
        self.frozen = {}
        for key, mask in state.items():
            if key.startswith("frozen."):
                parameter = parameters[key.removeprefix("frozen.")]
                self.frozen[parameter] = (mask.to(parameter.device, copy=True), parameter.detach().clone())

    def frozen_rows(self, parameter: nn.Parameter) -> list[int]:
        entry = self.frozen.get(parameter)
        return [] if entry is None else entry[0].nonzero().flatten().tolist()


def prompt_text_features(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean input embedding of each prompt's text tokens (not image tokens, padding or the answer).

    A text feature every checkpoint has without a separate text encoder; the embedding table
    is frozen by every adapter method, so the feature of a prompt never drifts.
    """
    ids = batch["input_ids"]
    keep = batch["attention_mask"].bool() & (ids != model.config.image_token_id)
    if "labels" in batch:
        keep &= batch["labels"] == -100
    with torch.no_grad():
        embedded = model.get_input_embeddings()(ids)
    weights = keep.to(embedded.dtype).unsqueeze(-1)
    return (embedded * weights).sum(1) / weights.sum(1).clamp_min(1)


def question_texts(samples: list[Sample]) -> list[str]:
    """Each sample's question as sent, options and instruction included, no system prompt or answer: the text both
    HiDe-LLaVA's and ModalPrompt's code give CLIP's text encoder (the first human turn; here the question's own turn,
    so a few-shot sample is represented by its question, not its first example)."""
    return [sample.turns[-1].prompt for sample in samples]


def selection_facts(records: list[tuple[str, int]], prefix: str) -> dict[str, Any]:
    """``PREFIX_accuracy`` overall and per task from (task, 1 if its own task was chosen) records of one stage's evaluation."""
    if not records:
        return {}
    hits: dict[str, list[int]] = {}
    for task, hit in records:
        hits.setdefault(task, []).append(hit)
    total = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return {f"{prefix}_accuracy": 100 * total, f"{prefix}_accuracy_per_task": {t: 100 * sum(v) / len(v) for t, v in hits.items()},
            f"{prefix}_samples": len(records)}


def set_trainable(model: nn.Module, layers: dict[str, MixtureLoraLinear], train_projector: bool) -> None:
    """Freeze the whole model, then unfreeze the adapters, routers' trainable parts and (optionally) the projector."""
    freeze_all_but_projector(model)
    if not train_projector:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    for layer in layers.values():
        for name, parameter in layer.named_parameters():
            if not name.startswith("base."):
                parameter.requires_grad_(True)
