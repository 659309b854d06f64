"""The per-task leaderboard (``<suite>-tasks.csv``): was each task learned, and what is left of it at the end?

A suite's AP means something only where its tasks were learned: this table puts every method's
diagonal R[i, i] (the task just after training it) and final-row score R[T, i] next to the task's
image-blind chance, with how often the most frequent reply was given, so a constant answer is
seen for what it is. ``final_norm_mean`` maps the final score onto nAP's 0 (chance) .. 100 (ceiling)
scale and ``nAP_share`` is the task's part of the method's nAP: a share above 0.5 means one task
carries the headline number.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cvit_bench.metrics import normalized_scores

COLUMNS = ("method", "task", "chance", "diag_mean", "diag_std", "final_mean", "final_std",
           "final_norm_mean", "nAP_share", "diag_top_reply_share", "n_items", "n_seeds")


def _declared(run: dict, key: str, default: float | None = None) -> dict[str, float | None]:
    """A suite field (``chance``, ``ceiling``) of every seen task, by task name."""
    tasks = run["run_info"]["config"]["suite"]["tasks"]
    return {task["name"]: default if task.get(key) is None else task[key] for task in tasks}


def task_rows(method: str, runs: list[dict]) -> list[dict]:
    """One row per seen task of one method's runs (seeds of one setup)."""
    first = runs[0]
    tasks = first["run_info"]["task_order"]
    chance, ceiling = _declared(first, "chance"), _declared(first, "ceiling", 100.0)
    diag = np.array([[run["matrices"]["seen"]["vu"][i + 1][i] for i in range(len(tasks))] for run in runs], dtype=float)
    final = np.array([run["matrices"]["seen"]["vu"][-1] for run in runs], dtype=float)
    shares = [run.get("top_reply_share", {}).get("seen") for run in runs]
    low = [np.nan if chance[t] is None else chance[t] for t in tasks]
    normalized = normalized_scores(final.mean(axis=0), low, [ceiling[t] for t in tasks])  # NaN where no chance is declared
    total = np.nansum(normalized)  # nAP averages the tasks that declare a chance
    rows = []
    for i, task in enumerate(tasks):
        diag_share = [s[i + 1][i] for s in shares if s is not None]
        rows.append({
            "method": method, "task": task, "chance": chance.get(task),
            "diag_mean": diag[:, i].mean(), "diag_std": diag[:, i].std(ddof=1) if len(runs) > 1 else np.nan,
            "final_mean": final[:, i].mean(), "final_std": final[:, i].std(ddof=1) if len(runs) > 1 else np.nan,
            "final_norm_mean": normalized[i], "nAP_share": normalized[i] / total if total > 0 else np.nan,
            "diag_top_reply_share": float(np.mean(diag_share)) if diag_share else np.nan,
            "n_items": first.get("n_items", {}).get("seen", {}).get(task), "n_seeds": len(runs),
        })
    return rows


def tasks_table(runs_by_method: dict[str, list[dict]]) -> pd.DataFrame:
    rows = [row for method in sorted(runs_by_method) for row in task_rows(method, runs_by_method[method])]
    return pd.DataFrame(rows, columns=list(COLUMNS))


REFERENCE_COLUMNS = ("method", "task", "chance", "zero_shot_mean", "score_mean", "score_std", "top_reply_share", "n_items", "n_seeds")


def reference_table(results: list[dict]) -> pd.DataFrame:
    """DESIGN §4's single-task reference runs: each method on each task alone from the base, against the task's chance."""
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for result in sorted(results, key=lambda r: r["run_info"]["seed"]):
        by_cell.setdefault((result["run_info"]["method"], result["run_info"]["task_order"][0]), []).append(result)
    rows = []
    for (method, task), runs in sorted(by_cell.items()):
        scores = np.array([run["matrices"]["seen"]["vu"][1][0] for run in runs], dtype=float)
        shares = [run["top_reply_share"]["seen"][1][0] for run in runs if "top_reply_share" in run]
        rows.append({
            "method": method, "task": task, "chance": _declared(runs[0], "chance").get(task),
            "zero_shot_mean": float(np.mean([run["matrices"]["seen"]["vu"][0][0] for run in runs])),
            "score_mean": scores.mean(), "score_std": scores.std(ddof=1) if len(runs) > 1 else np.nan,
            "top_reply_share": float(np.mean(shares)) if shares else np.nan,
            "n_items": runs[0].get("n_items", {}).get("seen", {}).get(task), "n_seeds": len(runs),
        })
    return pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
