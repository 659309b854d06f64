"""The committed leaderboards (CSVs, rank-agreement tables, HTML pages) are exactly what `cvit-bench report` rebuilds from the committed results."""
from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from cvit_bench.cli import app

LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def test_committed_csvs_and_pages_are_what_report_rebuilds_byte_for_byte(tmp_path):
    # The pages link each run's results.json relative to themselves, so the results sit where they do beside the committed
    # pages: runs/ under the output directory (results.json only; local predictions and heatmaps are not read).
    shutil.copytree(LEADERBOARDS / "runs", tmp_path / "runs", ignore=lambda _, names: [n for n in names if "." in n and n != "results.json"])
    result = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path), "--no-heatmaps"])
    assert result.exit_code == 0, result.output
    for pattern in ("*.csv", "*.html"):
        rebuilt = sorted(path.name for path in tmp_path.glob(pattern))
        assert rebuilt and rebuilt == sorted(path.name for path in LEADERBOARDS.glob(pattern)), f"a {pattern} file is missing or stale"
        for name in rebuilt:
            assert (tmp_path / name).read_bytes() == (LEADERBOARDS / name).read_bytes(), f"leaderboards/{name} differs from the rebuild"
