"""The committed leaderboards (and rank-agreement tables) are exactly what `cvit-bench report` rebuilds from the committed results."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cvit_bench.cli import app

LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def test_committed_csvs_are_what_report_rebuilds_byte_for_byte(tmp_path):
    result = CliRunner().invoke(app, ["report", "--results-dir", str(LEADERBOARDS / "runs"), "--out-dir", str(tmp_path), "--no-heatmaps"])
    assert result.exit_code == 0, result.output
    rebuilt = sorted(path.name for path in tmp_path.glob("*.csv"))
    assert rebuilt and rebuilt == sorted(path.name for path in LEADERBOARDS.glob("*.csv")), "a suite's CSV is missing or stale"
    for name in rebuilt:
        assert (tmp_path / name).read_bytes() == (LEADERBOARDS / name).read_bytes(), f"leaderboards/{name} differs from the rebuild"
