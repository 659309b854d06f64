"""Whole runs on cvit-v1-smoke: every method, results schema, determinism, and bad input leaving nothing behind."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import needs_smolora
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.io import read_json
from cvit_bench.methods import METHODS
from cvit_bench.evaluation.contracts import FAMILIES
from cvit_bench.evaluation.evaluate import EvalSet
from cvit_bench.runner import EvalPlan, RunOptions, run, run_metrics
from cvit_bench.suites.schema import load_suite

SMOKE = "cvit-v1-smoke"
runner = CliRunner()


def smoke_run(method: str, results_dir: Path, seed: int = 0, **overrides) -> dict:
    run_dir = run(RunOptions(load_suite(SMOKE), method, seed, results_dir, method_overrides=overrides))
    return read_json(run_dir / "results.json")


@pytest.fixture(scope="module")
def seqlora_result(uninterrupted_smoke) -> tuple[dict, Path]:
    return uninterrupted_smoke("seqlora")


def test_results_follow_the_schema(seqlora_result):
    result, run_dir = seqlora_result
    assert set(result) >= {"run_info", "matrices", "metrics", "timings"}
    info = result["run_info"]
    assert info["status"] == "complete" and info["task_order"] == ["mcq", "ocr", "caption", "classify", "relation", "vqa"]
    for key in ("base_checkpoint_hash", "data_hash", "data_recipe_hash", "versions", "git_commit", "git_dirty", "seed",
                "method_config", "config", "config_hash", "request"):
        assert key in info
    assert info["config"]["suite"]["tasks"][0]["template"]["train"], "the resolved config includes the phrasings"
    assert not (run_dir / "checkpoint.json").exists() and not list(run_dir.glob("checkpoint-stage*")), "a finished run drops its checkpoint"
    seen = result["matrices"]["seen"]
    assert set(seen) == {"vu", "if", "strict"}
    assert np.asarray(seen["vu"], dtype=float).shape == (7, 6)
    assert np.asarray(result["matrices"]["unseen"]["vu"], dtype=float).shape == (7, len(info["unseen_tasks"]))
    assert info["unseen_tasks"] == ["unanswerable", "textcap", "scene-0shot", "scene-2shot"]
    assert np.asarray(result["matrices"]["heldout"]["if"], dtype=float).shape == (7, 6)
    for metric in ("AP", "MAP", "MFT", "BWT", "forgetting", "FWT", "MIF", "IF-AP", "IF-BWT", "unseen_AP", "heldout_AP", "robustness_gap"):
        assert metric in result["metrics"]
    assert "MIF_floor" in result["metrics"] and "nAP" not in result["metrics"]  # cvit-v1-smoke declares no chance
    assert result["n_items"]["seen"] == {task: 4 for task in info["task_order"]}
    assert result["n_items"]["unseen"] == {name: 4 for name in info["unseen_tasks"]}
    assert result["intervals"]["resamples"] == 1000 and result["intervals"]["level"] == 0.95
    for kind in ("vu", "if"):
        value = np.asarray(seen[kind], dtype=float)
        low, high = (np.asarray(result["intervals"]["seen"][kind][bound], dtype=float) for bound in ("low", "high"))
        assert np.all(low <= value + 1e-9) and np.all(value <= high + 1e-9)  # every cell is evaluated here
    captions = [c for c in result["corpus_scores"] if c["set"] == "caption"]
    assert [c["stage"] for c in captions if c["group"] == "seen"] == list(range(7))
    assert {"CIDEr", "BLEU-4", "ROUGE-L"} <= set(captions[0]["scores"])
    assert "SPICE" in captions[0]["skipped"]
    predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
    first = json.loads(predictions[0])
    assert {"stage", "group", "set", "id", "prediction", "vu", "if_pass", "if_reason"} <= set(first)
    # 7 evaluations x (6 seen + 6 held-out + 3 unseen sets of 4 + one 2-shot set of 4) samples
    assert len(predictions) == 7 * (6 * 4 * 2 + 4 * 4)


def test_run_metrics_add_nap_where_chance_is_declared_and_count_scene_once():
    suite = load_suite(SMOKE)
    declared = dataclasses.replace(suite, tasks=tuple(dataclasses.replace(t, chance=20.0) for t in suite.tasks))
    contracts = {t.name: t.template.train[0].contract for t in suite.tasks + suite.unseen}

    def column(name: str, task: str) -> EvalSet:
        return EvalSet(name, task, "exact_match", [SimpleNamespace(contract=contracts[task])] * 2, 8)

    plan = EvalPlan([column(t.name, t.name) for t in suite.tasks], [column("textcap", "textcap"), column("scene-0shot", "scene"),
                    column("scene-2shot", "scene")], [])
    seen, unseen = np.full((7, 6), 60.0), np.array([[0.0, 0.0, 0.0]] * 6 + [[30.0, 40.0, 80.0]])
    matrices = {"seen": {"vu": seen, "if": seen}, "unseen": {"vu": unseen, "if": unseen}}
    metrics = run_metrics(declared, matrices, plan)
    assert metrics["nAP"] == pytest.approx(100 * (60 - 20) / (100 - 20))
    assert metrics["MIF"] == pytest.approx((6 * 60 + 30 + (40 + 80) / 2) / 8)  # scene's two columns count once
    families = [FAMILIES[contracts[t]] for t in [*suite.task_names, "textcap", "scene"]]
    assert metrics["MIF_floor"] == pytest.approx(100 * families.count(FAMILIES[contracts["vqa"]]) / 8)
    assert "nAP" not in run_metrics(suite, matrices, plan)


def test_same_seed_gives_identical_matrices(seqlora_result, tmp_path):
    first, _ = seqlora_result
    again = smoke_run("seqlora", tmp_path)
    assert again["matrices"] == first["matrices"]
    assert again["run_info"]["data_hash"] == first["run_info"]["data_hash"]
    assert again["run_info"]["config_hash"] == first["run_info"]["config_hash"]


def test_different_seed_gives_different_data(seqlora_result, tmp_path):
    first, _ = seqlora_result
    other = smoke_run("seqlora", tmp_path, seed=1)
    assert other["run_info"]["data_hash"] != first["run_info"]["data_hash"]
    assert other["run_info"]["base_checkpoint_hash"] == first["run_info"]["base_checkpoint_hash"]
    assert other["run_info"]["data_recipe_hash"] == first["run_info"]["data_recipe_hash"]
    assert other["run_info"]["config_hash"] == first["run_info"]["config_hash"], "seeds of one setup share a config"


@pytest.mark.parametrize(
    "method", [pytest.param(name, marks=needs_smolora) if name == "smolora" else name for name in sorted(set(METHODS.names()) - {"seqlora"})]
)
def test_every_method_completes_the_smoke_suite(method, uninterrupted_smoke):
    result, _ = uninterrupted_smoke(method)
    vu = np.asarray(result["matrices"]["seen"]["vu"], dtype=float)
    assert not np.isnan(vu).any()
    if method in ("joint", "zeroshot"):
        assert (vu[1:] == vu[-1]).all(), "bounds fill every row with the single final evaluation"
    if method == "zeroshot":
        assert (vu[0] == vu[-1]).all()


def test_cli_run_prints_the_summary(tmp_path):
    result = runner.invoke(app, ["run", "--suite", SMOKE, "--method", "zeroshot", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "AP" in result.output and (tmp_path / SMOKE / "zeroshot" / "seed0" / "results.json").is_file()
    report = runner.invoke(app, ["report", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "boards")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "boards" / f"{SMOKE}.csv").read_text().startswith("method,")
    assert (tmp_path / SMOKE / "zeroshot" / "seed0" / "seen_vu.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "cvit-v2x", "--method", "seqlora"], "did you mean 'cvit-v2'"),
        (["--suite", SMOKE, "--method", "seqlroa"], "did you mean 'seqlora'"),
        (["--suite", SMOKE, "--method", "seqlora", "--option", "rank=4"], "unknown option(s) ['rank']"),
        (["--suite", SMOKE, "--method", "seqlora", "--option", "r=four"], "option r='four' must be int"),
        (["--suite", SMOKE, "--method", "seqlora", "--option", "lr=fast"], "option lr='fast' must be float or null"),
        (["--suite", SMOKE, "--method", "seqlora", "--option", "r"], "--option 'r': expected KEY=VALUE"),
        (["--suite", SMOKE], "pass --method (or --resume RUN_DIR)"),
        (["--suite", SMOKE, "--method", "seqlora", "--epochs-per-task", "0"], "epochs_per_task must be a positive number, got 0.0"),
        (["--suite", SMOKE, "--method", "seqlora", "--epochs-per-task", "nan"], "epochs_per_task must be a positive number, got nan"),
        (["--suite", SMOKE, "--method", "seqlora", "--epochs-per-task", "1", "--steps-per-task", "3"], "replaces --steps-per-task"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, args, message):
    result = runner.invoke(app, ["run", *args, "--results-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not list(tmp_path.rglob("results.json"))


def test_broken_template_fails_before_any_result(tmp_path, monkeypatch):
    import cvit_bench.suites.schema as schema

    templates = tmp_path / "templates"
    templates.mkdir()
    for path in schema.TEMPLATES_DIR.glob("*.yaml"):
        (templates / path.name).write_text(path.read_text().replace("    contract: uppercase\n", "", 1))
    monkeypatch.setattr(schema, "TEMPLATES_DIR", templates)
    result = runner.invoke(app, ["run", "--suite", SMOKE, "--method", "seqlora", "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "classify.yaml: train[0].contract: missing" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
