"""Continual-learning metrics over score matrices (pure functions).

`R[j, i]` is the score on task i after training stage j. A matrix has T + 1 rows and T columns:
row 0 is the starting checkpoint (before any continual training), row j the model after stage j,
column i - 1 task i. NaN means "not evaluated" and is never read as 0: means skip it, and a
metric whose needed entries are all NaN is NaN. Definitions follow REFERENCE.md; tasks keep
their own scales (accuracy, CIDEr), so AP over mixed tasks mixes scales, as the papers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

_NAN = float("nan")


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the evaluated entries; NaN (without numpy's empty-slice warning) if there are none."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else _NAN


def _nanmax(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else _NAN


def _stage_matrix(matrix: np.ndarray | list, name: str = "matrix") -> np.ndarray:
    arr = np.asarray(matrix, dtype=float)
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] != arr.shape[1] + 1:
        raise ValueError(f"expected a (T+1) x T {name}, got shape {arr.shape}")
    return arr


def _stage_rows(matrix: np.ndarray | list, n_rows: int | None, name: str) -> np.ndarray:
    """A (T+1) x U matrix of tasks that are evaluated but not trained (unseen tasks)."""
    arr = np.asarray(matrix, dtype=float)
    if arr.ndim != 2 or arr.shape[0] < 2 or (n_rows is not None and arr.shape[0] != n_rows):
        rows = "T+1" if n_rows is None else str(n_rows)
        raise ValueError(f"expected a {rows} x U {name}, got shape {arr.shape}")
    return arr


def _average_performance(r: np.ndarray) -> float:
    return _nanmean(r[-1])


def _mean_average_performance(r: np.ndarray) -> float:
    n_tasks = r.shape[1]
    return _nanmean(_nanmean(r[j, :j]) for j in range(1, n_tasks + 1))


def _backward_transfer(r: np.ndarray) -> float:
    n_tasks = r.shape[1]
    return _nanmean(r[n_tasks, i - 1] - r[i, i - 1] for i in range(1, n_tasks))


def continual_metrics(matrix: np.ndarray | list) -> dict[str, float]:
    """AP, MAP, MFT, BWT, forgetting and FWT of a (T+1) x T matrix (tasks numbered 1..T).

    AP = mean_i R[T,i]; MAP = mean_j mean_{i<=j} R[j,i]; MFT = mean_i R[i,i];
    BWT = mean_{i<T} R[T,i] - R[i,i]; forgetting = mean_{i<T} max_{i<=j<T} R[j,i] - R[T,i];
    FWT = mean_{i>=2} R[i-1,i] - R[0,i]. With a single task BWT, forgetting and FWT are NaN.
    """
    r = _stage_matrix(matrix)
    n_tasks = r.shape[1]
    forgetting = (_nanmax(r[i:n_tasks, i - 1]) - r[n_tasks, i - 1] for i in range(1, n_tasks))
    return {
        "AP": _average_performance(r),
        "MAP": _mean_average_performance(r),
        "MFT": _nanmean(r[i, i - 1] for i in range(1, n_tasks + 1)),
        "BWT": _backward_transfer(r),
        "forgetting": _nanmean(forgetting),
        "FWT": _nanmean(r[i - 1, i - 1] - r[0, i - 1] for i in range(2, n_tasks + 1)),
    }


def instruction_following_metrics(
    seen_if: np.ndarray | list, unseen_if: np.ndarray | list | None = None
) -> dict[str, float]:
    """MIF and the AP/MAP/BWT formulas applied to the seen-task instruction-following matrix.

    MIF follows SMoLoRA's code: the final model's IF rate averaged over every evaluated dataset,
    seen and unseen alike (each dataset counts once, not each group).
    """
    seen = _stage_matrix(seen_if, "seen IF matrix")
    final_rows = [seen[-1]]
    if unseen_if is not None:
        final_rows.append(_stage_rows(unseen_if, seen.shape[0], "unseen IF matrix")[-1])
    return {
        "MIF": _nanmean(np.concatenate(final_rows)),
        "IF-AP": _average_performance(seen),
        "IF-MAP": _mean_average_performance(seen),
        "IF-BWT": _backward_transfer(seen),
    }


def unseen_metrics(unseen: np.ndarray | list) -> dict[str, float]:
    """Unseen-task AP: the final model's mean score over tasks it was never trained on."""
    return {"unseen_AP": _nanmean(_stage_rows(unseen, None, "unseen matrix")[-1])}


def heldout_metrics(seen_vu: np.ndarray | list, heldout_vu: np.ndarray | list) -> dict[str, float]:
    """AP under held-out instruction phrasings and the robustness gap AP(train) - AP(held-out)."""
    seen = _stage_matrix(seen_vu, "seen matrix")
    heldout = _stage_matrix(heldout_vu, "held-out matrix")
    if heldout.shape != seen.shape:
        raise ValueError(f"held-out matrix shape {heldout.shape} differs from seen {seen.shape}")
    heldout_ap = _average_performance(heldout)
    return {"heldout_AP": heldout_ap, "robustness_gap": _average_performance(seen) - heldout_ap}


def all_metrics(matrices: Mapping[str, Mapping[str, np.ndarray | list]]) -> dict[str, float]:
    """Every metric from {"seen": {"vu", "if"}, "unseen": {"vu", "if"}, "heldout": {"vu", ...}}.

    Only "seen"/"vu" is required; metrics of a missing matrix are left out rather than guessed.
    """
    seen = matrices["seen"]
    seen_vu = _stage_matrix(seen["vu"], "seen VU matrix")
    unseen = matrices.get("unseen", {})
    heldout = matrices.get("heldout", {})
    metrics = continual_metrics(seen_vu)
    if "if" in seen:
        metrics.update(instruction_following_metrics(seen["if"], unseen.get("if")))
    if "vu" in unseen:
        _stage_rows(unseen["vu"], seen_vu.shape[0], "unseen VU matrix")
        metrics.update(unseen_metrics(unseen["vu"]))
    if "vu" in heldout:
        metrics.update(heldout_metrics(seen_vu, heldout["vu"]))
    return metrics
