"""Bad input of every kind fails where it enters, with exit code 2 and a message naming the file or flag and the field,
before anything is loaded or written; kept files stay kept, and a run cleans up after a kill.

Every test here is fast: none trains more than one step, most run nothing at all.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.data.llava_format import DataError, read_llava_json
from cvit_bench.data.samples import check_image, load_image
from cvit_bench.io import default_mode, read_json
from cvit_bench.paths import inside, name_problem
from cvit_bench.ranges import AT_LEAST_ONE, FRACTION, POSITIVE, SEED, Range, range_problem
from cvit_bench.registry import ConfigError
from cvit_bench.runner import Reporter, RunOptions, build_method, run
from cvit_bench.suites.availability import image_root
from cvit_bench.suites.materialize import check_records, materialize
from cvit_bench.suites.schema import SuiteError, load_suite

from conftest import SMOKE
from test_real_suites import write_fixture

runner = CliRunner()


def output(result) -> str:
    return " ".join(result.output.split())


def smoke_yaml(tmp_path: Path, edit) -> str:
    """The smoke suite with ``edit`` applied to its YAML mapping, written next to the tests' data."""
    suite = yaml.safe_load(load_suite(SMOKE).path.read_text())
    edit(suite)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Numbers: every range checked where the value enters; 0 is a value, not "unset"
# ---------------------------------------------------------------------------------------------


