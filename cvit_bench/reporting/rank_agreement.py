"""Rank agreement: does a suite rank its methods the same way across seeds and across task orders?

A leaderboard's order of methods is its claim; Kendall's τ-b between the methods' AP under two
seeds (or two task orders) says how much of that claim survives a re-run. τ = 1 is the same
ranking, 0 no relation, -1 the reverse. Seeds are compared within one task order on the methods
that have both seeds; orders on each method's mean AP over the order's seeds. A comparison needs
at least `MIN_METHODS` methods: with two, τ can only be ±1.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cvit_bench.reporting.leaderboard import run_order, write_leaderboard
from cvit_bench.suites.orders import default_run_id
from cvit_bench.suites.schema import DEFAULT_ORDER

METRIC = "AP"
MIN_METHODS = 3
COLUMNS = ["suite", "metric", "comparison", "a", "b", "n_methods", "tau"]


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two paired score lists: (C - D) / sqrt((n0 - n1)(n0 - n2)).

    C and D count the concordant and discordant pairs, n0 all pairs, n1 and n2 the pairs tied in
    x and in y. Ties lower the denominator instead of counting as agreement, so tied scores are
    neither rewarded nor punished. NaN when x or y ties everything (no ranking to compare).
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} x values but {len(y)} y values")
    if any(math.isnan(v) for v in (*x, *y)):
        raise ValueError("kendall_tau_b: NaN scores have no rank; leave those items out")
    concordant = discordant = untied_x = untied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sign_x, sign_y = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        untied_x += sign_x != 0
        untied_y += sign_y != 0
        if sign_x and sign_y:
            concordant += sign_x == sign_y
            discordant += sign_x != sign_y
    if not untied_x or not untied_y:
        return float("nan")
    return float((concordant - discordant) / math.sqrt(untied_x * untied_y))


def _sign(difference: float) -> int:
    return (difference > 0) - (difference < 0)


def rank_agreement(results: list[dict], metric: str = METRIC) -> pd.DataFrame:
    """Rows of τ for one suite's runs: every pair of seeds within an order, every pair of orders, each kind closed by
    its mean and min over pairs (``a`` = mean|min, ``b`` = the number of pairs, ``n_methods`` the fewest any pair had).

    Expects the runs a leaderboard accepted (no repeated seed of a method within an order).
    """
    suites = sorted({result["run_info"]["suite"] for result in results})
    if len(suites) > 1:
        raise ValueError(f"rank agreement covers one suite, got results from {suites}")
    scores: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))  # order -> seed -> method -> score
    for result in results:
        value = result["metrics"].get(metric)
        scores[run_order(result)][result["run_info"]["seed"]][result["run_info"]["method"]] = math.nan if value is None else float(value)
    _refuse_orders_of_different_setups(results)
    orders = sorted(scores, key=lambda label: (label != DEFAULT_ORDER, label))
    seed_rows = [
        _row("seeds", default_run_id(a, order), default_run_id(b, order), scores[order][a], scores[order][b])
        for order in orders
        for a, b in itertools.combinations(sorted(scores[order]), 2)
    ]
    order_means = {order: _mean_per_method(scores[order]) for order in orders}
    order_rows = [_row("orders", a, b, order_means[a], order_means[b]) for a, b in itertools.combinations(orders, 2)]
    rows = [*_with_summary("seeds", seed_rows), *_with_summary("orders", order_rows)]
    return pd.DataFrame([{"suite": suites[0], "metric": metric, **row} for row in rows], columns=COLUMNS)


def _row(comparison: str, a: str, b: str, scores_a: dict[str, float], scores_b: dict[str, float]) -> dict | None:
    common = sorted(m for m in scores_a.keys() & scores_b.keys() if not (math.isnan(scores_a[m]) or math.isnan(scores_b[m])))
    if len(common) < MIN_METHODS:
        return None
    tau = kendall_tau_b([scores_a[m] for m in common], [scores_b[m] for m in common])
    return {"comparison": comparison, "a": a, "b": b, "n_methods": len(common), "tau": tau}


def _with_summary(comparison: str, rows: list[dict | None]) -> list[dict]:
    rows = [row for row in rows if row is not None]
    if not rows:
        return []
    taus = [row["tau"] for row in rows if not math.isnan(row["tau"])]
    fewest = min(row["n_methods"] for row in rows)
    summary = [("mean", float(np.mean(taus)) if taus else math.nan), ("min", min(taus) if taus else math.nan)]
    return rows + [{"comparison": comparison, "a": name, "b": f"{len(rows)} pairs", "n_methods": fewest, "tau": tau} for name, tau in summary]


def _mean_per_method(by_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Each method's mean over the order's seeds; NaN when a seed lacks the score (as in the leaderboard)."""
    per_method: dict[str, list[float]] = defaultdict(list)
    for seed in sorted(by_seed):
        for method, value in by_seed[seed].items():
            per_method[method].append(value)
    return {method: float(np.mean(values)) for method, values in per_method.items()}


def _refuse_orders_of_different_setups(results: list[dict]) -> None:
    """Orders are compared only when a method's runs differ in nothing but the order of the tasks."""
    first_of_method: dict[str, dict] = {}
    for result in results:
        method = result["run_info"]["method"]
        reference = first_of_method.setdefault(method, result)
        if _setup_but_order(reference) != _setup_but_order(result):
            raise ValueError(f"refusing to compare task orders of {method}: {reference.get('results_path')} and "
                             f"{result.get('results_path')} differ in more than the order of the tasks")


def _setup_but_order(result: dict) -> str:
    config = json.loads(json.dumps(result["run_info"].get("config") or {}))
    suite = config.get("suite") or {}
    if "tasks" in suite:
        suite["tasks"] = sorted(suite["tasks"], key=lambda task: task["name"])
    return json.dumps(config, sort_keys=True)


def rebuild_rank_agreement(results: list[dict], out_dir: Path) -> dict[str, tuple[Path, pd.DataFrame]]:
    """Write ``out_dir/<suite>-rank-agreement.csv`` for every suite with at least one comparison; {suite: (path, table)}."""
    by_suite = defaultdict(list)
    for result in results:
        request = result["run_info"].get("request") or {}
        if request.get("only") is None and request.get("variant") is None:  # reference runs and variants rank nothing
            by_suite[result["run_info"]["suite"]].append(result)
    written = {}
    for suite, runs in sorted(by_suite.items()):
        table = rank_agreement(runs)
        if len(table):
            path = Path(out_dir) / f"{suite}-rank-agreement.csv"
            write_leaderboard(table, path, float_format="%.3f")
            written[suite] = (path, table)
    return written
