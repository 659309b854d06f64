"""cvit-v2's base is shipped: loaded by default, checked against its recipe and weights, rebuildable; cvit-v1 stays frozen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cvit_bench.io import read_json
from cvit_bench.models import base_checkpoint
from cvit_bench.models.base_checkpoint import base_checkpoint_hash, compare_with_shipped, prepare_base, ship
from cvit_bench.suites import base_corpus, synthetic
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import REPO_ROOT, SUITES_DIR, SuiteError, load_suite

COMMITTED_V1 = REPO_ROOT / "leaderboards" / "runs" / "cvit-v1" / "seqlora" / "seed0" / "results.json"


def _shipping_suite(tmp_path: Path, **pretrain) -> Path:
    """cvit-v1-smoke's sizes with the cvit-v2 corpus and a shipped base named 'tiny-test'."""
    raw = yaml.safe_load((SUITES_DIR / "cvit-v1-smoke.yaml").read_text())
    raw["name"] = "shipped-smoke"
    raw["model"]["shipped"] = "tiny-test"
    raw["model"]["pretrain"].update({"corpus": base_corpus.KIND, **pretrain})
    for task in raw["tasks"] + raw["unseen"]:
        task["template"] = "v2/scene" if task["name"] == "scene" else f"v2/{task['template']}"
    path = tmp_path / "shipped-smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def shipped_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(base_checkpoint, "SHIPPED_DIR", tmp_path / "bases")
    (tmp_path / "bases").mkdir()
    return tmp_path / "bases"


def test_a_shipped_base_is_loaded_and_a_rebuild_here_is_bit_identical(tmp_path, shipped_dir):
    suite = load_suite(str(_shipping_suite(tmp_path)))
    with pytest.raises(SuiteError, match="base.json is missing"):
        prepare_base(suite)
    built, digest = prepare_base(suite, rebuild=True)
    assert ship(suite, built, digest) == shipped_dir / "tiny-test"
    directory, loaded_digest = prepare_base(suite)
    assert (directory, loaded_digest) == (shipped_dir / "tiny-test", digest)
    manifest = read_json(directory / "base.json")
    assert manifest["hash"] == digest and manifest["parameters"] > 0
    rebuilt, _ = prepare_base(suite, rebuild=True)
    assert compare_with_shipped(suite, rebuilt).startswith("bit-identical")


def test_a_shipped_base_of_another_recipe_or_with_changed_weights_is_refused(tmp_path, shipped_dir):
    suite = load_suite(str(_shipping_suite(tmp_path)))
    built, digest = prepare_base(suite, rebuild=True)
    ship(suite, built, digest)
    (tmp_path / "other").mkdir()
    other = load_suite(str(_shipping_suite(tmp_path / "other", steps=31)))
    with pytest.raises(SuiteError, match="built from another recipe"):
        prepare_base(other)
    weights = shipped_dir / "tiny-test" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SuiteError, match="SHA-256 differs"):
        prepare_base(suite)


def test_the_shipped_name_cannot_leave_the_bases_folder(tmp_path):
    path = _shipping_suite(tmp_path)
    path.write_text(path.read_text().replace("shipped: tiny-test", "shipped: ../escape"))
    with pytest.raises(SuiteError, match="model.shipped"):
        prepare_base(load_suite(str(path)))


def test_cvit_v1_keeps_its_recorded_data_recipe_and_base_hashes():
    """cvit-v1 is frozen: the generator's table grew a kind, and its recipe and base hashes did not move."""
    recorded = read_json(COMMITTED_V1)["run_info"]
    suite = load_suite("cvit-v1")
    assert materialize(suite, 0).recipe_hash == recorded["data_recipe_hash"]
    assert base_checkpoint_hash(suite) == recorded["base_checkpoint_hash"]


def test_the_forms_corpus_pairs_every_skill_with_every_form(tmp_path):
    synthetic.generate_task(base_corpus.KIND, {"train": 45}, 0, tmp_path, 64)
    records = json.loads((tmp_path / "train.json").read_text())
    pairs = {(r["meta"]["skill"], r["meta"]["form"]) for r in records if r["meta"]["skill"] != "describe"}
    assert pairs == {(skill, form) for skill in base_corpus._SKILLS for form in base_corpus.FORMS}
    for record in records:
        form, answer = record["meta"]["form"], record["answer"]
        if form == "letter":
            assert answer in "ABCD"[: len(record["options"])]
        elif form == "json":
            assert list(json.loads(answer)) == ["answer"]
        elif form == "capitals":
            assert answer == answer.upper()


def test_the_evaluation_schedule_skips_only_cells_no_metric_reads():
    """future_tasks false: after stage j only tasks 1..j+1 (row 0 whole, for FWT); side_sets ends: stage 0 and the last."""
    from cvit_bench.evaluation.evaluate import EvalSet
    from cvit_bench.runner import EvalPlan
    from cvit_bench.suites.schema import EvaluationConfig

    def sets(prefix: str, n: int) -> list[EvalSet]:
        return [EvalSet(f"{prefix}{i}", f"{prefix}{i}", "exact_match", [], 4) for i in range(1, n + 1)]

    plan = EvalPlan(sets("t", 4), sets("u", 2), sets("h", 4))
    lean = EvaluationConfig(future_tasks=False, side_sets="ends")

    def names(rows: tuple[int, ...], config: EvaluationConfig) -> dict[str, list[str]]:
        return {group: [s.name for s in chosen] for group, chosen in plan.scheduled(rows, 4, config).groups().items()}

    assert names((0,), lean) == {"seen": ["t1", "t2", "t3", "t4"], "unseen": ["u1", "u2"], "heldout": ["h1", "h2", "h3", "h4"]}
    assert names((1,), lean) == {"seen": ["t1", "t2"], "unseen": [], "heldout": []}
    assert names((3,), lean)["seen"] == ["t1", "t2", "t3", "t4"]
    assert names((4,), lean)["unseen"] == ["u1", "u2"]
    assert names((1, 2, 3, 4), lean)["heldout"] == ["h1", "h2", "h3", "h4"]  # joint's one evaluation fills every row
    assert names((1,), EvaluationConfig()) == names((0,), lean)  # the default evaluates everything after every stage


def test_only_and_method_defaults_refuse_unknown_names(tmp_path):
    from typer.testing import CliRunner

    from cvit_bench.cli import app

    result = CliRunner().invoke(app, ["run", "--suite", "cvit-v2-check", "--method", "seqlora", "--only", "ocrr",
                                      "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "did you mean 'ocr'" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())
    raw = yaml.safe_load((SUITES_DIR / "cvit-v2-check.yaml").read_text())
    raw["method_defaults"] = {"seqlorra": {"lr": 0.1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SuiteError, match=r"method_defaults\.seqlorra: unknown method"):
        load_suite(str(path))


def test_a_single_task_run_trains_one_task_and_suite_defaults_reach_the_method():
    from cvit_bench.runner import RunOptions, build_method

    suite = load_suite("cvit-v2-check")
    options = RunOptions(suite, "seqlora", 0, Path("results"), only="ocr")
    assert options.suite.task_names == ["ocr"] and options.suite.unseen == ()
    assert options.run_dir.name == "seed0-only-ocr" and options.request()["only"] == "ocr"
    assert build_method("seqlora", {}, suite.method_defaults["seqlora"]).config.lr == 0.003
    assert build_method("seqlora", {"lr": 0.001}, suite.method_defaults["seqlora"]).config.lr == 0.001  # --option wins