def test_ranges_hold_their_bounds_and_say_them():
    assert 1 in AT_LEAST_ONE and 0 not in AT_LEAST_ONE and str(AT_LEAST_ONE) == ">= 1"
    assert 1e-9 in POSITIVE and 0 not in POSITIVE and float("nan") not in POSITIVE and float("inf") not in POSITIVE
    assert 0 in FRACTION and 1 not in FRACTION and str(FRACTION) == "[0, 1)"
    assert 2**32 - 1 in SEED and 2**32 not in SEED and -1 not in SEED
    assert str(Range(0, 1, low_open=True)) == "(0, 1]" and True not in Range()
    assert range_problem("--seed", 1.5, SEED, integer=True) == "--seed: expected an integer [0, 4294967295], got 1.5"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps-per-task", "-3"], "--steps-per-task"),
        (["--steps-per-task", "0"], "--steps-per-task"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--seeds", "0,4294967296"], "--seeds: expected an integer [0, 4294967295], got 4294967296"),
        (["--threads", "0"], "--threads"),
        (["--max-steps", "0"], "--max-steps"),
        (["--option", "lr=-1"], "option lr: expected a number > 0, got -1.0"),
        (["--option", "lr=0"], "option lr: expected a number > 0, got 0.0"),
        (["--option", "lr=.nan"], "option lr: expected a number > 0, got nan"),
        (["--option", "r=0"], "option r: expected an integer >= 1, got 0"),
        (["--option", "dropout=1"], "option dropout: expected a number [0, 1), got 1.0"),
        (["--option", "r=[1"], "--option 'r=[1': the value is not a YAML scalar"),
        (["--run-id", "../../x"], "--run-id: '../../x' is not a safe name"),
        (["--run-id", ".hidden"], "--run-id: '.hidden' is not a safe name"),
    ],
)
def test_bad_numbers_and_run_ids_exit_2_naming_the_flag_before_anything_is_written(tmp_path, args, message):
    result = runner.invoke(app, ["run", "--suite", SMOKE, "--method", "seqlora", *args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in output(result)
    assert not (tmp_path / "r").exists() and not (tmp_path.parent / "x").exists()


def test_zero_is_checked_like_any_value_never_taken_for_the_default(tmp_path):
    suite = load_suite(SMOKE)
    for field in ("steps_per_task", "max_steps", "threads"):
        with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}: expected an integer >= 1, got 0"):
            RunOptions(suite, "seqlora", 0, tmp_path, **{field: 0})
    with pytest.raises(ConfigError, match="option lr: expected a number > 0, got 0"):
        build_method("seqlora", {"lr": 0})
    assert build_method("replay", {"fraction": 0}).config.fraction == 0.0, "0 is inside [0, 1): a value, kept as given"
    assert build_method("branchlora", {"top_k": 0, "freeze_per_task": 0}).config.top_k == 0


def test_suite_numbers_are_range_checked_each_with_file_and_field(tmp_path):
    def edit(suite):
        suite["training"] = {"steps_per_task": 0, "batch_size": 0, "lr": -0.001, "warmup_steps": -1, "max_grad_norm": 0}
        suite["evaluation"] = {"batch_size": -5}
        suite["data"]["seed"] = 2**32
        suite["method_defaults"] = {"seqlora": {"lr": -1, "r": 0}, "replay": {"fraction": 1.5}}

    path = smoke_yaml(tmp_path, edit)
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    problems = "\n".join(caught.value.problems)
    for expected in ("training.steps_per_task: expected an integer >= 1, got 0", "training.batch_size: expected an integer >= 1, got 0",
                     "training.lr: expected a number > 0, got -0.001", "training.warmup_steps: expected an integer >= 0, got -1",
                     "training.max_grad_norm: expected a number > 0, got 0", "evaluation.batch_size: expected an integer >= 1, got -5",
                     "data.seed: expected an integer [0, 4294967295], got 4294967296",
                     "method_defaults.seqlora: method 'seqlora': option lr: expected a number > 0, got -1.0",
                     "option r: expected an integer >= 1, got 0", "method_defaults.replay: method 'replay': option fraction: expected a number [0, 1)"):
        assert expected in problems
    assert all(problem.startswith(path) for problem in caught.value.problems)
    validated = runner.invoke(app, ["validate", path])
    assert validated.exit_code == 1 and "training.lr: expected a number > 0, got -0.001" in output(validated)


def test_ls_shows_each_method_options_allowed_range():
    result = runner.invoke(app, ["ls"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("allowed" in line for line in lines)
    assert any(" r " in line and ">= 1" in line for line in lines) and any(" lr " in line and "> 0" in line for line in lines)
    assert any(" dropout " in line and "[0, 1)" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Names that become paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "-rf", "", "a b", "x" * 129, None, 5])
def test_unsafe_names_are_refused(name):
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["cvit-v2", "seed0-only-ocr", "coin_2.1", "A"])
def test_safe_names_pass(name):
    assert name_problem(name) is None


def test_paths_outside_their_root_are_refused(tmp_path):
    assert inside(tmp_path, "a", "b.csv") == tmp_path / "a" / "b.csv"
    with pytest.raises(ConfigError, match="leaves"):
        inside(tmp_path, "..", "x.csv")
    os.symlink(tmp_path.parent, tmp_path / "up")
    with pytest.raises(ConfigError, match="leaves"):
        inside(tmp_path, "up", "x.csv")


def test_suite_and_task_names_leaving_their_folder_are_refused(tmp_path):
    def edit(suite):
        suite["name"] = "../../outside"
        suite["tasks"][0]["name"] = "../mcq"

    path = smoke_yaml(tmp_path, edit)
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    problems = "\n".join(caught.value.problems)
    assert f"{path}: name: '../../outside' is not a safe name" in problems
    assert "tasks[0].name: '../mcq' is not a safe name" in problems


# ---------------------------------------------------------------------------------------------
# Data: every record and image checked before a model is loaded or a file written
# ---------------------------------------------------------------------------------------------


def one_record(tmp_path: Path, **fields) -> Path:
    (tmp_path / "a.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = {"id": "r0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], **fields}
    (tmp_path / "train.json").write_text(json.dumps([record]))
    return tmp_path / "train.json"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"box": ["a"]}, r"\.box: expected four finite numbers"),
        ({"box": [0.1, 0.2]}, r"\.box: expected four finite numbers"),
        ({"box": [0, 0, float("nan"), 1]}, r"\.box: expected four finite numbers"),
        ({"options": 5}, r"\.options: expected a list of strings, got 5"),
        ({"options": ["a", 3]}, r"\.options: expected a list of strings"),
        ({"meta": []}, r"\.meta: expected an object"),
        ({"question": 5}, r"\.question: expected a string, got 5"),
        ({"answer": None}, r"\.answer: expected a string, got None"),
        ({"id": [1]}, r"\.id: expected a string or integer"),
    ],
)
def test_record_schema_errors_name_file_record_and_field(tmp_path, fields, message):
    with pytest.raises(DataError, match=r"train\.json: record 0 \(id [^)]*\)" + message):
        read_llava_json(one_record(tmp_path, **fields))


