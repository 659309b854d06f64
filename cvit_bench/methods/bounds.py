"""Reference bounds: multitask training (upper) and the untouched starting checkpoint (zero-shot)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cvit_bench.methods.base import METHODS, Method, MethodConfig, StagePlan, TuningConfig, option
from cvit_bench.methods.sequential import LoraMethodConfig, attach_lora
from cvit_bench.ranges import AT_LEAST_ONE, POSITIVE


@dataclass(frozen=True)
class JointConfig(TuningConfig):
    lora: bool = option(False, "train a LoRA adapter (like seqlora) instead of full fine-tuning (like seqft)")
    r: int = option(LoraMethodConfig.r, "LoRA rank when lora is true", AT_LEAST_ONE)
    alpha: int = option(LoraMethodConfig.alpha, "LoRA alpha when lora is true", POSITIVE)


@METHODS.register("joint")
class Joint(Method):
    """Multitask upper bound: one stage on the union of all tasks with the same total step budget.

    Every row 1..T of its matrices is the evaluation of the single final model, so
    BWT and forgetting are 0 by construction and AP is the number to compare.
    """

    name = "joint"
    config_class = JointConfig

    def stage_plan(self, tasks: list[str], steps_per_task: int) -> list[StagePlan]:
        return [StagePlan(tuple(tasks), steps_per_task * len(tasks), tuple(range(1, len(tasks) + 1)))]

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        if self.config.lora:
            return attach_lora(model, LoraMethodConfig(lr=self.config.lr, r=self.config.r, alpha=self.config.alpha))
        return super().wrap_model(model, tasks)


@METHODS.register("zeroshot")
class ZeroShot(Method):
    """No training: every row is the starting checkpoint (the floor any tuning must clear)."""

    name = "zeroshot"
    config_class = MethodConfig

    def stage_plan(self, tasks: list[str], steps_per_task: int) -> list[StagePlan]:
        return [StagePlan((), 0, tuple(range(1, len(tasks) + 1)))]

    def trains(self) -> bool:
        return False
