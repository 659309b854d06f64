"""One continual run: stage 0 evaluation, then train/evaluate per stage, then results.

The runner knows nothing about any particular method: the method's stage plan says
what each stage trains and which matrix rows its evaluation fills, and its hooks do
the rest.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.evaluation.evaluate import EvalSet, score_set
from cvit_bench.evaluation.generate import generate
from cvit_bench.io import atomic_write_json, atomic_write_text, to_jsonable
from cvit_bench.methods import METHODS, Method
from cvit_bench.metrics import all_metrics
from cvit_bench.models.backend import load_model
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.registry import ConfigError
from cvit_bench.suites.materialize import SuiteData, materialize
from cvit_bench.suites.schema import REPO_ROOT, Suite
from cvit_bench.training.loop import train_stage

MATRIX_KINDS = ("vu", "if", "strict")


@dataclass
class RunOptions:
    suite: Suite
    method: str
    seed: int = 0
    results_dir: Path = Path("results")
    model: str | None = None  # local dir / hub id; None = the suite's embedded tiny base checkpoint
    data_root: Path | None = None
    method_overrides: dict[str, Any] = field(default_factory=dict)
    steps_per_task: int | None = None
    run_id: str | None = None


@dataclass
class EvalPlan:
    """The columns of the three matrix groups, as evaluation sets."""

    seen: list[EvalSet]
    unseen: list[EvalSet]
    heldout: list[EvalSet]

    def groups(self) -> dict[str, list[EvalSet]]:
        return {"seen": self.seen, "unseen": self.unseen, "heldout": self.heldout}


def build_method(name: str, overrides: dict[str, Any]) -> Method:
    """Instantiate a registered method; unknown options fail with the valid field names."""
    cls = METHODS.get(name)
    valid = {f.name: f for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"method {name!r}: unknown option(s) {unknown} (valid: {sorted(valid)})")
    return cls(cls.config_class(**overrides))


def build_eval_plan(suite: Suite, data: SuiteData, collator: Collator, seed: int) -> EvalPlan:
    margin = suite.evaluation.max_new_tokens_margin

    def make(name: str, task, phrasings, shots: int = 0) -> EvalSet:
        records = data.records(task.name, "test")
        pool = data.records(task.name, "train") if shots else None
        samples = phrase_all(records, task.name, phrasings, shots=shots, shot_pool=pool, seed=seed)
        return EvalSet(name, task.name, task.scorer, samples, collator.target_length(samples) + margin)

    setting = suite.instruction_setting
    seen = [make(t.name, t, t.template.training_phrasings(setting)) for t in suite.tasks]
    heldout = [make(t.name, t, t.template.heldout) for t in suite.tasks]
    unseen = [
        make(t.name if t.shots == (0,) else f"{t.name}-{k}shot", t, t.template.training_phrasings("single"), shots=k)
        for t in suite.unseen
        for k in t.shots
    ]
    return EvalPlan(seen, unseen, heldout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def provenance() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "pycocoevalcap", "rapidfuzz", "numpy", "pillow", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["cvit-bench"] = metadata.version("cvit-bench")
    versions["python"] = platform.python_version()

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
    }


class Reporter:
    """Progress callbacks (the CLI supplies a rich implementation; tests use the silent default)."""

    def stage(self, stage: int, tasks: tuple[str, ...], steps: int) -> None: ...
    def step(self, step: int, loss: float, samples_per_s: float) -> None: ...
    def evaluating(self, stage: int, name: str, done: int, total: int) -> None: ...
    def message(self, text: str) -> None: ...


def evaluate_all(model, method: Method, collator: Collator, plan: EvalPlan, batch_size: int, stage: int, reporter: Reporter):
    """Scores for every evaluation set: {group: [SetScores per column]}, plus generation statistics."""
    results: dict[str, list] = {}
    generated = 0
    for group, sets in plan.groups().items():
        results[group] = []
        for eval_set in sets:
            with method.eval_context(eval_set.task, model):
                replies, tokens = generate(
                    model, collator, eval_set.samples, batch_size=batch_size, max_new_tokens=eval_set.max_new_tokens,
                    on_batch=lambda done, total, name=eval_set.name: reporter.evaluating(stage, name, done, total),
                    batch_context=method.batch_context,
                )
            generated += tokens
            results[group].append(score_set(eval_set, replies))
    return results, generated


def run(options: RunOptions, reporter: Reporter | None = None) -> Path:
    """Run a method through the suite and write ``results.json`` + ``predictions.jsonl``; returns the run dir."""
    reporter = reporter or Reporter()
    suite = options.suite
    method = build_method(options.method, options.method_overrides)
    run_dir = options.results_dir / suite.name / options.method / (options.run_id or f"seed{options.seed}")
    started = datetime.now(timezone.utc)
    wall_start = time.perf_counter()

    data = materialize(suite, options.seed, options.data_root)
    if options.model is None:
        model_dir, base_hash = prepare_base(suite, report=reporter.step)
    else:
        model_dir, base_hash = Path(options.model), f"external:{options.model}"
    seed_everything(options.seed)
    base_model, processor = load_model(model_dir)
    model = method.wrap_model(base_model, suite.task_names)
    collator = Collator(processor)
    plan = build_eval_plan(suite, data, collator, options.seed)
    task_names = suite.task_names
    steps_per_task = options.steps_per_task or suite.training.steps_per_task
    stage_plan = method.stage_plan(task_names, steps_per_task)
    n_rows = len(task_names) + 1

    matrices = {g: {k: np.full((n_rows, len(sets)), np.nan) for k in MATRIX_KINDS} for g, sets in plan.groups().items()}
    columns = {g: [s.name for s in sets] for g, sets in plan.groups().items()}
    predictions: list[dict] = []
    corpus_scores: list[dict] = []  # caption metrics (BLEU-4, ROUGE-L, ...) and skipped ones, per evaluation
    timings: list[dict] = []
    stage_facts: list[dict] = []

    def record(rows: tuple[int, ...], stage: int, scores: dict[str, list]) -> None:
        for group, per_set in scores.items():
            for column, set_scores in enumerate(per_set):
                for row in rows:
                    matrices[group]["vu"][row, column] = set_scores.vu
                    matrices[group]["if"][row, column] = set_scores.if_rate
                    matrices[group]["strict"][row, column] = set_scores.strict
                predictions.extend({"stage": stage, "group": group, **p} for p in set_scores.predictions)
                if set_scores.extra or set_scores.skipped:
                    corpus_scores.append({"stage": stage, "group": group, "set": columns[group][column],
                                          "scores": set_scores.extra, "skipped": set_scores.skipped})

    eval_start = time.perf_counter()
    scores, tokens = evaluate_all(model, method, collator, plan, suite.evaluation.batch_size, 0, reporter)
    record((0,), 0, scores)
    timings.append({"stage": 0, "train_s": 0.0, "eval_s": time.perf_counter() - eval_start, "generated_tokens": tokens})
    for stage, step_plan in enumerate(stage_plan, start=1):
        train_seconds = 0.0
        if step_plan.tasks:
            reporter.stage(stage, step_plan.tasks, step_plan.steps)
            method.before_stage(stage, step_plan.tasks, model)
            samples = [
                s
                for task in suite.tasks
                if task.name in step_plan.tasks
                for s in phrase_all(data.records(task.name, "train"), task.name, task.template.training_phrasings(suite.instruction_setting))
            ]
            samples = method.train_data(stage, samples)
            log = train_stage(
                model, method, samples, collator, suite.training, steps=step_plan.steps,
                seed=f"{options.seed}-stage{stage}", report=reporter.step,
            )
            train_seconds = log.seconds
            facts = {"tasks": list(step_plan.tasks), "final_loss": log.final_loss, "samples_per_s": log.samples_per_s,
                     **method.after_stage(stage, model, samples, collator)}
        eval_start = time.perf_counter()
        scores, tokens = evaluate_all(model, method, collator, plan, suite.evaluation.batch_size, stage, reporter)
        record(step_plan.rows, stage, scores)
        if step_plan.tasks:
            stage_facts.append({"stage": stage, **facts, **method.evaluation_facts()})
        timings.append({"stage": stage, "train_s": train_seconds, "eval_s": time.perf_counter() - eval_start, "generated_tokens": tokens})

    reported = {group: kinds for group, kinds in matrices.items() if columns[group]}
    result = {
        "schema_version": 1,
        "run_info": {
            "suite": suite.name,
            "method": options.method,
            "method_config": dataclasses.asdict(method.config),
            "seed": options.seed,
            "task_order": task_names,
            "unseen_tasks": columns["unseen"],
            "heldout_tasks": columns["heldout"],
            "instruction_setting": suite.instruction_setting,
            "steps_per_task": steps_per_task,
            "training": dataclasses.asdict(suite.training),
            "evaluation": dataclasses.asdict(suite.evaluation),
            "scorers": {t.name: t.scorer for t in suite.tasks + suite.unseen},
            "model": str(options.model or "tiny-llava (embedded)"),
            "base_checkpoint_hash": base_hash,
            "data_hash": data.data_hash,
            **provenance(),
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "status": "complete",
        },
        "matrices": reported,
        "metrics": all_metrics(reported),
        "corpus_scores": corpus_scores,
        "stages": stage_facts,
        "timings": {"total_s": time.perf_counter() - wall_start, "stages": timings},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in to_jsonable(predictions)))
    atomic_write_json(run_dir / "results.json", to_jsonable(result))
    return run_dir
