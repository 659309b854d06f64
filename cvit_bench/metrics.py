"""Continual-learning metrics over score matrices (pure functions).

`R[j, i]` is the score on task i after training stage j. A matrix has T + 1 rows and T columns:
row 0 is the starting checkpoint (before any continual training), row j the model after stage j,
column i - 1 task i. NaN means "not evaluated" and is never read as 0: means skip it, and a
metric whose needed entries are all NaN is NaN. Definitions follow REFERENCE.md; tasks keep
their own scales (accuracy, CIDEr), so AP over mixed tasks mixes scales, as the papers do.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

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


# The field's names for this project's aggregates (MCITlib's tables; REFERENCE-FIELD.md), name -> ours.
FIELD_NAMES = {"MFN": "AP", "MAA": "MAP"}


def with_field_names(metrics: Mapping[str, float | None]) -> dict[str, float | None]:
    """``metrics`` plus MFN and MAA, the names MCITlib's tables give AP and MAP (MFT and BWT it names as we do).

    Over the accuracy matrix A (row t after task t, column j task j, T tasks) REFERENCE-FIELD.md defines
    MFN ("Last") = mean_j A[T][j] and MAA ("Avg") = mean_t mean_{j<=t} A[t][j]: term for term our AP
    (mean_i R[T,i]) and MAP (mean_j mean_{i<=j} R[j,i], stages 1..T; our row 0, the starting checkpoint,
    enters neither). The numbers are equal, not just alike, with two caveats that belong to the matrix, not
    the formula: a NaN (not evaluated) entry is skipped here, where the field's scripts evaluate every
    entry; and a task keeps its own scale (CIDEr x 100 for captions, while UCIT's caption score is the
    mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr). Derived from AP and MAP rather than computed again, so
    results written before these names existed read the same, and an absent AP or MAP stays absent.
    """
    return {**metrics, **{name: metrics[ours] for name, ours in FIELD_NAMES.items() if ours in metrics}}


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
    seen_if: np.ndarray | list, unseen_if: np.ndarray | list | None = None, unseen_datasets: Sequence[str] | None = None
) -> dict[str, float]:
    """MIF and the AP/MAP/BWT formulas applied to the seen-task instruction-following matrix.

    MIF follows SMoLoRA's code: the final model's IF rate averaged over every evaluated dataset,
    seen and unseen alike. Each dataset counts once: unseen columns of one dataset (``unseen_datasets``
    names each column's; scene's 0- and 5-shot columns) are averaged first, so a few-shot task is
    not weighted by its number of shot settings. Without names every column is a dataset.
    """
    seen = _stage_matrix(seen_if, "seen IF matrix")
    per_dataset = list(seen[-1])
    if unseen_if is not None:
        final = _stage_rows(unseen_if, seen.shape[0], "unseen IF matrix")[-1]
        names = list(unseen_datasets) if unseen_datasets is not None else list(range(len(final)))
        if len(names) != len(final):
            raise ValueError(f"{len(names)} dataset names for {len(final)} unseen columns")
        per_dataset += [_nanmean(final[[k for k, other in enumerate(names) if other == name]]) for name in dict.fromkeys(names)]
    return {
        "MIF": _nanmean(per_dataset),
        "IF-AP": _average_performance(seen),
        "IF-MAP": _mean_average_performance(seen),
        "IF-BWT": _backward_transfer(seen),
    }


def last_format_floor(dataset_families: Sequence[Sequence[str]], final_families: Collection[str]) -> float:
    """MIF of a model that answers every prompt in the last task's format, as MIF counts datasets.

    A reply passes the contracts of its own family and no other's (``contracts.py``), so such a
    model's IF rate on a dataset is the share of its prompts whose contract family is one the last
    task trains. ``dataset_families`` lists, per dataset, the family of each evaluated prompt.
    """
    return _nanmean(100.0 * np.mean([family in final_families for family in families]) for families in dataset_families)


def normalized_scores(final_row: Sequence[float], chance: Sequence[float], ceiling: Sequence[float]) -> np.ndarray:
    """Each task's score on nAP's scale: 100 (R[T,i] - chance_i) / (ceiling_i - chance_i); NaN where chance is NaN."""
    row, low, high = (np.asarray(values, dtype=float) for values in (final_row, chance, ceiling))
    if not row.shape == low.shape == high.shape:
        raise ValueError(f"final row, chance and ceiling differ in length: {row.shape}, {low.shape}, {high.shape}")
    if np.any(high <= low):
        raise ValueError("every ceiling must exceed its chance")
    return 100.0 * (row - low) / (high - low)


def normalized_average_performance(final_row: Sequence[float], chance: Sequence[float], ceiling: Sequence[float]) -> float:
    """nAP: AP after mapping each task onto 0 (its image-blind chance) .. 100 (its ceiling).

    nAP = mean_i 100 (R[T,i] - chance_i) / (ceiling_i - chance_i). AP mixes scales (CIDEr x 100
    reaches several hundred) and counts a constant reply's score as performance; nAP does neither.
    """
    return _nanmean(normalized_scores(final_row, chance, ceiling))


BOOTSTRAP = {"level": 0.95, "resamples": 1000, "seed": 0}  # the intervals results.json records, stated beside them


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP["resamples"], level: float = BOOTSTRAP["level"],
                       seed: int = BOOTSTRAP["seed"]) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items with replacement).

    One test set's mean has a sampling error that seeds do not show; this interval is it. Fixed
    ``seed``, so a result file is reproducible; all resamples are drawn as one index matrix.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return _NAN, _NAN
    means = data[np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


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


def all_metrics(
    matrices: Mapping[str, Mapping[str, np.ndarray | list]],
    *,
    chance: Sequence[float] | None = None,
    ceiling: Sequence[float] | None = None,
    unseen_datasets: Sequence[str] | None = None,
) -> dict[str, float]:
    """Every metric from {"seen": {"vu", "if"}, "unseen": {"vu", "if"}, "heldout": {"vu", ...}}, with the field's names.

    Only "seen"/"vu" is required; metrics of a missing matrix are left out rather than guessed.
    ``chance`` and ``ceiling`` (per seen task, in matrix order) add nAP; ``unseen_datasets`` names
    each unseen column's dataset for MIF.
    """
    seen = matrices["seen"]
    seen_vu = _stage_matrix(seen["vu"], "seen VU matrix")
    unseen = matrices.get("unseen", {})
    heldout = matrices.get("heldout", {})
    metrics = continual_metrics(seen_vu)
    if chance is not None and ceiling is not None:
        metrics["nAP"] = normalized_average_performance(seen_vu[-1], chance, ceiling)
    if "if" in seen:
        metrics.update(instruction_following_metrics(seen["if"], unseen.get("if"), unseen_datasets))
    if "vu" in unseen:
        _stage_rows(unseen["vu"], seen_vu.shape[0], "unseen VU matrix")
        metrics.update(unseen_metrics(unseen["vu"]))
    if "vu" in heldout:
        metrics.update(heldout_metrics(seen_vu, heldout["vu"]))
    return with_field_names(metrics)
