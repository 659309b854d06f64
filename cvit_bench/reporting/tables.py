"""Rich tables for `cvit-bench report`: pure builders, the CLI decides where to print them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from rich.table import Table

# One headline per dimension of dual forgetting: VU retention, transfer, IF retention, generalization.
# nAP and MIF's last-format floor show where the leaderboard has them (suites that declare chance; runs after cvit-v1).
MAIN_METRICS = ["AP", "nAP", "BWT", "forgetting", "FWT", "MIF", "MIF_floor", "IF-AP", "IF-BWT", "unseen_AP", "robustness_gap"]
MISSING = "–"


def leaderboard_table(df: pd.DataFrame, title: str = "Leaderboard") -> Table:
    """Mean ± std over seeds for the main metrics the leaderboard has; a single seed shows the mean alone."""
    metrics = [metric for metric in MAIN_METRICS if f"{metric}_mean" in df.columns]
    table = Table(title=title)
    table.add_column("method")
    table.add_column("seeds", justify="right")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for _, row in df.iterrows():
        cells = [format_mean_std(row[f"{metric}_mean"], row[f"{metric}_std"]) for metric in metrics]
        table.add_row(row["method"], str(row["n_seeds"]), *cells)
    return table


def rank_agreement_table(df: pd.DataFrame, title: str = "Rank agreement") -> Table:
    """Kendall τ-b per compared pair of seeds or task orders, as `rank_agreement` computed them."""
    table = Table("comparison", "a", "b", "methods", "τ", title=title)
    for _, row in df.iterrows():
        table.add_row(row["comparison"], row["a"], row["b"], str(row["n_methods"]), format_number(row["tau"], digits=3))
    return table


def matrix_table(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
) -> Table:
    """A stage-by-task matrix as text, for terminals where a heatmap cannot be shown."""
    table = Table(title=title)
    table.add_column("")
    for col in cols:
        table.add_column(col, justify="right")
    for label, values in zip(rows, np.array(matrix, dtype=float)):
        table.add_row(label, *(format_number(value, digits=1) for value in values))
    return table


def run_summary_table(result: dict) -> Table:
    """Every metric of one run, in the order the runner recorded them."""
    info = result["run_info"]
    table = Table(title=f"{info['method']} on {info['suite']}, seed {info['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result["metrics"].items():
        table.add_row(metric, format_number(value, digits=2))
    return table


def format_number(value: float | None, digits: int) -> str:
    """A number as every report shows it (terminal tables and the HTML page); not evaluated is a dash, never 0."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.{digits}f}"


def format_mean_std(mean: float, std: float) -> str:
    """Mean ± sample std over seeds; a single seed has no std, so the mean stands alone."""
    if math.isnan(std):
        return format_number(mean, digits=2)
    return f"{mean:.2f} ± {std:.2f}"
