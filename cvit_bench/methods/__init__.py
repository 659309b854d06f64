"""Continual-learning methods, registered by name in :data:`METHODS`."""
from cvit_bench.methods import bounds, branchlora, clmoe, ewc, hide, llaca, lwf, modalprompt, moelora, olora, pegp, replay, sefe, sequential, smolora  # noqa: F401  (registration side effect)
from cvit_bench.methods.base import METHODS, Method, MethodConfig, StagePlan, TuningConfig

__all__ = ["METHODS", "Method", "MethodConfig", "StagePlan", "TuningConfig"]
