"""One continual run: stage 0 evaluation, then train/evaluate per stage, then results.

The runner knows nothing about any particular method: the method's stage plan says
what each stage trains and which matrix rows its evaluation fills, and its hooks do
the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn

from cvit_bench.checkpoint import (ADAPTERS_DIR, Checkpoint, export_stage_weights, load_checkpoint, load_model_tensors, load_stage_weights,
                                   model_tensors, remove_checkpoints, remove_unfinished, restore_rng, save_checkpoint)
from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.distributed import Processes, current_processes, gathered, shard_frozen_weights
from cvit_bench.evaluation.contracts import FAMILIES
from cvit_bench.evaluation.evaluate import EvalSet, score_set
from cvit_bench.evaluation.generate import generate
from cvit_bench.io import atomic_write_json, atomic_write_text, read_json, remove_temporaries, to_jsonable
from cvit_bench.methods import METHODS, Method
from cvit_bench.methods.base import StagePlan, build_config, recorded_config
from cvit_bench.metrics import BOOTSTRAP, all_metrics, last_format_floor
from cvit_bench.models.backend import load_model, parse_dtype
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.models.clip_towers import ClipFeatures, prepare_clip
from cvit_bench.paths import config_differences, config_hash, inside, name_problem
from cvit_bench.ranges import AT_LEAST_ONE, SEED, range_problem
from cvit_bench.registry import ConfigError
from cvit_bench.suites.materialize import SuiteData, materialize, require_valid_records, resolve_data_root
from cvit_bench.suites.orders import TaskOrder, default_run_id, in_order, resolve_order, single_task
from cvit_bench.suites.schema import REPO_ROOT, EvaluationConfig, RealSuite, Suite, SuiteError, TaskSpec, TrainingConfig, resolve_suite_path
from cvit_bench.training.loop import NonFiniteLossError, Precision, fp32_trained_weights, precision_for, train_stage
from cvit_bench.training.tracking import NO_TRACKER, step_logger, tracker_class, tracking

MATRIX_KINDS = ("vu", "if", "strict")
TOP_REPLY = "top_reply"  # share of a cell's samples given its most frequent reply: a constant answer shows as ~1
# Options recorded (in the request and the config) only when not at their defaults.
BACKEND_OPTIONS = ("dtype", "gradient_checkpointing", "max_steps", "module_patterns", "epochs_per_task", "mixed_precision")
# Recorded in the request only: how a run computes, not what (gradient accumulation sums the same batch), or already in the
# config another way (a batch size enters it as the suite's training.batch_size).
REQUEST_ONLY_OPTIONS = ("grad_accum", "save_adapters", "batch_size", "log_with")
INTERVAL_KINDS = {"vu": ("vu_low", "vu_high"), "if": ("if_low", "if_high")}  # each cell's 95 % bootstrap interval over items
TRACKED_KINDS = (*MATRIX_KINDS, TOP_REPLY, *(bound for bounds in INTERVAL_KINDS.values() for bound in bounds))  # per cell, in a run
REQUEST_FILE = "run_request.json"  # the options a run was started with, so `--resume RUN_DIR` needs nothing else


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
    threads: int | None = None  # torch threads; recorded so a resumed run uses the same (CPU sums depend on it)
    data_workers: int = 0  # DataLoader processes decoding the coming batches' images; results do not depend on it (not recorded)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    max_steps: int | None = None  # cap on every stage's optimizer steps (budgets on real models)
    module_patterns: dict[str, str] = field(default_factory=dict)  # ModuleMap overrides, KEY -> regex
    epochs_per_task: float | None = None  # each stage trains ceil(E x its samples / batch size) steps instead of steps_per_task
    order: TaskOrder | None = None  # None: the suite's listed order
    only: str | None = None  # a single-task reference run: this training task alone, no unseen tasks
    batch_size: int | None = None  # the batch of one optimizer step (all processes); None: the suite's training.batch_size
    grad_accum: int = 1  # forwards per optimizer step on each process (memory, not maths: the step's batch stays batch_size)
    mixed_precision: str = "no"  # accelerate's --mixed_precision: no, bf16 or fp16 autocast over the loaded weights
    save_adapters: bool = False  # export each stage's trained weights under RUN_DIR/adapters/stage<K>/
    log_with: str = NO_TRACKER  # an accelerate tracker (tensorboard, ...) receiving each step's loss and lr, see training/tracking.py
    variant: str | None = None  # a named configuration of the method (an ablation rung): a leaderboard row of its own

    def __post_init__(self) -> None:
        self._check_values()
        self.suite = in_order(self.suite, self.order)  # the suite as trained: everything downstream reads its tasks in this order
        if self.only is not None:
            self.suite = single_task(self.suite, self.only)
        if self.batch_size is not None:
            if self.batch_size < 1:
                raise ConfigError(f"--batch-size must be a positive integer, got {self.batch_size}")
            self.suite = dataclasses.replace(self.suite, training=dataclasses.replace(self.suite.training, batch_size=self.batch_size))
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be a positive integer, got {self.grad_accum}")

    def _check_values(self) -> None:
        """Numbers and the run id as they arrive (command line, ``run_request.json``, the API): a value outside its range
        never reaches the run, and 0 is checked like any value, never taken for "not given"."""
        checks = [("--seed", self.seed, SEED), ("--steps-per-task", self.steps_per_task, AT_LEAST_ONE),
                  ("--max-steps", self.max_steps, AT_LEAST_ONE), ("--threads", self.threads, AT_LEAST_ONE)]
        problems = [problem for flag, value, allowed in checks
                    if value is not None and (problem := range_problem(flag, value, allowed, integer=True))]
        if self.run_id is not None and name_problem(self.run_id):
            problems.append(f"--run-id: {name_problem(self.run_id)}")
        if self.variant is not None and name_problem(self.variant):
            problems.append(f"--variant: {name_problem(self.variant)}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        run_id = self.run_id if self.run_id is not None else default_run_id(self.seed, self.order and self.order.name, self.only, self.variant)
        return inside(self.results_dir, self.suite.name, self.method, run_id)

    def request(self) -> dict[str, Any]:
        """The options as JSON; a shipped suite is named rather than located, so a run directory can move between clones."""
        shipped = _is_shipped(self.suite)
        return {
            "suite": self.suite.name if shipped else str(Path(self.suite.path).resolve()), "method": self.method,
            "seed": self.seed, "model": self.model, "data_root": None if self.data_root is None else str(Path(self.data_root).resolve()),
            "method_overrides": self.method_overrides, "steps_per_task": self.steps_per_task, "threads": self.threads,
            **self._backend_options(BACKEND_OPTIONS + REQUEST_ONLY_OPTIONS), **({"order": self.order.spec} if self.order else {}),
            **({"only": self.only} if self.only else {}), **({"variant": self.variant} if self.variant else {}),
        }

    def _backend_options(self, keys: tuple[str, ...] = BACKEND_OPTIONS) -> dict[str, Any]:
        """Options among ``keys`` that differ from the defaults.

        They were added after the first published results; leaving defaults out keeps those
        results' configurations (and hashes) comparable with new runs.
        """
        defaults = RunOptions(self.suite, self.method)
        return {key: getattr(self, key) for key in keys if getattr(self, key) != getattr(defaults, key)}

    def epochs(self) -> float | None:
        """Epochs per stage: ``--epochs-per-task``, else the suite's ``training.epochs_per_task`` unless ``--steps-per-task`` is given."""
        if self.epochs_per_task is not None:
            return self.epochs_per_task
        return self.suite.training.epochs_per_task if self.steps_per_task is None else None

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> RunOptions:
        """The options a run directory was started with (for ``--resume``)."""
        from cvit_bench.suites.schema import load_suite

        run_dir = Path(run_dir).resolve()
        request_path = run_dir / REQUEST_FILE
        if not request_path.is_file():
            raise ConfigError(f"{run_dir}: not a run directory ({REQUEST_FILE} is missing)")
        request = read_json(request_path)
        try:
            suite = load_suite(request["suite"])
            options = cls(
                suite=suite, method=request["method"], seed=request["seed"], order=resolve_order(suite, request.get("order")), only=request.get("only"),
                variant=request.get("variant"),
                results_dir=run_dir.parent.parent.parent, model=request["model"],
                data_root=None if request["data_root"] is None else Path(request["data_root"]),
                method_overrides=request["method_overrides"], steps_per_task=request["steps_per_task"], run_id=run_dir.name,
                threads=request.get("threads"), **{key: request[key] for key in BACKEND_OPTIONS + REQUEST_ONLY_OPTIONS if key in request},
            )
        except ConfigError as error:
            raise ConfigError(f"{request_path}: {error}") from None
        except (KeyError, TypeError, AttributeError) as error:  # an edited or truncated request
            raise ConfigError(f"{request_path}: malformed run request ({type(error).__name__}: {error})") from None
        if options.run_dir.resolve() != run_dir.resolve():
            raise ConfigError(f"{request_path}: describes a run of {options.suite.name}/{options.method}, which belongs in {options.run_dir}")
        return options


