"""Static leaderboard pages: one self-contained HTML file per leaderboard, and an index of them.

A page has to open from a clone, an archive or a CI artifact with no server and no network, so
its style, its sort script and its heatmaps (SVG) are inline and its only links are relative: to
the CSV beside it and to each run's results.json. It shows what the CSVs hold, built by the same
functions (`build_leaderboard`, `tasks_table`, `reference_table`, `rank_agreement`), so page and
CSVs cannot disagree; the heatmaps add each method's matrices averaged over its seeds. The tables
read without JavaScript, in the CSVs' order; the script only turns the column headers into sort
buttons. A page holds no date and no absolute path: the same results give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from cvit_bench.io import atomic_write_text
from cvit_bench.metrics import FIELD_NAMES
from cvit_bench.paths import inside
from cvit_bench.reporting.claims import Claim, claims_table, load_claims
from cvit_bench.reporting.heatmaps import heatmap_svg
from cvit_bench.reporting.leaderboard import (
    build_leaderboard,
    declares_chance,
    leaderboard_groups,
    reference_groups,
    run_order,
    runs_by_method,
)
from cvit_bench.reporting.tables import MISSING, format_mean_std, format_number
from cvit_bench.reporting.tasks import reference_table, tasks_table

INDEX = "index"
ALIASES = {ours: field for field, ours in FIELD_NAMES.items()}  # AP -> MFN: shown under our name, not as a second column
DIGITS = {"tau": 3}  # columns shown with other than 2 decimals; n_* counts have none
NUMERIC = ' class="num"'
NUMBER_HEADER = NUMERIC + ' data-type="number"'  # the sort script compares a numeric column's values as numbers
SORTED = ' aria-sort="descending"'

STYLE = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.4; color: #1a1a1a; background: #fff; }
body { margin: 1.5rem; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; }
h2 { font-size: 1.15rem; margin: 1.6rem 0 .4rem; }
p, caption, figcaption { max-width: 62rem; }
a { color: #1a5fb4; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; margin: .3rem 0 .6rem; }
caption { caption-side: bottom; text-align: left; padding-top: .4rem; color: #444; font-size: .8rem; }
th, td { padding: .25rem .55rem; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #eef1f5; text-align: left; vertical-align: bottom; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f8f9fb; }
th button { font: inherit; font-weight: bold; color: inherit; background: none; border: 0; padding: 0; cursor: pointer; text-align: inherit; }
th button:focus-visible { outline: 2px solid #1a5fb4; outline-offset: 2px; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
.alias { display: block; font-weight: normal; color: #555; font-size: .75rem; }
.heatmaps { display: flex; flex-wrap: wrap; gap: .8rem; }
figure { margin: 0; padding: .4rem; border: 1px solid #ddd; }
figcaption { font-size: .85rem; margin-bottom: .3rem; }
"""

