"""Leaderboards rebuilt from finished results: one row per method, mean and std over seeds.

A leaderboard is derived data. It is always rebuilt from every complete `results.json`, never
appended to, so deleting or re-running a run is reflected by rebuilding.

Std is the sample standard deviation (ddof=1), the usual estimate of seed-to-seed spread in
papers. With a single seed there is no estimate, so std is NaN (an empty CSV cell) rather than
0.0, which would read as "perfectly stable"; `n_seeds` sits next to it.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from cvit_bench.io import atomic_write_text, read_json
from cvit_bench.metrics import with_field_names
from cvit_bench.paths import config_differences, inside, name_problem
from cvit_bench.ranges import SEED, range_problem
from cvit_bench.suites.orders import order_label
from cvit_bench.suites.schema import DEFAULT_ORDER

# The last two are the field's names for AP and MAP (metrics.FIELD_NAMES), so a table can be read against
# MCITlib's MFT, MFN, MAA, BWT; derived from AP and MAP when a run predates them.
METRIC_COLUMNS = [
    "AP", "MAP", "MFT", "BWT", "forgetting", "FWT", "MIF",
    "IF-AP", "IF-BWT", "unseen_AP", "heldout_AP", "robustness_gap", "MFN", "MAA",
]
# Metrics added after cvit-v1, each placed after the column it qualifies. A leaderboard has them only when
# every run reports them (nAP: suites that declare chance), so cvit-v1's published CSVs keep their columns.
LATER_METRICS = {"nAP": "AP", "MIF_floor": "MIF"}
# Runs that differ in any of these measure different things and must not share a mean. Generated
# data differs per seed by design, so seeds are compared on the data recipe; config_hash covers
# everything else that is not the seed (suite spec, steps, model); the specific fields come first
# for clearer messages.
SETUP_FIELDS = ("data_recipe_hash", "base_checkpoint_hash", "method_config", "config_hash")
def metric_columns(results: list[dict]) -> list[str]:
    """The leaderboard's metrics: cvit-v1's, with each later one every run reports placed after the column it qualifies."""
    columns = []
    for metric in METRIC_COLUMNS:
        columns.append(metric)
        columns += [later for later, after in LATER_METRICS.items()
                    if after == metric and results and all(later in result["metrics"] for result in results)]
    return columns


def leaderboard_columns(metrics: list[str]) -> list[str]:
    return ["method", *(f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std")), "n_seeds", "seeds", "wall_time_s_mean"]


COLUMNS = leaderboard_columns(METRIC_COLUMNS)  # a leaderboard without later metrics (cvit-v1's)


def find_results(results_dir: Path, suite: str | None = None) -> list[dict]:
    """Every complete run under `results_dir/<suite>/<method>/<run_id>/results.json`, by path.

    Runs still in progress (or crashed) have another status and are skipped. Each returned dict
    gains a `results_path` key so errors about a run can name its file.
    """
    results = []
    for path in sorted(Path(results_dir).glob("*/*/*/results.json")):
        result = read_json(path)
        run_info = result.get("run_info") if isinstance(result, dict) else None
        if not isinstance(run_info, dict) or run_info.get("status") != "complete":
            continue
        problems = result_problems(result)
        if problems:
            raise ValueError(f"{path}: not a results file cvit-bench can read ({'; '.join(problems[:5])}); fix or remove it")
        if suite is not None and run_info.get("suite") != suite:
            continue
        result["results_path"] = str(path)
        results.append(result)
    return results


def result_problems(result: dict) -> list[str]:
    """The fields of a complete ``results.json`` that reports read, each checked for its type (empty when all are fine).

    A results file is data that may be edited, truncated by hand or come from elsewhere: a missing
    or mistyped field is named with its dotted path instead of failing as a KeyError in a table,
    and suite and method names are checked because leaderboard files are named after them.
    """
    problems: list[str] = []
    info = result["run_info"]
    for key in ("suite", "method"):
        if name_problem(info.get(key)):
            problems.append(f"run_info.{key}: {name_problem(info.get(key))}")
    if range_problem("run_info.seed", info.get("seed"), SEED, integer=True):
        problems.append(range_problem("run_info.seed", info.get("seed"), SEED, integer=True))
    for key in ("task_order", "unseen_tasks", "heldout_tasks"):
        if not _is_list_of(info.get(key, []), str):
            problems.append(f"run_info.{key}: expected a list of task names, got {info.get(key)!r}")
    for key in ("request", "config"):
        if not isinstance(info.get(key) or {}, dict):
            problems.append(f"run_info.{key}: expected an object, got {info.get(key)!r}")
    order = (info.get("request") or {}).get("order") if isinstance(info.get("request") or {}, dict) else None
    if order is not None and (not isinstance(order, str) or ("," not in order and name_problem(order))):
        problems.append(f"run_info.request.order: {name_problem(order) or 'expected a name or a comma-separated task list'}")
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not all(value is None or _is_number(value) for value in metrics.values()):
        problems.append(f"metrics: expected an object of numbers or null, got {metrics!r}"[:200])
    timings = result.get("timings")
    if not isinstance(timings, dict) or not _is_number(timings.get("total_s")):
        problems.append(f"timings.total_s: expected a number, got {timings!r}"[:200])
    if "matrices" not in result:  # leaderboards read metrics only; heatmaps say what they miss
        return problems
    matrices = result["matrices"]
    if not isinstance(matrices, dict):
        problems.append(f"matrices: expected an object, got {matrices!r}"[:200])
        return problems
    for group, kinds in matrices.items():
        if not isinstance(kinds, dict):
            problems.append(f"matrices.{group}: expected an object of matrices")
            continue
        for kind, rows in kinds.items():
            if not _is_list_of(rows, list) or not all(value is None or _is_number(value) for row in rows for value in row):
                problems.append(f"matrices.{group}.{kind}: expected a list of rows of numbers or null")
    seen = (matrices.get("seen") or {}).get("vu") if isinstance(matrices.get("seen"), dict) else None
    n_tasks = len(info.get("task_order") or [])
    if seen is not None and _is_list_of(seen, list) and (len(seen) != n_tasks + 1 or any(len(row) != n_tasks for row in seen)):
        problems.append(f"matrices.seen.vu: expected {n_tasks + 1} rows of {n_tasks} values (run_info.task_order has {n_tasks} tasks)")
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list_of(value: object, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)


def build_leaderboard(results: list[dict]) -> pd.DataFrame:
    """One row per method, best AP first (ties by method name), values rounded to 2 decimals.

    A metric's mean is NaN when any seed lacks it: averaging only the seeds that have it
    would silently compare different samples across methods.
    """
    suites = sorted({result["run_info"]["suite"] for result in results})
    if len(suites) > 1:
        raise ValueError(f"a leaderboard covers one suite, got results from {suites}")
    runs_by_method = defaultdict(list)
    for result in results:
        runs_by_method[result["run_info"]["method"]].append(result)
    metrics = metric_columns(results)
    rows = [_method_row(method, runs, metrics) for method, runs in runs_by_method.items()]
    board = pd.DataFrame(rows, columns=leaderboard_columns(metrics)).round(2)
    board = board.sort_values(["AP_mean", "method"], ascending=[False, True], na_position="last", kind="mergesort")
    return board.reset_index(drop=True)


def write_leaderboard(df: pd.DataFrame, path: Path, float_format: str = "%.2f") -> None:
    """Byte-deterministic CSV, written atomically under a file lock shared with concurrent rebuilds. The folder is
    made first: filelock 3.12.0, the floor, does not create the lock file's parent."""
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, float_format=float_format, lineterminator="\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        atomic_write_text(path, buffer.getvalue())


