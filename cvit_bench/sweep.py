"""Many runs (methods x seeds) as child processes, ``--jobs`` at a time, each on its share of the cores.

Runs share nothing but the read-only cache, so they are independent processes: a crash or a
leak in one cannot touch another, and each child is an ordinary ``cvit-bench run`` that resumes
or skips by itself when the sweep is started again. Each child's output goes to ``run.log`` in
its run directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from cvit_bench.suites.orders import TaskOrder, default_run_id

if TYPE_CHECKING:  # the methods import torch; a sweep's parent process does not need it
    from cvit_bench.methods.base import Rung


@dataclass(frozen=True)
class SweepRun:
    method: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]


@dataclass(frozen=True)
class SweepOutcome:
    run: SweepRun
    returncode: int
    seconds: float

    @property
    def log(self) -> Path:
        return self.run.run_dir / "run.log"


def plan_sweep(suite_ref: str, suite_name: str, methods: list[str], seeds: list[int], results_dir: Path,
               threads: int, extra_args: list[str], order: TaskOrder | None = None, only: list[str] | None = None,
               variant: str | None = None) -> list[SweepRun]:
    """One child ``cvit-bench run`` per (method, seed) -- per (method, seed, task) for single-task reference runs --
    seed-major so that a partial sweep covers every method. ``variant`` names the configuration ``extra_args`` set."""
    order_args = ["--order", order.spec] if order else []
    variant_args = ["--variant", variant] if variant else []
    return [
        SweepRun(method, seed, results_dir / suite_name / method / default_run_id(seed, order and order.name, task, variant), (
            sys.executable, "-m", "cvit_bench", "run", "--suite", suite_ref, "--method", method, "--seed", str(seed),
            "--results-dir", str(results_dir), "--threads", str(threads), *order_args,
            *(["--only", task] if task else []), *variant_args, *extra_args,
        ))
        for seed in seeds
        for task in (only or [None])
        for method in methods
    ]


def plan_ablation(suite_ref: str, suite_name: str, method: str, ladder: Sequence[Rung], seeds: list[int], results_dir: Path,
                  threads: int, extra_args: list[str], order: TaskOrder | None = None) -> list[SweepRun]:
    """Every rung of ``method``'s ladder for every seed, as named variants, seed-major and bottom rung first."""
    runs = [run for rung in ladder
            for run in plan_sweep(suite_ref, suite_name, [method], seeds, results_dir, threads, [*rung.option_args(), *extra_args],
                                  order, variant=rung.name)]
    return sorted(runs, key=lambda run: run.seed)  # stable: rungs stay bottom first within a seed


def default_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_sweep(runs: list[SweepRun], jobs: int, threads: int, on_done: Callable[[SweepOutcome, int, int], None]) -> list[SweepOutcome]:
    """Run every child, ``jobs`` at a time; ``on_done(outcome, finished, total)`` is called as each ends."""
    pending = list(reversed(runs))
    active: dict[subprocess.Popen, tuple[SweepRun, float]] = {}
    outcomes: list[SweepOutcome] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop()
                run.run_dir.mkdir(parents=True, exist_ok=True)
                with open(run.run_dir / "run.log", "ab") as log:
                    active[subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)] = (run, time.perf_counter())
            time.sleep(0.5)
            for process in [p for p in active if p.poll() is not None]:
                run, started = active.pop(process)
                outcomes.append(SweepOutcome(run, process.returncode, time.perf_counter() - started))
                on_done(outcomes[-1], len(outcomes), len(runs))
    finally:  # Ctrl-C or an error here: stop the children; re-running the sweep resumes them
        for process in active:
            process.terminate()
        for process in active:
            process.wait()
    return outcomes
