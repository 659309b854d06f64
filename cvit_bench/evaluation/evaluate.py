"""Score one evaluation set twice: visual understanding (lenient) and instruction following (strict format)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cvit_bench.data.samples import Sample
from cvit_bench.evaluation.contracts import check_contract
from cvit_bench.evaluation.scoring import extracted_answer, score_task
from cvit_bench.metrics import bootstrap_interval


@dataclass
class EvalSet:
    """A named list of phrased samples scored with one scorer (a column of one matrix)."""

    name: str
    task: str
    scorer: str
    samples: list[Sample]
    max_new_tokens: int


@dataclass
class SetScores:
    vu: float  # mean VU score x 100 (CIDEr x 100 for caption scorers)
    if_rate: float  # % of replies obeying the format contract
    strict: float  # mean of VU x IF-pass, x 100: right content in the right form
    vu_interval: tuple[float, float]  # 95 % bootstrap interval of ``vu`` over the set's items
    if_interval: tuple[float, float]  # the same for ``if_rate``
    predictions: list[dict] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def score_set(eval_set: EvalSet, replies: list[str], prompts: list[str]) -> SetScores:
    """Per-sample VU and IF scores plus their means; ``predictions`` keeps every reply with both, the prompt as the model
    was sent it (``prompts``, in sample order) and the answer the scorer read from the reply."""
    samples = eval_set.samples
    task_scores = score_task(eval_set.scorer, replies, [s.scoring_fields for s in samples])
    checks = [
        check_contract(s.contract, reply, ground_truth=s.target, n_options=len(s.options) or None)
        for s, reply in zip(samples, replies)
    ]
    vu = np.asarray(task_scores.per_sample, dtype=float)
    passed = np.asarray([c.passed for c in checks], dtype=float)
    predictions = [
        {
            "set": eval_set.name,
            "id": s.id,
            "phrasing": s.phrasing_id,
            "contract": s.contract,
            "prompt": prompt,
            "prediction": reply,
            "extracted": extracted_answer(eval_set.scorer, reply, s.scoring_fields),
            "target": s.target,
            "vu": float(v),
            "if_pass": c.passed,
            "if_reason": c.reason,
        }
        for s, prompt, reply, v, c in zip(samples, prompts, replies, vu, checks)
    ]
    return SetScores(
        vu=float(vu.mean() * 100),
        if_rate=float(passed.mean() * 100),
        strict=float((vu * passed).mean() * 100),
        vu_interval=bootstrap_interval(vu * 100),
        if_interval=bootstrap_interval(passed * 100),
        predictions=predictions,
        extra=dict(task_scores.extra),
        skipped=dict(task_scores.skipped),
    )