def rebuild_leaderboards(results_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Rewrite `out_dir/<name>.csv` from scratch for every leaderboard with complete results (see `leaderboard_groups`),
    with each suite's per-task table `<name>-tasks.csv` where its tasks declare their chance, and `<suite>-reference.csv`
    from its single-task reference runs."""
    from cvit_bench.reporting.tasks import reference_table, tasks_table

    written = {}
    results = find_results(results_dir)
    for name, group in leaderboard_groups(results).items():
        written[name] = inside(out_dir, f"{name}.csv")
        board = build_leaderboard(group)
        variants = board["method"].str.contains(":").any()  # registered method names never hold ':'
        write_leaderboard(with_paper_scores(board) if variants else board, written[name])
        if declares_chance(group):
            written[f"{name}-tasks"] = inside(out_dir, f"{name}-tasks.csv")
            write_leaderboard(tasks_table(runs_by_method(group)), written[f"{name}-tasks"])
    for suite, group in reference_groups(results).items():
        written[f"{suite}-reference"] = inside(out_dir, f"{suite}-reference.csv")
        write_leaderboard(reference_table(group), written[f"{suite}-reference"])
    return written


def declares_chance(results: list[dict]) -> bool:
    """Whether every task of the runs' suite declares its chance, which is what a per-task table compares against."""
    tasks = ((results[0]["run_info"].get("config") or {}).get("suite") or {}).get("tasks") or []
    return bool(tasks) and all(task.get("chance") is not None for task in tasks)


def runs_by_method(results: list[dict]) -> dict[str, list[dict]]:
    """Each method's runs, by seed."""
    runs = defaultdict(list)
    for result in sorted(results, key=lambda r: r["run_info"]["seed"]):
        runs[result["run_info"]["method"]].append(result)
    return runs


def _single_task(result: dict) -> str | None:
    return (result["run_info"].get("request") or {}).get("only")


def reference_groups(results: list[dict]) -> dict[str, list[dict]]:
    """Single-task reference runs (`run --only TASK`) per suite."""
    groups = defaultdict(list)
    for result in results:
        if _single_task(result) is not None:
            groups[result["run_info"]["suite"]].append(result)
    return dict(sorted(groups.items()))


def leaderboard_groups(results: list[dict]) -> dict[str, list[dict]]:
    """Runs per leaderboard, by name: `<suite>` for the suite's listed task order, `<suite>-order-<name>` for each other.

    A task order is part of a run's setup, so its runs get their own leaderboard; runs in the
    listed order keep the plain suite name, so suites run only in it have the leaderboards they had.
    Single-task reference runs are not continual runs: they go to the reference table instead.
    Named variants of a method (``run --variant``, ``ablate``) go to ``<name>-ablation-<method>``, one row
    per variant, labelled ``<method>:<variant>``.
    """
    groups = defaultdict(list)
    for result in results:
        if _single_task(result) is not None:
            continue
        suite, order = result["run_info"]["suite"], run_order(result)
        name = suite if order == DEFAULT_ORDER else f"{suite}-order-{order}"
        variant = run_variant(result)
        if variant is not None:
            method = result["run_info"]["method"]
            name, result = f"{name}-ablation-{method}", {**result, "run_info": {**result["run_info"], "method": f"{method}:{variant}"}}
        groups[name].append(result)
    return dict(sorted(groups.items()))


def run_variant(result: dict) -> str | None:
    """The name of the method variant a run trained (None: the method as configured by the suite)."""
    return (result["run_info"].get("request") or {}).get("variant")


def with_paper_scores(board: pd.DataFrame) -> pd.DataFrame:
    """An ablation board with each rung's published score (``paper``) beside its method column, from the method's ladder."""
    from cvit_bench.methods import METHODS

    def paper(label: str) -> float:
        method, _, variant = label.partition(":")
        rungs = {rung.name: rung.paper for rung in METHODS.get(method).ablation_ladder}
        return np.nan if rungs.get(variant) is None else rungs[variant]

    return board.assign(paper=board["method"].map(paper))[["method", "paper", *board.columns[1:]]]


def run_order(result: dict) -> str:
    """The name of the task order a run trained (`default`: the suite's listed order, which runs do not record)."""
    return order_label((result["run_info"].get("request") or {}).get("order"))


def _method_row(method: str, runs: list[dict], metrics: list[str]) -> dict:
    # Sorting by seed fixes the summation order, so the mean's last bits do not depend on discovery order.
    runs = sorted(runs, key=lambda run: run["run_info"]["seed"])
    _refuse_duplicate_seeds(method, runs)
    _refuse_mixed_setups(method, runs)
    row = {"method": method}
    recorded = [with_field_names(run["metrics"]) for run in runs]
    for metric in metrics:
        values = np.array([_as_float(run_metrics.get(metric)) for run_metrics in recorded])
        row[f"{metric}_mean"] = values.mean()
        row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
    row["n_seeds"] = len(runs)
    row["seeds"] = ";".join(str(run["run_info"]["seed"]) for run in runs)
    row["wall_time_s_mean"] = np.mean([run["timings"]["total_s"] for run in runs])
    return row


def _refuse_duplicate_seeds(method: str, runs_sorted_by_seed: list[dict]) -> None:
    for first, second in zip(runs_sorted_by_seed, runs_sorted_by_seed[1:]):
        if first["run_info"]["seed"] == second["run_info"]["seed"]:
            raise ValueError(
                f"two runs of {method} with seed {first['run_info']['seed']}: "
                f"{_describe(first)} and {_describe(second)}; remove one and rebuild"
            )


def _refuse_mixed_setups(method: str, runs: list[dict]) -> None:
    reference = runs[0]
    for run in runs[1:]:
        for field in SETUP_FIELDS:
            if _canonical(reference["run_info"].get(field)) != _canonical(run["run_info"].get(field)):
                detail = config_differences(reference["run_info"].get("config") or {}, run["run_info"].get("config") or {})
                raise ValueError(
                    f"refusing to average {method} runs with different {field}"
                    f"{' (' + ', '.join(detail) + ')' if detail else ''}: {_describe(reference)} and {_describe(run)}"
                )


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _describe(run: dict) -> str:
    info = run["run_info"]
    return run.get("results_path") or f"{info['method']} seed {info['seed']} finished {info.get('finished')}"


def _as_float(value: float | None) -> float:
    return np.nan if value is None else float(value)