def _is_shipped(suite: Suite) -> bool:
    try:
        return resolve_suite_path(suite.name).resolve() == Path(suite.path).resolve()
    except SuiteError:
        return False


@dataclass
class EvalPlan:
    """The columns of the three matrix groups, as evaluation sets."""

    seen: list[EvalSet]
    unseen: list[EvalSet]
    heldout: list[EvalSet]

    def groups(self) -> dict[str, list[EvalSet]]:
        return {"seen": self.seen, "unseen": self.unseen, "heldout": self.heldout}

    def scheduled(self, rows: tuple[int, ...], n_tasks: int, evaluation: EvaluationConfig) -> EvalPlan:
        """The sets an evaluation filling ``rows`` runs under the suite's schedule (see ``EvaluationConfig``)."""
        last = max(rows)
        seen = self.seen if evaluation.future_tasks or 0 in rows else self.seen[: last + 1]
        ends = 0 in rows or n_tasks in rows
        side = evaluation.side_sets == "every_stage" or ends
        return EvalPlan(seen, self.unseen if side else [], self.heldout if side else [])


def build_method(name: str, overrides: dict[str, Any], suite_defaults: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method: its config defaults, then the suite's ``method_defaults``, then ``overrides``;
    unknown options fail with the valid field names, values outside their range with the range."""
    cls = METHODS.get(name)
    return cls(build_config(name, cls.config_class, {**(suite_defaults or {}), **overrides}))


def declare_suite_tasks(method: Method, suite: Suite) -> None:
    """Tell ``method`` the suite's tasks before it wraps a model: each seen task's training prompts (in the suite's
    instruction setting) and the unseen tasks."""
    prompts = {t.name: tuple(p.prompt for p in t.template.training_phrasings(suite.instruction_setting)) for t in suite.tasks}
    method.declare_tasks(prompts, tuple(t.name for t in suite.unseen))


def build_eval_plan(suite: Suite, data: SuiteData, collator: Collator, seed: int) -> EvalPlan:
    margin = suite.evaluation.max_new_tokens_margin

    def make(name: str, task, phrasings, shots: int = 0) -> EvalSet:
        records = data.records(task.name, "test")
        pool = data.records(task.name, "train") if shots else None
        samples = phrase_all(records, task.name, phrasings, shots=shots, shot_pool=pool, seed=seed)
        return EvalSet(name, task.name, task.scorer, samples, task.max_new_tokens or collator.target_length(samples) + margin)

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


def evaluate_all(model, method: Method, collator: Collator, plan: EvalPlan, batch_size: int, stage: int, reporter: Reporter,
                 processes: Processes = Processes()):
    """Scores for every evaluation set: {group: [SetScores per column]}, the method's evaluation facts (both on the main
    process; None and {} elsewhere) and the tokens generated.

    Each process generates for its share of a set; the replies and the method's records are gathered in sample order.
    Under FSDP the weights are gathered once for the whole evaluation, not once per generated token (see ``gathered``).
    """
    results: dict[str, list] = {}
    records: list[Any] = []
    generated = 0
    with gathered(model):
        for group, sets in plan.groups().items():
            results[group] = []
            for eval_set in sets:
                share = processes.share(eval_set.samples)
                with method.eval_context(eval_set.task, model):
                    replies, tokens = generate(
                        model, collator, share, batch_size=batch_size, max_new_tokens=eval_set.max_new_tokens,
                        on_batch=lambda done, total, name=eval_set.name: reporter.evaluating(stage, name, done, total),
                        batch_context=method.batch_context,
                    )
                replies = processes.gather(replies)
                generated += sum(processes.gather([tokens]))
                records.extend(record for part in processes.gather([method.evaluation_records()]) for record in part)
                if processes.is_main:
                    results[group].append(score_set(eval_set, replies, [collator.prompt_text(sample) for sample in eval_set.samples]))
    if not processes.is_main:
        return None, {}, generated
    return results, method.evaluation_facts(records), generated


@dataclass
class Progress:
    """What a run has measured so far; saved with every stage checkpoint."""

    matrices: dict[str, dict[str, np.ndarray]]
    completed_stage: int = -1  # -1: nothing evaluated yet; 0: the initial evaluation
    predictions: list[dict] = field(default_factory=list)
    corpus_scores: list[dict] = field(default_factory=list)  # caption metrics and skipped ones, per evaluation
    timings: list[dict] = field(default_factory=list)
    stage_facts: list[dict] = field(default_factory=list)
    trained: set[str] = field(default_factory=set)  # parameters trainable in some stage: what a checkpoint stores
    elapsed_s: float = 0.0  # wall time up to the last checkpoint, over all sessions of a resumed run
    started: str = ""
    resumed_after: list[int] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)  # per process that worked on the run: commit, threads, start stage

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "predictions"}
        return to_jsonable({**fields, "trained": sorted(self.trained)})

    @classmethod
    def from_json(cls, state: dict[str, Any], predictions: list[dict]) -> Progress:
        matrices = {g: {k: np.asarray(m, dtype=float) for k, m in kinds.items()} for g, kinds in state["matrices"].items()}
        for kinds in matrices.values():  # checkpoints written before the share or the intervals were recorded
            for kind in TRACKED_KINDS:
                kinds.setdefault(kind, np.full_like(kinds["vu"], np.nan))
        fields = {f.name for f in dataclasses.fields(cls)} - {"matrices", "predictions", "trained"}
        return cls(matrices=matrices, predictions=predictions, trained=set(state["trained"]), **{k: state[k] for k in fields})


# Methods whose suite defaults were added after cvit-v2's rows were published: only their own runs record them, so
# adding a method to a suite leaves every published run's config hash as it was.
METHOD_DEFAULTS_ADDED_LATER = frozenset({"clmoe", "hide", "sefe", "modalprompt"})
# Keys added to a method's suite defaults after the rows were published: likewise recorded only by that method's runs.
METHOD_DEFAULT_KEYS_ADDED_LATER = {"branchlora": frozenset({"image_feature"})}


def resolved_config(options: RunOptions, method: Method, data: SuiteData, base_hash: str, steps_per_task: int | None,
                    clip: tuple[str, str] | None = None) -> dict[str, Any]:
    """Everything that determines a run's numbers except the seed: two runs with equal configs are seeds of one setup.
    The suite's CLIP (and its hash) counts only for the methods that read it."""
    suite = _setup_only(json.loads(json.dumps(dataclasses.asdict(options.suite), default=str)))
    if clip is None:
        suite["model"].pop("clip", None)
    suite["method_defaults"] = {name: defaults if name == options.method else _as_published(name, defaults)
                                for name, defaults in suite["method_defaults"].items()
                                if name == options.method or name not in METHOD_DEFAULTS_ADDED_LATER}
    if not suite["method_defaults"]:  # suites from before method defaults keep their config hash
        del suite["method_defaults"]
    suite["training"] = _without_later_defaults(suite["training"], TrainingConfig.ADDED_LATER)
    suite["evaluation"] = _without_later_defaults(suite["evaluation"], EvaluationConfig.ADDED_LATER)
    for group in ("tasks", "unseen"):
        suite[group] = [_without_later_defaults(task, TaskSpec.ADDED_LATER) for task in suite[group]]
    return to_jsonable({
        "suite": suite,
        "method": options.method,
        "method_config": recorded_config(method.config),
        "steps_per_task": steps_per_task,
        "model": options.model,
        "base_checkpoint_hash": base_hash,
        **({"clip_hash": clip[1]} if clip is not None else {}),
        "data_recipe_hash": data.recipe_hash,
        **options._backend_options(),
    })


