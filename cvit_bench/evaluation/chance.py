"""Image-blind chance and CIDEr ceilings of a suite's tasks, measured the way the suite declares them.

A task's ``chance`` is what the best *constant* reply scores on its test set: a model that ignores
the image and the question can reach it by learning the most rewarding answer, so a score near it
says nothing was learned. Candidates are every distinct reference answer of the task's training
set (a task without one, an unseen task, takes its test set's: an upper bound on any constant a
model could have learned); chance is the best candidate's score, maximised over the data seeds.
A CIDEr task's ``ceiling`` is the mean leave-one-out CIDEr of its references (what another
annotator scores), also maximised over seeds. ``cvit-bench chance`` prints both and flags declared
values that differ from them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cvit_bench.data.samples import phrase_all
from cvit_bench.evaluation.scoring import constant_reply_cider, reference_cider, score_task
from cvit_bench.suites.materialize import SuiteData, materialize
from cvit_bench.suites.schema import Suite, TaskSpec

DECLARED_TOLERANCE = 0.05  # declared values are rounded to one decimal


@dataclass(frozen=True)
class TaskChance:
    task: str
    scorer: str
    chance: float  # best constant reply's score (x 100, the task's scale), max over seeds
    best_reply: str  # the constant that reached it
    ceiling: float | None  # CIDEr tasks: mean leave-one-out CIDEr x 100 of the references, max over seeds
    declared_chance: float | None
    declared_ceiling: float | None

    def mismatches(self) -> list[str]:
        """The declared values that differ from the measured ones (a missing declaration counts)."""
        pairs = [("chance", self.declared_chance, self.chance), ("ceiling", self.declared_ceiling, self.ceiling)]
        return [f"{name} declared {declared} but measured {measured:.1f}" for name, declared, measured in pairs
                if measured is not None and (declared is None or abs(declared - measured) > DECLARED_TOLERANCE)]


def constant_scores(scorer: str, candidates: list[str], samples: list[dict]) -> np.ndarray:
    """Mean score x 100 of each candidate given as the reply to every sample."""
    if scorer == "cider":
        return 100 * np.asarray(constant_reply_cider(candidates, [sample["answers"] for sample in samples]))
    return np.array([100 * np.mean(score_task(scorer, [reply] * len(samples), samples).per_sample) for reply in candidates])


def _answers(records: Iterable) -> list[str]:
    return sorted({answer for record in records for answer in (record.answer, *record.answers) if answer.strip()})


def _seed_chance(task: TaskSpec, data: SuiteData) -> tuple[float, str, float | None]:
    test = data.records(task.name, "test")
    train = data.records(task.name, "train") if task.train_size or max(task.shots) else []
    samples = [sample.scoring_fields for sample in phrase_all(test, task.name, task.template.train[:1])]
    candidates = _answers(train or test)
    scores = constant_scores(task.scorer, candidates, samples)
    best = int(np.argmax(scores))
    ceiling = 100 * reference_cider([sample["answers"] for sample in samples]) if task.scorer == "cider" else None
    return float(scores[best]), candidates[best], ceiling


def measure_chance(suite: Suite, seeds: Iterable[int] = (0, 1, 2)) -> list[TaskChance]:
    """Chance (and CIDEr ceilings) of every seen and unseen task of a suite, maximised over ``seeds``."""
    per_seed = [{task.name: _seed_chance(task, data) for task in suite.tasks + suite.unseen}
                for data in (materialize(suite, seed) for seed in seeds)]
    rows = []
    for task in suite.tasks + suite.unseen:
        measured = [seed[task.name] for seed in per_seed]
        chance, reply, _ = max(measured, key=lambda m: m[0])
        ceilings = [m[2] for m in measured if m[2] is not None]
        rows.append(TaskChance(task.name, task.scorer, chance, reply, max(ceilings) if ceilings else None, task.chance, task.ceiling))
    return rows
