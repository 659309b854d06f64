"""Heatmap PNGs of a run's stage-by-task matrices: the picture of forgetting row by row.

Figures are built with `matplotlib.figure.Figure` and rendered by Agg directly, never through
pyplot: no display is needed, no global backend is switched, and no figure leaks into
pyplot's registry when many runs are plotted in one process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cvit_bench.io import atomic_write_bytes

NOT_EVALUATED_COLOUR = "lightgrey"


def plot_matrix(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """Annotated heatmap; None/NaN cells (not evaluated) are grey and unlabelled.

    The PNG carries no Software/version metadata, so the same matrix gives the same bytes.
    """
    values = np.array(matrix, dtype=float)
    evaluated = np.ma.masked_invalid(values)
    figure = Figure(figsize=(1.5 + 0.9 * values.shape[1], 1.2 + 0.5 * values.shape[0]), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad=NOT_EVALUATED_COLOUR)
    image = axes.imshow(evaluated, cmap=colour_map, aspect="auto")
    figure.colorbar(image, ax=axes)
    midpoint = (image.norm.vmin + image.norm.vmax) / 2 if evaluated.count() else 0.0
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            colour = "black" if value > midpoint else "white"
            axes.text(col, row, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(range(values.shape[1]), labels=col_labels, rotation=45, ha="right")
    axes.set_yticks(range(values.shape[0]), labels=row_labels)
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_run_heatmaps(result: dict, out_dir: Path) -> list[Path]:
    """VU and IF heatmaps of the seen tasks, plus unseen-task VU when the run evaluated any."""
    info = result["run_info"]
    matrices = result.get("matrices") or {}
    if not all(kind in (matrices.get("seen") or {}) for kind in ("vu", "if")):
        raise ValueError(f"{result.get('results_path', 'results')}: matrices.seen: no vu and if matrices to draw (report --no-heatmaps skips them)")
    run_name = f"{info['method']} on {info['suite']}, seed {info['seed']}"
    panels = [
        ("seen", "vu", info["task_order"], "VU score, seen tasks"),
        ("seen", "if", info["task_order"], "IF score, seen tasks"),
    ]
    if matrices.get("unseen") and info.get("unseen_tasks"):
        panels.append(("unseen", "vu", info["unseen_tasks"], "VU score, unseen tasks"))
    paths = []
    for split, score, tasks, what in panels:
        matrix = matrices[split][score]
        stages = [f"stage {stage}" for stage in range(len(matrix))]
        path = Path(out_dir) / f"{split}_{score}.png"
        paths.append(plot_matrix(matrix, stages, tasks, f"{what}\n{run_name}", path))
    return paths