def _as_published(method: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Another method's suite defaults as its rows were published: the keys added since are left out."""
    later = METHOD_DEFAULT_KEYS_ADDED_LATER.get(method, frozenset())
    return {key: value for key, value in defaults.items() if key not in later}


def _without_later_defaults(section: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``section`` without the fields added after results were published that are at their defaults (those results keep their hash)."""
    return {key: value for key, value in section.items() if not (key in later and later[key] == value)}


def _setup_only(value: Any) -> Any:
    """The suite as data: where its files live, its prose (descriptions, where to obtain data) and the orders it names are not
    part of the setup; the order a run trains is, as the order of its tasks."""
    if isinstance(value, dict):
        return {key: _setup_only(item) for key, item in value.items() if key not in ("path", "description", "obtain", "orders")}
    if isinstance(value, list):
        return [_setup_only(item) for item in value]
    return value


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run directory; the OS drops the lock when its holder dies, even by SIGKILL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{run_dir}: another cvit-bench process is running into this directory") from None
    try:
        yield
    finally:
        lock.release()


def clear_run(run_dir: Path) -> None:
    """Forget a run directory's results, checkpoints and exported stage weights (``--fresh``); other files are left alone."""
    remove_checkpoints(run_dir)
    for name in ("results.json", "predictions.jsonl", REQUEST_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / ADAPTERS_DIR, ignore_errors=True)


def _check_same_setup(run_dir: Path, what: str, saved: dict[str, Any], config: dict[str, Any], seed: int,
                      remedy: str = "pass --fresh to discard it, or --run-id to write elsewhere") -> None:
    differences = config_differences(saved.get("config") or {}, config)
    if saved.get("seed") != seed:
        differences.insert(0, "seed")
    if differences:
        raise ConfigError(
            f"{run_dir}: its {what} was made with a different configuration (differs in: {', '.join(differences)}); {remedy}"
        )


def run(options: RunOptions, reporter: Reporter | None = None, *, fresh: bool = False, keep_checkpoint: bool = False) -> Path:
    """Run a method through the suite and write ``results.json`` + ``predictions.jsonl``; returns the run dir.

    A run directory that holds a checkpoint of the same configuration and seed continues after
    its last finished stage; one that holds finished results of it is left as it is. Under
    ``accelerate launch`` every process calls this; only the main one writes.
    """
    processes = current_processes()
    reporter = reporter or Reporter()
    suite = options.suite
    epochs = options.epochs()
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"epochs_per_task must be a positive number, got {epochs}")
    Precision(options.mixed_precision)  # a bad mode fails before anything loads
    tracker_class(options.log_with)  # so does an unknown or uninstalled tracker
    method = build_method(options.method, options.method_overrides, suite.method_defaults.get(options.method))
    if isinstance(suite, RealSuite):
        if options.model is None:
            raise ConfigError(f"{suite.path}: suite {suite.name!r} is real data; pass --model (the embedded tiny model is built for synthetic suites)")
        if method.trains() and options.method not in suite.method_defaults:
            raise ConfigError(f"{suite.path}: method_defaults.{options.method}: missing; a real suite carries its paper's recipe for every "
                              f"method it runs ({options.method}'s own defaults are sized for the embedded tiny model)")
        # The root is recorded, so a resume does not depend on the environment.
        options = dataclasses.replace(options, data_root=resolve_data_root(options.data_root))
    run_dir = options.run_dir
    wall_start = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)

    with processes.main_first():
        data = materialize(suite, options.seed, options.data_root)
        require_valid_records(suite, data)  # before a model is built or loaded and before the run directory is touched
        if options.model is None:
            model_dir, base_hash = prepare_base(suite, report=reporter.step)
        else:
            model_dir, base_hash = Path(options.model), f"external:{options.model}"
        clip = prepare_clip(suite, model_dir, base_hash, report=reporter.step) if method.needs_clip() else None
    # Under epochs per task each stage's steps follow from its samples; no steps_per_task applies (recorded as null).
    steps_per_task = None if epochs is not None else options.steps_per_task if options.steps_per_task is not None else suite.training.steps_per_task
    config = resolved_config(options, method, data, base_hash, steps_per_task, clip)
    if processes.is_main:
        reporter.message(setup_line(options, method, steps_per_task, processes))

    with run_lock(run_dir) if processes.is_main else contextlib.nullcontext():
        if processes.is_main:
            if fresh:
                clear_run(run_dir)
            remove_temporaries(run_dir)  # left by writes a kill interrupted; the lock says no one else writes here
            remove_unfinished(run_dir)
        processes.wait()
        finished = run_dir / "results.json"
        if finished.is_file():
            info = read_json(finished).get("run_info", {})
            _check_same_setup(run_dir, "results.json", info, config, options.seed)
            if info.get("status") == "complete":
                if not (keep_checkpoint or info.get("kept_checkpoint")) and processes.is_main:
                    remove_checkpoints(run_dir)  # left if the process died between results.json and the clean-up
                reporter.message(f"{finished} is already complete (pass --fresh to run again)")
                return run_dir
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is not None:
            _check_same_setup(run_dir, "checkpoint", checkpoint.state, config, options.seed)
            sessions = checkpoint.state["progress"].get("sessions") or []
            if options.threads is None and sessions:  # CPU sums depend on the thread count: continue with the run's first
                torch.set_num_threads(sessions[0]["threads"])
        if processes.is_main:
            atomic_write_json(run_dir / REQUEST_FILE, options.request())
        tracked = {"suite": suite.name, "method": options.method, "seed": options.seed, "batch_size": suite.training.batch_size,
                   "suite_lr": suite.training.lr, "dtype": options.dtype, **recorded_config(method.config)}
        with tracking(options.log_with if processes.is_main else NO_TRACKER, run_dir, f"{suite.name}-{options.method}-{run_dir.name}",
                      tracked) as tracker:
            return _run_stages(options, method, run_dir, data, model_dir, clip, base_hash, config, steps_per_task, checkpoint,
                               reporter, wall_start, keep_checkpoint, processes, tracker)


