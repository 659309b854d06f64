"""`cvit-bench check` (bands from the seed spread, readable failures) and sweeps over methods and seeds."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.io import read_json
from cvit_bench.methods.sequential import SequentialLora
from cvit_bench.regression import Band, Bands, bands_path, check_values, compare, derive_bands, kept_bands, load_bands, write_bands
from cvit_bench.registry import ConfigError
from cvit_bench.sweep import default_threads

from conftest import SMOKE

runner = CliRunner()


def result(seed: int, ap: float, loss: float, mif: float | None = 50.0) -> dict:
    metrics = {"AP": ap, "MAP": 1.0, "MFT": 2.0, "BWT": -1.0, "MIF": mif, "IF-AP": 3.0, "unseen_AP": 0.0, "heldout_AP": 0.0}
    return {"run_info": {"seed": seed}, "metrics": metrics,
            "stages": [{"stage": 1, "final_loss": loss - 0.5}, {"stage": 2, "final_loss": loss + 0.5}]}


def test_check_values_add_the_mean_final_loss():
    assert check_values(result(0, 10.0, 2.0))["final_loss"] == 2.0


def test_bands_are_mean_plus_minus_k_std_with_a_floor():
    runs = {"seqlora": [result(0, 10.0, 2.0), result(1, 14.0, 2.1), result(2, 12.0, 2.2)]}
    bands = derive_bands(runs, k=3.0)["seqlora"]
    assert bands["AP"] == Band(6.0, 18.0)  # mean 12, sample std 2
    assert bands["final_loss"] == Band(pytest.approx(1.8), pytest.approx(2.4))  # std 0.1
    assert bands["MAP"] == Band(0.0, 2.0)  # no spread: the 1-point floor
    with pytest.raises(ConfigError, match="at least two seeds"):
        derive_bands({"seqlora": runs["seqlora"][:1]}, k=3.0)


def test_compare_reports_values_outside_and_missing():
    bands = Bands("s", (0,), {"seqlora": {"AP": Band(6.0, 18.0), "MIF": Band(40.0, 60.0)}}, bands_path("s"))
    assert compare({"seqlora": [result(0, 12.0, 2.0)]}, bands) == []
    violations = compare({"seqlora": [result(0, 30.0, 2.0, mif=None)]}, bands)
    assert [(v.metric, v.value) for v in violations] == [("AP", 30.0), ("MIF", None)]


def test_recording_some_methods_keeps_the_others_only_when_seeds_and_k_match(tmp_path):
    path = tmp_path / "bands.yaml"
    assert kept_bands(path, ["seqlora"], [0, 1, 2], 3.0) == {}  # no file yet
    runs = {"seqlora": [result(0, 10.0, 2.0), result(1, 14.0, 2.1)], "replay": [result(0, 40.0, 1.0), result(1, 44.0, 1.1)]}
    write_bands(path, "s", [0, 1], [0], 3.0, derive_bands(runs, k=3.0))
    assert kept_bands(path, ["seqlora"], [0, 1], 3.0) == {"replay": derive_bands(runs, k=3.0)["replay"]}
    with pytest.raises(ConfigError, match=r"bands\.yaml: recorded_seeds \[0, 1\] and k 3\.0 differ .* \(replay, seqlora\)"):
        kept_bands(path, ["seqlora"], [0, 1, 2], 3.0)
    with pytest.raises(ConfigError, match="differ"):
        kept_bands(path, ["seqlora"], [0, 1], 2.0)
    assert kept_bands(path, ["seqlora", "replay"], [0, 1, 2], 2.0) == {}  # all re-recorded: nothing mixed


@pytest.mark.parametrize(
    "text, message",
    [
        ("suite: s\ncheck_seeds: [0]\n", "methods: missing"),
        ("suite: s\ncheck_seeds: [0]\nmethods: {seqlora: {AP: [5, 1]}}\n", "methods.seqlora.AP: expected [low, high]"),
        ("suite: s\ncheck_seeds: [0]\nmethods: {seqlora: {accuracy: [1, 5]}}\n", "methods.seqlora.accuracy: unknown metric"),
        ("suite: [s\n", "malformed YAML"),
    ],
)
def test_bad_bands_file_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bands.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bands\.yaml: .*" + message.replace("[", r"\[")):
        load_bands(path)


def test_committed_bands_cover_the_checked_methods():
    bands = load_bands(bands_path("cvit-v2-check"))
    assert bands.suite == "cvit-v2-check" and bands.check_seeds == (0,)
    assert {"seqlora", "replay", "branchlora"} <= set(bands.bands)
    assert all("final_loss" in per and "IF-AP" in per for per in bands.bands.values())


def test_check_passes_on_main_and_fails_on_a_broken_method(monkeypatch, tmp_path):
    passed = runner.invoke(app, ["check", "--suite", "cvit-v2-check", "--method", "seqlora", "--results-dir", str(tmp_path / "ok")])
    assert passed.exit_code == 0, passed.output
    assert "within their bands" in passed.output

    def drop_gradients(self, model):  # a plausible gradient-surgery bug: every gradient is zeroed
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.zero_()

    monkeypatch.setattr(SequentialLora, "after_backward", drop_gradients)
    failed = runner.invoke(app, ["check", "--suite", "cvit-v2-check", "--method", "seqlora", "--results-dir", str(tmp_path / "broken")])
    assert failed.exit_code == 1, failed.output
    output = " ".join(failed.output.split())
    assert "outside their bands" in output and "final_loss" in output


def test_sweep_runs_every_method_and_seed_and_reports_failures(tmp_path):
    # --option r=4 is valid for seqlora and unknown to zeroshot: one child succeeds, one fails.
    args = ["run", "--suite", SMOKE, "--method", "seqlora,zeroshot", "--seeds", "0", "--jobs", "2", "--option", "r=4",
            "--results-dir", str(tmp_path)]
    swept = runner.invoke(app, args)
    assert swept.exit_code == 1, swept.output
    output = " ".join(swept.output.split())
    assert "2 runs of cvit-v1-smoke" in output and "seqlora seed 0: ok" in output
    assert "zeroshot seed 0: failed (exit 2)" in output and "1 of 2 runs failed" in output
    info = read_json(tmp_path / SMOKE / "seqlora" / "seed0" / "results.json")["run_info"]
    assert info["method_config"]["r"] == 4
    assert f"{default_threads(2)} threads" in info["device"], "each of 2 jobs gets its share of the cores"
    assert "unknown option(s) ['r']" in " ".join((tmp_path / SMOKE / "zeroshot" / "seed0" / "run.log").read_text().split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "--suite", "cvit-v2-check", "--record", "--method", "seqlora", "--seeds", "0"], "pass at least two seeds"),
        (["check", "--suite", "cvit-v2-check", "--method", "lwf"], "no bands for ['lwf']"),
        (["run", "--suite", SMOKE, "--method", ",", "--seeds", "0,1"], "name at least one method"),
        (["run", "--suite", SMOKE, "--method", "seqlora", "--seeds", "0,x"], "expected comma-separated integers"),
    ],
)
def test_bad_check_and_sweep_arguments_fail_before_running_anything(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not list(tmp_path.rglob("results.json"))


def test_zero_jobs_is_refused(tmp_path):
    result = runner.invoke(app, ["run", "--suite", SMOKE, "--method", "all", "--jobs", "0", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and not list(tmp_path.iterdir())
