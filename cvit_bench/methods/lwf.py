"""Learning without forgetting on seqlora: distil the model as it was before the task into the one being trained.

The teacher needs no second model in memory: before each task after the first, the trainable
tensors are copied, and the teacher's forward is the same model called with those copies
(``torch.func.functional_call``). The loss is λ · T² · KL(teacher ‖ student) at temperature T,
averaged over the new task's answer tokens (the positions the cross-entropy trains).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cvit_bench.methods.base import METHODS, Method, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.ranges import NON_NEGATIVE, POSITIVE


@dataclass(frozen=True)
class LwfConfig(LoraMethodConfig):
    lwf_lambda: float = option(1.0, "weight λ of the distillation term", NON_NEGATIVE)
    temperature: float = option(2.0, "softmax temperature T of teacher and student", POSITIVE)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) per answer token, averaged; logits at position i predict labels at i + 1.

    Computed in fp32 whatever the model's dtype: in bf16 the two log-softmaxes of nearly equal
    logits differ by less than their rounding, and the KL would be noise.
    """
    answer = labels[:, 1:] != -100
    student = student_logits[:, :-1][answer].float() / temperature
    teacher = teacher_logits[:, :-1][answer].float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean")
    return temperature**2 * kl


@METHODS.register("lwf")
class Lwf(Method):
    """LoRA with a distillation term that keeps the new task's answers close to the previous model's."""

    name = "lwf"
    config_class = LwfConfig

    def __init__(self, config: LwfConfig | None = None) -> None:
        super().__init__(config)
        self.model: nn.Module | None = None
        self.teacher: dict[str, torch.Tensor] = {}

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        self.model = attach_lora(model, self.config)
        return self.model

    def before_stage(self, stage: int, tasks: tuple[str, ...], model: nn.Module) -> None:
        if stage > 1:
            self.teacher = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        if not self.teacher:
            return None
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with torch.no_grad():
            teacher_logits = functional_call(self.model, self.teacher, args=(), kwargs=inputs).logits
        return self.config.lwf_lambda * distillation_loss(outputs.logits, teacher_logits, batch["labels"], self.config.temperature)
