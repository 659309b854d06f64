"""Named variants and `cvit-bench ablate`: a method's ablation ladder as rows of their own, beside the paper's scores."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvit_bench.cli import _parse_options, app
from cvit_bench.methods import METHODS
from cvit_bench.methods.base import Rung
from cvit_bench.methods.branchlora import BranchLora
from cvit_bench.registry import ConfigError
from cvit_bench.reporting.leaderboard import build_leaderboard, leaderboard_groups, with_paper_scores
from cvit_bench.reporting.rank_agreement import rebuild_rank_agreement
from cvit_bench.runner import RunOptions, build_method
from cvit_bench.suites.schema import load_suite
from cvit_bench.sweep import plan_ablation
from test_reporting import make_result

SMOKE = "cvit-v1-smoke"
PAPER_LADDER = [37.13, 38.19, 39.96, 42.22, 44.20]


def _options(rung: Rung) -> dict:
    """The rung's options as the command line parses the --option values its runs get."""
    args = rung.option_args()
    return _parse_options(args[1::2])


def test_branchloras_ladder_adds_one_part_per_rung_up_to_its_defaults_routed_per_token():
    ladder = BranchLora.ablation_ladder
    assert [rung.paper for rung in ladder] == PAPER_LADDER
    configs = [build_method("branchlora", _options(rung)).config for rung in ladder]
    bottom, shared, top_k, freezing, routers = configs
    assert (bottom.shared_a, bottom.top_k, bottom.freeze_per_task, bottom.task_routers) == (False, 0, 0, False)
    assert shared.shared_a and shared.top_k == 0 and top_k.top_k == 2 and top_k.freeze_per_task == 0
    assert freezing.freeze_per_task == 2 and not freezing.task_routers and routers.task_routers
    assert all(config.route_on == "token" for config in configs)
    default = build_method("branchlora", {}).config
    assert routers == type(default)(**{**default.__dict__, "route_on": "token"})


def test_an_ablation_plan_runs_every_rung_for_every_seed_as_a_named_variant(tmp_path):
    ladder = BranchLora.ablation_ladder
    runs = plan_ablation(SMOKE, SMOKE, "branchlora", ladder, [0, 1], tmp_path, 1, ["--dtype", "float32"])
    assert [(run.seed, run.run_dir.name) for run in runs] == [(seed, f"seed{seed}-variant-{rung.name}") for seed in (0, 1) for rung in ladder]
    for run, rung in zip(runs, ladder * 2):
        command = list(run.command)
        assert command[command.index("--variant") + 1] == rung.name
        assert [command[i + 1] for i, arg in enumerate(command) if arg == "--option"] == [f"{k}={v}" for k, v in rung.options]
        assert run.run_dir == tmp_path / SMOKE / "branchlora" / run.run_dir.name


def test_a_variant_names_its_run_directory_and_request_and_must_be_a_safe_name(tmp_path):
    suite = load_suite(SMOKE)
    options = RunOptions(suite, "branchlora", 2, tmp_path, variant="top-k", method_overrides={"top_k": 0})
    assert options.run_dir == tmp_path / SMOKE / "branchlora" / "seed2-variant-top-k"
    assert options.request()["variant"] == "top-k" and "variant" not in RunOptions(suite, "branchlora", 2, tmp_path).request()
    with pytest.raises(ConfigError, match="--variant"):
        RunOptions(suite, "branchlora", 0, tmp_path, variant="../up")


def _variant_run(seed: int, variant: str | None, ap: float) -> dict:
    request = {"variant": variant} if variant else {}
    return make_result("branchlora", seed, {"AP": ap}, request=request)


def test_variants_are_rows_of_their_own_apart_from_the_method_and_from_rank_agreement(tmp_path):
    runs = [_variant_run(0, None, 50.0), _variant_run(0, "top-k", 40.0), _variant_run(1, "top-k", 42.0),
            _variant_run(0, "shared-a", 30.0), make_result("seqlora", 0, {"AP": 45.0})]
    groups = leaderboard_groups(runs)
    assert sorted(groups) == [SMOKE, f"{SMOKE}-ablation-branchlora"]
    assert sorted(r["run_info"]["method"] for r in groups[SMOKE]) == ["branchlora", "seqlora"]
    board = with_paper_scores(build_leaderboard(groups[f"{SMOKE}-ablation-branchlora"]))
    assert list(board["method"]) == ["branchlora:top-k", "branchlora:shared-a"] and list(board.columns[:2]) == ["method", "paper"]
    assert list(board["paper"]) == [39.96, 38.19] and list(board["AP_mean"]) == [41.0, 30.0] and list(board["n_seeds"]) == [2, 1]
    assert runs[1]["run_info"]["method"] == "branchlora", "grouping relabels copies, not the results read"
    # a variant is not a method of its own for rank agreement: with it, seed 0 would hold branchlora twice
    seeds = [make_result(m, s, {"AP": ap}) for s, scores in ((0, (1, 2, 3)), (1, (1, 3, 2))) for m, ap in zip(("a", "b", "c"), scores)]
    table = rebuild_rank_agreement([*seeds, *runs[1:4]], tmp_path)[SMOKE][1]
    assert set(table["n_methods"]) == {3}


def test_ablate_refuses_a_method_without_a_ladder():
    result = CliRunner().invoke(app, ["ablate", "seqlora", "--suite", SMOKE])
    assert result.exit_code == 2 and "seqlora declares no ablation ladder (methods with one: branchlora)" in result.output
    assert [name for name in METHODS.names() if METHODS.get(name).ablation_ladder] == ["branchlora"]


def test_ablate_runs_the_rungs_and_prints_them_beside_the_papers_scores(tmp_path, monkeypatch):
    """Two rungs of the real ladder (bottom and top), one seed, one step per task: the children are real runs."""
    ladder = BranchLora.ablation_ladder
    monkeypatch.setattr(BranchLora, "ablation_ladder", (ladder[0], ladder[-1]))
    args = ["ablate", "branchlora", "--suite", SMOKE, "--seeds", "0", "--steps-per-task", "1", "--results-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Ablation ladder: cvit-v1-smoke-ablation-branchlora" in result.output
    assert "moelora-equivalent 37.13" in result.output and "task-routers 44.20" in result.output
    for rung in (ladder[0], ladder[-1]):
        config = (tmp_path / SMOKE / "branchlora" / f"seed0-variant-{rung.name}" / "results.json")
        assert config.is_file()
    report = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "boards"), "--no-heatmaps"])
    assert report.exit_code == 0, report.output
    csv = (tmp_path / "boards" / f"{SMOKE}-ablation-branchlora.csv").read_text().splitlines()
    assert csv[0].startswith("method,paper,") and {line.split(",")[0] for line in csv[1:]} == {
        "branchlora:moelora-equivalent", "branchlora:task-routers"}