# Sorts the table whose header button was pressed by each cell's data-value: numbers on the first press high to
# low (the leaderboard's reading), text A to Z, a second press reverses; cells without a value stay last.
SCRIPT = """
"use strict";
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach(function (header, column) {
    var button = document.createElement("button");
    button.type = "button";
    while (header.firstChild) button.appendChild(header.firstChild);
    header.appendChild(button);
    button.addEventListener("click", function () {
      var numeric = header.dataset.type === "number";
      var current = header.getAttribute("aria-sort");
      var ascending = current ? current === "descending" : !numeric;
      headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        if (x === "" || y === "") return (x === "") - (y === "");
        var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def write_pages(results: list[dict], out_dir: Path, agreement: Mapping[str, pd.DataFrame],
                claims_folder: Path | None = None) -> dict[str, Path]:
    """Write ``out_dir/<name>.html`` for every leaderboard of ``results`` and ``out_dir/index.html``; {name: path}.

    ``agreement`` holds each suite's rank-agreement table (as `rebuild_rank_agreement` wrote it); it and the
    suite's single-task reference runs appear on the page of the suite's listed task order. Every page shows the
    claims listed for its suite (``load_claims``: the shipped claims files, or those in ``claims_folder``).
    """
    groups = leaderboard_groups(results)
    if INDEX in groups:
        raise ValueError(f"a leaderboard named {INDEX!r} would overwrite the index page; rename the suite")
    references = reference_groups(results)
    written = {}
    for name, runs in groups.items():
        suite = runs[0]["run_info"]["suite"]
        listed_order = name == suite
        page = leaderboard_page(name, runs, Path(out_dir), references.get(suite, []) if listed_order else [],
                                agreement.get(suite) if listed_order else None, load_claims(suite, claims_folder))
        written[name] = inside(out_dir, f"{name}.html")
        atomic_write_text(written[name], page)
    written[INDEX] = inside(out_dir, f"{INDEX}.html")
    atomic_write_text(written[INDEX], index_page(groups))
    return written


def leaderboard_page(name: str, runs: list[dict], out_dir: Path, reference_runs: list[dict],
                     agreement: pd.DataFrame | None, claims: Sequence[Claim] = ()) -> str:
    """One leaderboard's page: the leaderboard, the claims it tests, its rank agreement, per-task and reference
    tables, heatmaps."""
    board = build_leaderboard(runs)
    by_method = runs_by_method(runs)
    info = runs[0]["run_info"]
    intro = (f"{len(board)} methods, {len(runs)} runs of suite <b>{escape(info['suite'])}</b>, task order "
             f"{escape(run_order(runs[0]))} ({escape(' → '.join(info['task_order']))}). Rebuilt by "
             f"<code>cvit-bench report</code> from the runs' results.json files, as is "
             f"<a href=\"{quote(name)}.csv\">{escape(name)}.csv</a>.")
    sections = [f"<p>{intro}</p>", _leaderboard_section(board, by_method, out_dir)]
    if claims:
        sections.append(_frame_section("Claims", claims_table(list(claims), board),
                                       "Published claims decided from the rows above: a comparison holds when the difference "
                                       "is at least what the seeds can detect (80 % power, two-sided 5 %, pooled seed std), "
                                       "does not hold when it goes the other way by as much, and is not shown in between."))
    if agreement is not None and len(agreement):
        sections.append(_frame_section("Rank agreement", agreement.drop(columns=["suite"]),
                                       "Kendall τ-b of the methods' AP between two seeds or two task orders; "
                                       "1 is the same ranking, 0 none. The mean and min rows summarise the pairs."))
    if declares_chance(runs):
        sections.append(_frame_section("Per task", tasks_table(by_method),
                                       "Each seen task: its image-blind chance, the score just after training it "
                                       "(diag) and at the end (final), mean ± std over seeds."))
    if reference_runs:
        sections.append(_frame_section("Single-task reference runs", reference_table(reference_runs),
                                       "Each method trained on one task alone from the base, against the task's chance."))
    sections.append(_heatmap_section(list(board["method"]), by_method))
    return _document(f"Leaderboard: {name}", "".join(sections))


def index_page(groups: Mapping[str, list[dict]]) -> str:
    """The list of leaderboard pages, with each one's suite, task order and size."""
    rows = []
    for name, runs in groups.items():
        methods = runs_by_method(runs)
        seeds = sorted({len(method_runs) for method_runs in methods.values()})
        cells = [
            _cell(f'<a href="{quote(name)}.html">{escape(name)}</a>', name),
            _cell(escape(runs[0]["run_info"]["suite"]), runs[0]["run_info"]["suite"]),
            _cell(escape(run_order(runs[0])), run_order(runs[0])),
            _cell(str(len(methods)), len(methods), numeric=True),
            _cell(str(len(runs)), len(runs), numeric=True),
            _cell(str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}", seeds[0], numeric=True),
        ]
        rows.append(cells)
    headers = [("leaderboard", False), ("suite", False), ("task order", False), ("methods", True), ("runs", True),
               ("seeds per method", True)]
    table = _table(headers, rows, "One page per suite and task order, each rebuilt from its complete runs.")
    body = table if rows else "<p>No complete runs yet: run <code>cvit-bench run</code>, then <code>cvit-bench report</code>.</p>"
    return _document("cvit-bench leaderboards", body, index=True)


def _leaderboard_section(board: pd.DataFrame, by_method: Mapping[str, list[dict]], out_dir: Path) -> str:
    metrics = [column[: -len("_mean")] for column in board.columns if column.endswith("_mean")
               and column != "wall_time_s_mean" and column[: -len("_mean")] not in FIELD_NAMES]
    headers = [("method", False), ("seeds", True)]
    headers += [(escape(metric) + (f' <span class="alias">= {ALIASES[metric]}</span>' if metric in ALIASES else ""), True)
                for metric in metrics]
    headers += [("wall (min)", True), ("results", False)]
    rows = []
    for _, row in board.iterrows():
        links = " ".join(f'<a href="{_relative(run["results_path"], out_dir)}">seed {run["run_info"]["seed"]}</a>'
                         for run in by_method[row["method"]])
        rows.append([
            _cell(escape(row["method"]), row["method"]),
            _cell(str(row["n_seeds"]), row["n_seeds"], numeric=True),
            *(_cell(format_mean_std(row[f"{m}_mean"], row[f"{m}_std"]), row[f"{m}_mean"], numeric=True) for m in metrics),
            _cell(format_number(row["wall_time_s_mean"] / 60, digits=1), row["wall_time_s_mean"], numeric=True),
            _cell(links, row["seeds"]),
        ])
    aliases = ", ".join(f"{ours} = {field}" for ours, field in ALIASES.items())
    caption = (f"Mean ± sample std over seeds, best AP first; {MISSING} where a seed did not report the metric. "
               f"{aliases}: the names MCITlib's tables use (MFT and BWT are named alike). Each seed links to its results.json.")
    return "<h2>Leaderboard</h2>" + _table(headers, rows, caption, sorted_column=2)  # build_leaderboard sorts by AP, the first metric


