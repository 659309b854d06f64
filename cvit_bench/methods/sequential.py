"""Sequential fine-tuning baselines: the lower bounds every continual method must beat."""
from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, get_peft_model
from torch import nn

from cvit_bench.methods.base import METHODS, Method, TuningConfig, freeze_all_but_projector, option
from cvit_bench.models.backend import module_map_for
from cvit_bench.ranges import AT_LEAST_ONE, FRACTION, POSITIVE


@METHODS.register("seqft")
class SequentialFineTuning(Method):
    """Full fine-tuning of projector + LLM on each task in turn (vision tower frozen)."""

    name = "seqft"


@dataclass(frozen=True)
class LoraMethodConfig(TuningConfig):
    lr: float | None = option(1e-3, "learning rate of adapters and projector", POSITIVE)
    r: int = option(8, "LoRA rank (paper: 128 at hidden 4096; scaled to keep alpha/r = 2 on the tiny model)", AT_LEAST_ONE)
    alpha: int = option(16, "LoRA alpha (paper: 256)", POSITIVE)
    dropout: float = option(0.0, "LoRA dropout (LLaVA-1.5 uses 0.05; 0 keeps tiny runs deterministic and fast)", FRACTION)


def attach_lora(model: nn.Module, config: LoraMethodConfig, targets: str | None = None, train_projector: bool = True) -> nn.Module:
    """peft LoRA on ``targets`` (default: every LLM linear); the projector stays trainable unless told otherwise
    (LLaVA-1.5 LoRA tuning trains it)."""
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets or module_map_for(model).llm_linears,
        bias="none",
    )
    wrapped = get_peft_model(model, lora)
    freeze_all_but_projector(wrapped)
    if not train_projector:
        for parameter in wrapped.parameters():
            parameter.requires_grad_(False)
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    return wrapped


@METHODS.register("seqlora")
class SequentialLora(Method):
    """One LoRA adapter trained on each task in turn."""

    name = "seqlora"
    config_class = LoraMethodConfig

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        return attach_lora(model, self.config)