def test_corrupt_and_bomb_images_fail_with_their_path(tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.png"
    Image.new("RGB", (8, 8)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    with pytest.raises(DataError, match="corrupt.png: cannot read image"):
        check_image(corrupt)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels: over the limit (PIL itself only warns below twice it)
    with pytest.raises(DataError, match="bomb.png: cannot read image .*decompression bomb"):
        check_image(bomb)
    with pytest.raises(DataError, match="bomb.png: cannot read image"):
        load_image(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # far over: PIL's own error
    with pytest.raises(DataError, match="bomb.png: cannot read image"):
        check_image(bomb)


def broken_coin(root: Path) -> Path:
    """The coin fixture with one malformed record, one corrupt image and one VQA record a scorer cannot read."""
    suite = load_suite("coin")
    write_fixture(root, suite)
    folders = {task.name: root / task.data for task in suite.tasks}
    grounding = next(t for t in suite.tasks if t.scorer.startswith("grounding"))
    records = json.loads((folders[grounding.name] / "train.json").read_text())
    records[1]["box"] = ["a"]
    (folders[grounding.name] / "train.json").write_text(json.dumps(records))
    vqa = next(t for t in suite.tasks if t.scorer.startswith("vqa_accuracy"))
    records = json.loads((folders[vqa.name] / "test.json").read_text())
    records[0]["answers"] = ["2"]
    (folders[vqa.name] / "test.json").write_text(json.dumps(records))
    first_image = image_root(root, suite, suite.tasks[0]) / json.loads((folders[suite.tasks[0].name] / "test.json").read_text())[0]["image"]
    first_image.write_bytes(b"not an image")
    return root


def test_a_run_checks_all_its_data_before_loading_a_model_or_writing(tmp_path):
    root = broken_coin(tmp_path / "data")
    with pytest.raises(DataError) as caught:  # the model path does not exist: it is never reached
        run(RunOptions(load_suite("coin"), "seqlora", 0, tmp_path / "results", model=str(tmp_path / "no-model"), data_root=root))
    message = str(caught.value)
    assert "3 problem(s) in the data (nothing was run or written)" in message
    assert "train.json: record 1 (id" in message and ".box: expected four finite numbers" in message
    assert "record" in message and "answers: vqa_accuracy needs at least 2 annotator answers, got 1" in message
    assert ".image: " in message and "cannot read image" in message
    assert not (tmp_path / "results").exists()


def test_validate_reads_every_record_and_opens_every_image(tmp_path):
    root = broken_coin(tmp_path / "data")
    result = runner.invoke(app, ["validate", "coin", "--data-root", str(root)])
    assert result.exit_code == 1
    text = output(result)
    assert "all data found" in text and "3 problem(s) in the records and images" in text
    assert ".box: expected four finite numbers" in text and "cannot read image" in text
    assert check_records(load_suite("coin"), materialize(load_suite("coin"), 0, write_fixture(tmp_path / "good", load_suite("coin")))) == []


def test_literal_braces_in_a_template_are_refused_with_file_and_field(tmp_path):
    from cvit_bench.suites.schema import TEMPLATES_DIR

    templates = tmp_path / "templates"
    templates.mkdir()
    for path in TEMPLATES_DIR.glob("*.yaml"):
        text = path.read_text()
        (templates / path.name).write_text(text.replace("{question}", "{question} as {json}", 1) if path.name == "ocr.yaml" else text)
    with pytest.raises(SuiteError, match=r"ocr\.yaml: train\[0\]\.prompt: .* cannot be filled \(KeyError: 'json'\).*\{\{ or \}\}"):
        load_suite(SMOKE, templates_dir=templates)


# ---------------------------------------------------------------------------------------------
# Run directories: checkpoints, threads, temporaries, permissions, write failures
# ---------------------------------------------------------------------------------------------


class Stop(Exception):
    """Stands in for a kill: raised from the progress reporter."""


class Recorder(Reporter):
    """Records torch's thread count when each stage starts and stops the run at ``stop_stage``."""

    def __init__(self, stop_stage: int) -> None:
        self.stop_stage, self.threads = stop_stage, {}

    def stage(self, stage: int, tasks: tuple[str, ...], steps: int) -> None:
        self.threads[stage] = torch.get_num_threads()
        if stage == self.stop_stage:
            raise Stop(stage)


def test_resume_keeps_the_thread_count_and_removes_stale_temporaries_and_one_mode_for_all_files(tmp_path):
    threads = torch.get_num_threads()
    options = RunOptions(load_suite(SMOKE), "seqlora", 0, tmp_path, steps_per_task=1, threads=1)
    try:
        with pytest.raises(Stop):
            run(options, Recorder(2))  # stage 0 evaluated, stage 1 trained one step: checkpoint-stage1 written
        run_dir = options.run_dir
        modes = {str(path.relative_to(run_dir)): (path.stat().st_mode & 0o777, default_mode(directory=path.is_dir()))
                 for path in run_dir.rglob("*")}
        assert len(modes) > 5 and all(mode == expected for mode, expected in modes.values()), modes
        (run_dir / ".results.json.x1y2.tmp").write_bytes(b"")
        (run_dir / ".predictions.jsonl.abc.tmp").write_bytes(b"half")
        (run_dir / ".checkpoint-stage2-xyz").mkdir()

        torch.set_num_threads(2)
        recorder = Recorder(3)
        with pytest.raises(Stop):
            run(RunOptions.from_run_dir(run_dir), recorder)  # --resume without --threads
        assert recorder.threads[2] == 1, "the thread count the run started with, not this process's"
        assert not list(run_dir.glob(".*.tmp")) and not (run_dir / ".checkpoint-stage2-xyz").exists()
        assert read_json(run_dir / "checkpoint-stage2" / "state.json")["progress"]["sessions"][1]["threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_a_kept_checkpoint_stays_kept_when_the_finished_run_is_rerun(tmp_path):
    options = RunOptions(load_suite(SMOKE), "zeroshot", 0, tmp_path)
    run_dir = run(options, keep_checkpoint=True)
    assert read_json(run_dir / "results.json")["run_info"]["kept_checkpoint"] is True
    kept = read_json(run_dir / "checkpoint.json")["directory"]
    run(options)  # the same command without --keep-checkpoint: already complete, nothing removed
    assert (run_dir / "checkpoint.json").is_file() and (run_dir / kept / "model.safetensors").is_file()


def test_a_failed_checkpoint_write_names_the_checkpoint_and_leaves_no_staging_folder(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import cvit_bench.checkpoint as checkpoint

    for failure in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("Error while serializing: IoError")):
        def full_disk(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(checkpoint, "save_file", full_disk)
        with pytest.raises(OSError, match=r"writing the stage 3 checkpoint in .* failed .*; the previous checkpoint is kept"):
            checkpoint.save_checkpoint(tmp_path, 3, {"x": 1}, [], {"w": torch.zeros(2)}, {})
        assert list(tmp_path.iterdir()) == []


def test_a_malformed_run_request_names_its_file(tmp_path):
    run_dir = tmp_path / SMOKE / "seqlora" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "run_request.json").write_text(json.dumps({"suite": SMOKE, "method": "seqlora", "seed": -4}))
    result = runner.invoke(app, ["run", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "run_request.json: malformed run request (KeyError: 'model')" in output(result)
    (run_dir / "run_request.json").write_text(json.dumps({"suite": SMOKE, "method": "seqlora", "seed": -4, "model": None, "data_root": None,
                                                          "method_overrides": {}, "steps_per_task": 0}))
    result = runner.invoke(app, ["run", "--resume", str(run_dir)])
    assert result.exit_code == 2
    assert "run_request.json: --seed: expected an integer [0, 4294967295], got -4; --steps-per-task: expected an integer >= 1, got 0" in output(result)


# ---------------------------------------------------------------------------------------------
# report: malformed results and an unwritable output folder
# ---------------------------------------------------------------------------------------------


def minimal_result(**run_info) -> dict:
    info = {"suite": "s", "method": "m", "seed": 0, "status": "complete", "task_order": ["a"], **run_info}
    return {"run_info": info, "metrics": {"AP": 50.0}, "timings": {"total_s": 1.0}, "matrices": {"seen": {"vu": [[0.0], [50.0]]}}}


def write_result(results_dir: Path, result: dict, name: str = "s/m/seed0") -> Path:
    path = results_dir / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    return path


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(metrics=5), "metrics: expected an object of numbers or null"),
        (lambda r: r["metrics"].update(AP="high"), "metrics: expected an object of numbers or null"),
        (lambda r: r.pop("timings"), "timings.total_s: expected a number"),
        (lambda r: r["run_info"].update(seed="zero"), "run_info.seed: expected an integer"),
        (lambda r: r["run_info"].update(suite="../../outside"), "run_info.suite: '../../outside' is not a safe name"),
        (lambda r: r["run_info"].update(request={"order": "../x"}), "run_info.request.order: '../x' is not a safe name"),
        (lambda r: r["matrices"]["seen"].update(vu=[[0.0]]), "matrices.seen.vu: expected 2 rows of 1 values"),
        (lambda r: r["matrices"]["seen"].update(vu=[["x"], [1]]), "matrices.seen.vu: expected a list of rows of numbers or null"),
    ],
)
def test_report_refuses_malformed_results_naming_file_and_field(tmp_path, edit, field):
    result = minimal_result()
    edit(result)
    path = write_result(tmp_path / "results", result)
    report = runner.invoke(app, ["report", "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "boards"), "--no-heatmaps"])
    assert report.exit_code == 2, report.output
    assert str(path) in output(report) and field in output(report)
    assert not (tmp_path.parent / "outside.csv").exists()


def test_report_into_an_unwritable_folder_exits_2_naming_it(tmp_path):
    write_result(tmp_path / "results", minimal_result())
    good = runner.invoke(app, ["report", "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "boards"), "--no-heatmaps"])
    assert good.exit_code == 0, good.output
    (tmp_path / "file").write_text("not a folder")
    bad = runner.invoke(app, ["report", "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "file"), "--no-heatmaps"])
    assert bad.exit_code == 2, bad.output
    assert str(tmp_path / "file") in output(bad)