def _frame_section(title: str, frame: pd.DataFrame, caption: str) -> str:
    """A derived table as the CSVs hold it, with each ``x_mean``/``x_std`` pair shown as one mean ± std column."""
    columns = [c for c in frame.columns if not (c.endswith("_std") and f"{c[:-4]}_mean" in frame.columns)]
    headers, rows = [], []
    for column in columns:
        paired = column.endswith("_mean") and f"{column[:-5]}_std" in frame.columns
        headers.append((escape(column[:-5] if paired else column), pd.api.types.is_numeric_dtype(frame[column])))
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if column.endswith("_mean") and f"{column[:-5]}_std" in frame.columns:
                cells.append(_cell(format_mean_std(value, row[f"{column[:-5]}_std"]), value, numeric=True))
            elif pd.api.types.is_numeric_dtype(frame[column]):
                digits = 0 if column.startswith("n_") else DIGITS.get(column, 2)
                cells.append(_cell(format_number(None if pd.isna(value) else float(value), digits), value, numeric=True))
            else:
                cells.append(_cell(MISSING if pd.isna(value) else escape(str(value)), None if pd.isna(value) else value))
        rows.append(cells)
    return f"<h2>{escape(title)}</h2>" + _table(headers, rows, caption)


def _heatmap_section(methods: list[str], by_method: Mapping[str, list[dict]]) -> str:
    figures = []
    for method in methods:
        runs = by_method[method]
        seeds = ", ".join(str(run["run_info"]["seed"]) for run in runs)
        panels = []
        for kind, what in (("vu", "VU score"), ("if", "IF score")):
            matrix = _mean_matrix(runs, kind)
            if matrix is not None:
                stages = [f"stage {stage}" for stage in range(len(matrix))]
                title = f"{what}, seen tasks, {method}, mean over seeds {seeds}"
                panels.append(heatmap_svg(matrix, stages, runs[0]["run_info"]["task_order"], title))
        if panels:
            figures.append(f"<figure><figcaption><b>{escape(method)}</b>: VU (left) and IF (right), "
                           f"mean over seed{'s' if len(runs) > 1 else ''} {escape(seeds)}</figcaption>{''.join(panels)}</figure>")
    if not figures:
        return ""
    return ("<h2>Heatmaps</h2><p>Row <i>t</i>: the model after stage <i>t</i> (stage 0: before continual training); "
            "column: a seen task. Colours span each matrix's own range; grey: not evaluated.</p>"
            f'<div class="heatmaps">{"".join(figures)}</div>')


def _mean_matrix(runs: list[dict], kind: str) -> np.ndarray | None:
    """The seeds' mean seen-task matrix of ``kind``; NaN where any seed lacks the entry, None when a run has no such matrix."""
    matrices = [((run.get("matrices") or {}).get("seen") or {}).get(kind) for run in runs]
    if any(matrix is None for matrix in matrices) or len({np.shape(matrix) for matrix in matrices}) != 1:
        return None
    return np.array(matrices, dtype=float).mean(axis=0)


def _relative(results_path: str, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(results_path).resolve(), Path(out_dir).resolve())).as_posix())


def _cell(content: str, value: object, numeric: bool = False) -> str:
    """A table cell whose ``data-value`` (what the sort script compares) is the raw value, empty when missing."""
    missing = value is None or (isinstance(value, float) and np.isnan(value))
    key = "" if missing else escape(str(value), quote=True)
    return f'<td{NUMERIC if numeric else ""} data-value="{key}">{content}</td>'


def _table(headers: list[tuple[str, bool]], rows: list[list[str]], caption: str, sorted_column: int | None = None) -> str:
    """A sortable table; ``sorted_column`` is the column the rows already come sorted by, high to low."""
    head = "".join(
        f'<th scope="col"{NUMBER_HEADER if numeric else ""}{SORTED if column == sorted_column else ""}>{label}</th>'
        for column, (label, numeric) in enumerate(headers)
    )
    body = "".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return (f'<div class="scroll"><table class="sortable"><caption>{escape(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _document(title: str, body: str, index: bool = False) -> str:
    nav = "" if index else '<nav><a href="index.html">All leaderboards</a></nav>'
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{nav}<main>\n<h1>{escape(title)}</h1>\n{body}\n</main>\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")
