"""Heatmaps of stage-by-task matrices, the picture of forgetting row by row: PNGs per run, SVG for the HTML page.

Figures are built with `matplotlib.figure.Figure` and rendered by Agg directly, never through
pyplot: no display is needed, no global backend is switched, and no figure leaks into
pyplot's registry when many runs are plotted in one process. The SVG variant is plain text with
the same colours and labelling rule, small enough to inline in a page without a data URI.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from html import escape
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from cvit_bench.io import atomic_write_bytes

NOT_EVALUATED_COLOUR = "lightgrey"
COLOUR_MAP = "viridis"


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
    colour_map = matplotlib.colormaps[COLOUR_MAP].with_extremes(bad=NOT_EVALUATED_COLOUR)
    image = axes.imshow(evaluated, cmap=colour_map, aspect="auto")
    figure.colorbar(image, ax=axes)
    midpoint = (image.norm.vmin + image.norm.vmax) / 2 if evaluated.count() else 0.0
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            colour = _label_colour(value, midpoint)
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


def _label_colour(value: float, midpoint: float) -> str:
    """Dark text on the bright upper half of viridis, light text on the dark lower half."""
    return "black" if value > midpoint else "white"


CELL_W, CELL_H, LABEL_W, HEADER_H = 56, 20, 58, 34


def heatmap_svg(matrix: Sequence[Sequence[float | None]] | np.ndarray, row_labels: Sequence[str],
                col_labels: Sequence[str], title: str) -> str:
    """The matrix as an inline SVG: one cell per entry coloured on the matrix's own range, its value written in it.

    Same colour map, grey for not evaluated and label rule as `plot_matrix`; the colour scale is per
    matrix (a caption matrix in CIDEr x 100 would wash out an accuracy one). ``title`` is the SVG's
    accessible name; the values themselves are text, so screen readers and text search reach them.
    """
    values = np.array(matrix, dtype=float)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    colours = matplotlib.colormaps[COLOUR_MAP]
    width, height = LABEL_W + CELL_W * values.shape[1], HEADER_H + CELL_H * values.shape[0]
    parts = [f'<svg role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-size="10" font-family="sans-serif"><title>{escape(title)}</title>']
    for col, label in enumerate(col_labels):
        x = LABEL_W + CELL_W * col + CELL_W / 2
        parts.append(f'<text x="{x:g}" y="{HEADER_H - 6}" text-anchor="middle">{escape(str(label))}</text>')
    for row, label in enumerate(row_labels):
        y = HEADER_H + CELL_H * row
        parts.append(f'<text x="{LABEL_W - 4}" y="{y + CELL_H / 2 + 3.5:g}" text-anchor="end">{escape(str(label))}</text>')
        for col, value in enumerate(values[row]):
            x = LABEL_W + CELL_W * col
            if not np.isfinite(value):
                parts.append(f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{NOT_EVALUATED_COLOUR}"/>')
                continue
            fill = to_hex(colours((value - low) / (high - low) if high > low else 0.0))
            parts.append(f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{fill}"/>'
                         f'<text x="{x + CELL_W / 2:g}" y="{y + CELL_H / 2 + 3.5:g}" text-anchor="middle" '
                         f'fill="{_label_colour(value, (low + high) / 2)}">{value:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)