def setup_line(options: RunOptions, method: Method, steps_per_task: int | None, processes: Processes) -> str:
    """The resolved recipe in one line, printed at the start of a run (the same values results.json records)."""
    training = options.suite.training
    config = ", ".join(f"{key}={value}" for key, value in recorded_config(method.config).items())
    source = f" (suite defaults: {options.suite.method_defaults[options.method]})" if options.method in options.suite.method_defaults else ""
    length = f"{options.epochs()} epochs per task" if steps_per_task is None else f"{steps_per_task} steps per task"
    length += f" (at most {options.max_steps} steps a stage)" if options.max_steps else ""
    per_forward = training.batch_size / (processes.count * options.grad_accum)
    return (f"{options.method} on {options.suite.name}: {config or 'no options'}{source}; batch {training.batch_size} "
            f"({processes.count} process(es) x {options.grad_accum} accumulation x ~{per_forward:g} per forward), suite lr {training.lr}, "
            f"{length}, dtype {options.dtype}, mixed precision {precision_for(parse_dtype(options.dtype), options.mixed_precision).mode}")


def _run_stages(options: RunOptions, method: Method, run_dir: Path, data: SuiteData, model_dir: Path, clip: tuple[str, str] | None, base_hash: str,
                config: dict[str, Any], steps_per_task: int | None, checkpoint: Checkpoint | None, reporter: Reporter,
                wall_start: float, keep_checkpoint: bool, processes: Processes, tracker: Any) -> Path:
    suite = options.suite
    recorded = provenance()  # once per session: git and package lookups are not free
    commit = recorded["git_commit"]
    seed_everything(options.seed)
    model, collator, plan, sharded = build_run_model(options, method, data, model_dir, processes, clip)
    precision = precision_for(parse_dtype(options.dtype), options.mixed_precision)
    epochs = options.epochs()
    task_names = suite.task_names
    stage_plan = method.stage_plan(task_names, steps_per_task or 0)
    columns = {g: [s.name for s in sets] for g, sets in plan.groups().items()}

    if checkpoint is None:
        n_rows = len(task_names) + 1
        progress = Progress({g: {k: np.full((n_rows, len(sets)), np.nan) for k in TRACKED_KINDS} for g, sets in plan.groups().items()})
        progress.trained = trainable_names(model)
        progress.started = datetime.now(timezone.utc).isoformat()
    else:
        progress = Progress.from_json(checkpoint.state["progress"], checkpoint.predictions)
        load_model_tensors(model, checkpoint.model, run_dir / f"checkpoint-stage{checkpoint.stage}")
        method.load_state_dict(checkpoint.method)
        restore_rng(checkpoint.state["rng"], checkpoint.rng)
        progress.resumed_after.append(progress.completed_stage)
        if checkpoint.state.get("git_commit") != commit:
            reporter.message(f"warning: resuming a checkpoint written at commit {checkpoint.state.get('git_commit')}")
        reporter.message(f"resuming {run_dir} after stage {progress.completed_stage}")
    progress.sessions.append({"git_commit": commit, "threads": torch.get_num_threads(), "after_stage": progress.completed_stage})
    earlier_sessions_s = progress.elapsed_s

    def record(rows: tuple[int, ...], stage: int, evaluated: EvalPlan, scores: dict[str, list]) -> None:
        for group, per_set in scores.items():
            for eval_set, set_scores in zip(evaluated.groups()[group], per_set):
                column = columns[group].index(eval_set.name)
                for row in rows:
                    progress.matrices[group]["vu"][row, column] = set_scores.vu
                    progress.matrices[group]["if"][row, column] = set_scores.if_rate
                    progress.matrices[group]["strict"][row, column] = set_scores.strict
                    progress.matrices[group][TOP_REPLY][row, column] = top_reply_share(set_scores.predictions)
                    for kind, interval in (("vu", set_scores.vu_interval), ("if", set_scores.if_interval)):
                        for name, bound in zip(INTERVAL_KINDS[kind], interval):
                            progress.matrices[group][name][row, column] = bound
                progress.predictions.extend({"stage": stage, "group": group, **p} for p in set_scores.predictions)
                if set_scores.extra or set_scores.skipped:
                    progress.corpus_scores.append({"stage": stage, "group": group, "set": columns[group][column],
                                                   "scores": set_scores.extra, "skipped": set_scores.skipped})

    stages = [(0, StagePlan((), 0, (0,))), *enumerate(stage_plan, start=1)]
    for stage, step_plan in stages:
        if stage <= progress.completed_stage:
            continue
        train_seconds = 0.0
        if step_plan.tasks:
            samples = [
                s
                for task in suite.tasks
                if task.name in step_plan.tasks
                for s in phrase_all(data.records(task.name, "train"), task.name, task.template.training_phrasings(suite.instruction_setting))
            ]
            samples = method.train_data(stage, samples)
            steps = step_plan.steps
            if epochs is not None:  # exact arithmetic: 1.1 epochs of 200 at batch 4 is 55 steps, not 56
                steps = math.ceil(Fraction(str(epochs)) * len(samples) / suite.training.batch_size)
            if options.max_steps is not None:
                steps = min(steps, options.max_steps)
            reporter.stage(stage, step_plan.tasks, steps)
            method.before_stage(stage, step_plan.tasks, model)
            progress.trained |= trainable_names(model)
            try:
                log = train_stage(
                    model, method, samples, collator, suite.training, steps=steps,
                    seed=f"{options.seed}-stage{stage}", report=reporter.step, processes=processes, grad_accum=options.grad_accum,
                    precision=precision, track=None if options.log_with == NO_TRACKER else step_logger(tracker, stage),
                )
            except NonFiniteLossError as error:
                kept = f"the checkpoint after stage {progress.completed_stage} is kept" if progress.completed_stage >= 0 else "nothing was kept"
                raise NonFiniteLossError(f"stage {stage} ({'+'.join(step_plan.tasks)}): {error}; {kept} in {run_dir}") from error
            train_seconds = log.seconds
            with precision.autocast(processes.device):
                consolidated = method.after_stage(stage, model, samples, collator)
            facts = {"tasks": list(step_plan.tasks), **({"steps": steps} if epochs is not None else {}), "final_loss": log.final_loss,
                     "samples_per_s": log.samples_per_s, **consolidated}
        eval_start = time.perf_counter()
        evaluated = plan.scheduled(step_plan.rows, len(task_names), suite.evaluation)
        with precision.autocast(processes.device):
            scores, evaluation_facts, tokens = evaluate_all(model, method, collator, evaluated, suite.evaluation.batch_size, stage,
                                                            reporter, processes)
        progress.completed_stage = stage
        if not processes.is_main:
            continue
        record(step_plan.rows, stage, evaluated, scores)
        if step_plan.tasks:
            progress.stage_facts.append({"stage": stage, **facts, **evaluation_facts})
        progress.timings.append({"stage": stage, "train_s": train_seconds, "eval_s": time.perf_counter() - eval_start, "generated_tokens": tokens})
        progress.elapsed_s = earlier_sessions_s + time.perf_counter() - wall_start
        save_checkpoint(
            run_dir, stage,
            {"config": config, "seed": options.seed, "git_commit": commit, "progress": progress.to_json()},
            progress.predictions, model_tensors(model, progress.trained), method.state_dict(),
        )
        if options.save_adapters and step_plan.tasks:
            export_stage_weights(run_dir / ADAPTERS_DIR / f"stage{stage}", model, progress.trained, method.state_dict())

    if not processes.is_main:
        return run_dir
    reported = {group: {kind: kinds[kind] for kind in MATRIX_KINDS} for group, kinds in progress.matrices.items() if columns[group]}
    result = {
        "schema_version": 1,
        "run_info": {
            "suite": suite.name,
            "method": options.method,
            "method_config": recorded_config(method.config),
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
            "data_recipe_hash": data.recipe_hash,
            "config_hash": config_hash(config),
            "config": config,
            "request": options.request(),
            **recorded,
            **({"device": str(processes.device), "processes": processes.count} if processes.distributed or processes.device.type != "cpu" else {}),
            **({"fsdp_sharded_tensors": sharded} if processes.shard_frozen else {}),
            "started": progress.started,
            "finished": datetime.now(timezone.utc).isoformat(),
            "resumed_after_stages": progress.resumed_after,
            "sessions": progress.sessions,
            "status": "complete",
            **({"kept_checkpoint": True} if keep_checkpoint else {}),  # a re-run of the finished run keeps it too
        },
        "matrices": reported,
        "metrics": run_metrics(suite, reported, plan),
        "n_items": {group: {s.name: len(s.samples) for s in sets} for group, sets in plan.groups().items() if sets},
        "intervals": {**BOOTSTRAP, "over": "items", **{
            group: {kind: {"low": progress.matrices[group][low], "high": progress.matrices[group][high]}
                    for kind, (low, high) in INTERVAL_KINDS.items()} for group in reported}},
        "top_reply_share": {group: progress.matrices[group][TOP_REPLY] for group in reported},
        "corpus_scores": progress.corpus_scores,
        "stages": progress.stage_facts,
        "timings": {"total_s": earlier_sessions_s + time.perf_counter() - wall_start, "stages": progress.timings},
    }
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in to_jsonable(progress.predictions)))
    atomic_write_json(run_dir / "results.json", result)
    if not keep_checkpoint:
        remove_checkpoints(run_dir)
    return run_dir


def reevaluate_stage(run_dir: Path, stage: int, reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate stage ``stage`` of a run again from the weights ``--save-adapters`` exported, as the run did; writes and returns
    ``RUN_DIR/eval-stage<K>.json`` (per evaluated set: VU, IF, strict and the recorded values when results.json has them)."""
    reporter = reporter or Reporter()
    options = RunOptions.from_run_dir(run_dir)
    run_dir = options.run_dir
    method = build_method(options.method, options.method_overrides, options.suite.method_defaults.get(options.method))
    steps_per_task = None if options.epochs() is not None else options.steps_per_task if options.steps_per_task is not None else options.suite.training.steps_per_task
    plans = method.stage_plan(options.suite.task_names, steps_per_task or 0)
    if not 1 <= stage <= len(plans) or not plans[stage - 1].tasks:
        trained = [k for k, plan in enumerate(plans, start=1) if plan.tasks]
        raise ConfigError(f"{run_dir}: --stage {stage}: {options.method} trains in stages {trained or 'none'}")
    if options.threads:
        torch.set_num_threads(options.threads)
    data = materialize(options.suite, options.seed, options.data_root)
    model_dir, base_hash = ((Path(options.model), f"external:{options.model}") if options.model is not None
                            else prepare_base(options.suite, report=reporter.step))
    clip = prepare_clip(options.suite, model_dir, base_hash) if method.needs_clip() else None
    finished = run_dir / "results.json"
    if finished.is_file():  # the weights were trained under this setup; today's suite or defaults may differ
        _check_same_setup(run_dir, "results.json", read_json(finished).get("run_info", {}),
                          resolved_config(options, method, data, base_hash, steps_per_task, clip), options.seed,
                          "its stage weights cannot be evaluated under this tree's setup (check out the commit the run recorded)")
    seed_everything(options.seed)
    processes = Processes()
    model, collator, plan, _ = build_run_model(options, method, data, model_dir, processes, clip)
    load_stage_weights(run_dir / ADAPTERS_DIR / f"stage{stage}", model, method)
    rows = plans[stage - 1].rows
    evaluated = plan.scheduled(rows, len(options.suite.task_names), options.suite.evaluation)
    with precision_for(parse_dtype(options.dtype), options.mixed_precision).autocast(processes.device):
        scores, facts, _ = evaluate_all(model, method, collator, evaluated, options.suite.evaluation.batch_size, stage, reporter)
    recorded = read_json(finished)["matrices"] if finished.is_file() else {}
    sets = []
    for group, per_set in scores.items():
        for eval_set, set_scores in zip(evaluated.groups()[group], per_set):
            row = {"group": group, "set": eval_set.name, "vu": set_scores.vu, "if": set_scores.if_rate, "strict": set_scores.strict}
            if group in recorded:
                column = [s.name for s in plan.groups()[group]].index(eval_set.name)
                row["recorded"] = {kind: recorded[group][kind][rows[0]][column] for kind in MATRIX_KINDS}
            sets.append(row)
    report = to_jsonable({"stage": stage, "rows": list(rows), "sets": sets, "facts": facts,
                          "predictions": [{"group": g, **p} for g, per_set in scores.items() for x in per_set for p in x.predictions]})
    atomic_write_json(run_dir / f"eval-stage{stage}.json", report)
    return report


def build_run_model(options: RunOptions, method: Method, data: SuiteData, model_dir: Path, processes: Processes,
                    clip: tuple[str, str] | None = None):
    """The run's model (loaded, wrapped by the method, placed, sharded under FSDP), its collator and evaluation plan;
    also the number of sharded tensors. Under FSDP the model is sharded while still on the CPU, so that only shards
    (and the whole trained tensors) reach the device (see ``shard_frozen_weights``). ``clip``: the CLIP the method
    reads (source, hash), loaded frozen on the device in the run's dtype."""
    dtype = parse_dtype(options.dtype)
    base_model, processor = load_model(model_dir, dtype, options.module_patterns, options.gradient_checkpointing)
    base_weights = {id(p) for p in base_model.parameters()}
    declare_suite_tasks(method, options.suite)
    if clip is not None:
        method.bind_clip(ClipFeatures(clip[0], device=processes.device, dtype=dtype))
    model = method.wrap_model(base_model, options.suite.task_names)
    fp32_trained_weights(model)
    if processes.shard_frozen:
        sharded = shard_frozen_weights(model, base_weights, processes)
    else:
        sharded = 0
        model.to(processes.device)
    method.bind_tokenizer(processor.tokenizer)
    collator = Collator(processor, device=processes.device, dtype=dtype, workers=options.data_workers)
    return model, collator, build_eval_plan(options.suite, data, collator, options.seed), sharded


def run_metrics(suite: Suite, matrices: dict[str, dict[str, np.ndarray]], plan: EvalPlan) -> dict[str, float]:
    """The run's metrics: nAP where every seen task declares its chance, MIF over datasets counted once, and
    ``MIF_floor``, what a model that answers everything in the last task's format scores on MIF."""
    declared = all(task.chance is not None for task in suite.tasks)
    metrics = all_metrics(
        matrices,
        chance=[task.chance for task in suite.tasks] if declared else None,
        ceiling=[task.nap_ceiling for task in suite.tasks] if declared else None,
        unseen_datasets=[s.task for s in plan.unseen],
    )
    datasets: dict[str, list[str]] = {}
    for eval_set in plan.seen + plan.unseen:
        datasets.setdefault(eval_set.task, []).extend(FAMILIES[s.contract] for s in eval_set.samples)
    last = suite.tasks[-1].template.training_phrasings(suite.instruction_setting)
    metrics["MIF_floor"] = last_format_floor(list(datasets.values()), {FAMILIES[p.contract] for p in last})
    return metrics


def top_reply_share(predictions: list[dict]) -> float:
    """Share of the replies that equal the most frequent one."""
    counts = Counter(p["prediction"] for p in predictions)
    return max(counts.values()) / len(predictions) if predictions else float("nan")


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}
