"""Resume after a crash: a run continues after its last finished stage and ends with the same numbers.

The in-process tests stop a run by raising from the progress reporter in the middle of a stage;
the subprocess test kills a real `cvit-bench run` with SIGKILL, once while it trains and once
while it writes results.json.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.io import read_json
from cvit_bench.methods import METHODS
from cvit_bench.registry import ConfigError
from cvit_bench.reporting.leaderboard import find_results
from cvit_bench.runner import Reporter, RunOptions, run
from cvit_bench.suites.schema import load_suite

from conftest import SMOKE

runner = CliRunner()


class Crash(Exception):
    """Stands in for a crash: raised from inside the training loop."""


class CrashInStage(Reporter):
    """Raises at the first progress report of stage ``stage`` (after its training steps, before its evaluation)."""

    def __init__(self, stage: int) -> None:
        self.crash_stage, self.current = stage, None
        self.messages: list[str] = []

    def stage(self, stage: int, tasks: tuple[str, ...], steps: int) -> None:
        self.current = stage

    def step(self, step: int, loss: float, samples_per_s: float) -> None:
        if self.current == self.crash_stage:
            raise Crash(f"crash in stage {self.current}")

    def message(self, text: str) -> None:
        self.messages.append(text)


def measurements(result: dict) -> dict:
    """What must not depend on interruptions: matrices, metrics, corpus scores and per-stage facts (throughput aside)."""
    stages = [{k: v for k, v in stage.items() if k != "samples_per_s"} for stage in result["stages"]]
    return {"matrices": result["matrices"], "metrics": result["metrics"], "corpus": result["corpus_scores"], "stages": stages}


def options(results_dir: Path, method: str = "seqlora", **kwargs) -> RunOptions:
    return RunOptions(load_suite(SMOKE), method, 0, results_dir, **kwargs)


@pytest.mark.parametrize("method", sorted(set(METHODS.names()) - {"zeroshot"}))
def test_interrupted_run_resumes_to_identical_results(method, tmp_path, uninterrupted_smoke):
    expected, expected_dir = uninterrupted_smoke(method)
    crash_stage = 1 if method == "joint" else 4  # after three tasks: frozen branches, bases and slices exist
    # The same thread count as the uninterrupted run: CPU sums (PEGP's eigendecompositions among them) depend on it, and
    # earlier tests in the process may have changed torch's global count since that run.
    run_options = options(tmp_path, method, threads=expected["run_info"]["sessions"][0]["threads"])
    with pytest.raises(Crash):
        run(run_options, CrashInStage(crash_stage))
    run_dir = run_options.run_dir
    assert read_json(run_dir / "checkpoint.json")["stage"] == crash_stage - 1
    assert not (run_dir / "results.json").exists() and find_results(tmp_path) == []

    reporter = CrashInStage(-1)
    resumed = read_json(run(run_options, reporter) / "results.json")
    assert f"resuming {run_dir} after stage {crash_stage - 1}" in reporter.messages
    assert resumed["run_info"]["resumed_after_stages"] == [crash_stage - 1]
    assert [session["after_stage"] for session in resumed["run_info"]["sessions"]] == [-1, crash_stage - 1]
    assert measurements(resumed) == measurements(expected)
    assert (run_dir / "predictions.jsonl").read_text() == (expected_dir / "predictions.jsonl").read_text()
    assert not (run_dir / "checkpoint.json").exists()


WRAPPER = """
import os, signal, sys
import torch

torch.set_num_threads(2)
kill_at = os.environ.get("KILL_AT")
if kill_at == "training":
    from cvit_bench.training import loop

    original_step, calls = loop.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # stage 3, step 2 of 4
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(*args, **kwargs)

    loop.train_step = train_step
elif kill_at == "results":
    from cvit_bench import io

    original_write = io.atomic_write_bytes

    def atomic_write_bytes(path, data):
        if os.path.basename(path) == "results.json":  # half the bytes reach the disk, then the process dies
            with open(os.path.join(os.path.dirname(path), ".results.json.partial.tmp"), "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, data)

    io.atomic_write_bytes = atomic_write_bytes
from cvit_bench.cli import app

app(sys.argv[1:], prog_name="cvit-bench")
"""


def cvit_bench_process(tmp_path: Path, args: list[str], kill_at: str | None) -> subprocess.CompletedProcess:
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "KILL_AT": kill_at or "", "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_while_training_and_while_writing_results_then_resume_is_identical(tmp_path, uninterrupted_smoke):
    expected, _ = uninterrupted_smoke("seqlora")
    args = ["run", "--suite", SMOKE, "--method", "seqlora", "--results-dir", str(tmp_path / "results")]
    run_dir = tmp_path / "results" / SMOKE / "seqlora" / "seed0"

    killed = cvit_bench_process(tmp_path, args, "training")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_json(run_dir / "checkpoint.json")["stage"] == 2

    killed = cvit_bench_process(tmp_path, args, "results")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run_dir / ".results.json.partial.tmp").stat().st_size > 0
    assert not (run_dir / "results.json").exists()
    assert find_results(tmp_path / "results") == [], "a half-written run is never taken for a finished one"
    assert read_json(run_dir / "checkpoint.json")["stage"] == 6

    finished = cvit_bench_process(tmp_path, args, None)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "resuming" in finished.stdout
    result = read_json(run_dir / "results.json")
    assert result["run_info"]["resumed_after_stages"] == [2, 6]
    assert measurements(result) == measurements(expected)


def test_config_does_not_depend_on_where_the_files_live(tmp_path):
    """A run directory moved to another clone must still resume and average with its seeds."""
    import shutil

    from cvit_bench.runner import build_method, resolved_config
    from cvit_bench.suites.schema import TEMPLATES_DIR
    from cvit_bench.suites.materialize import materialize

    shutil.copytree(TEMPLATES_DIR, tmp_path / "templates")
    here, there = load_suite(SMOKE), load_suite(SMOKE, templates_dir=tmp_path / "templates")
    assert here.tasks[0].template.path != there.tasks[0].template.path
    data, method = materialize(here, 0), build_method("seqlora", {})
    configs = [resolved_config(RunOptions(suite, "seqlora", 0, tmp_path), method, data, "b", 4) for suite in (here, there)]
    assert configs[0] == configs[1]
    assert str(TEMPLATES_DIR.parent) not in json.dumps(configs[0]) and str(tmp_path) not in json.dumps(configs[1])


def test_finished_run_is_left_as_it_is(uninterrupted_smoke):
    _, run_dir = uninterrupted_smoke("seqlora")
    before = (run_dir / "results.json").stat().st_mtime_ns
    reporter = CrashInStage(1)  # would raise if the run trained again
    run(options(run_dir.parents[2]), reporter)
    assert any("already complete" in message for message in reporter.messages)
    assert (run_dir / "results.json").stat().st_mtime_ns == before


def test_checkpoint_of_another_configuration_is_refused_until_fresh(tmp_path):
    with pytest.raises(Crash):
        run(options(tmp_path), CrashInStage(1))
    with pytest.raises(ConfigError, match=r"checkpoint was made with a different configuration \(differs in: steps_per_task\)"):
        run(options(tmp_path, steps_per_task=2), CrashInStage(1))
    with pytest.raises(ConfigError, match=r"differs in: method_config.lr"):
        run(options(tmp_path, method_overrides={"lr": 2e-3}), CrashInStage(1))
    with pytest.raises(Crash):
        run(options(tmp_path, steps_per_task=2), CrashInStage(1), fresh=True)
    assert read_json(options(tmp_path).run_dir / "checkpoint-stage0" / "state.json")["config"]["steps_per_task"] == 2


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run_dir = options(tmp_path).run_dir
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / ".lock")):
        with pytest.raises(ConfigError, match="another cvit-bench process is running into this directory"):
            run(options(tmp_path))


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    result = runner.invoke(app, ["run", "--suite", SMOKE, "--method", "seqlora", "--option", "lr=1e30", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "stage 1 (mcq): loss became nan" in message and "the checkpoint after stage 0 is kept" in message
    run_dir = tmp_path / SMOKE / "seqlora" / "seed0"
    assert read_json(run_dir / "checkpoint.json")["stage"] == 0 and not (run_dir / "results.json").exists()


def test_disk_full_while_writing_results_leaves_no_file_and_resume_finishes(tmp_path, monkeypatch):
    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "results.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    args = ["run", "--suite", SMOKE, "--method", "zeroshot", "--results-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    run_dir = tmp_path / SMOKE / "zeroshot" / "seed0"
    assert "results.json failed (No space left on device)" in " ".join(result.output.split())
    assert not [p.name for p in run_dir.iterdir() if "results.json" in p.name], "neither results.json nor its temporary file"
    monkeypatch.setattr(os, "replace", real_replace)

    resumed = runner.invoke(app, ["run", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    info = read_json(run_dir / "results.json")["run_info"]
    assert info["resumed_after_stages"] == [1] and info["request"]["method"] == "zeroshot"


def test_resume_of_a_directory_that_is_not_a_run_says_so(tmp_path):
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "run_request.json is missing" in " ".join(result.output.split())


def test_unreadable_checkpoint_names_its_pointer(tmp_path):
    with pytest.raises(Crash):
        run(options(tmp_path), CrashInStage(1))
    run_dir = options(tmp_path).run_dir
    (run_dir / "checkpoint-stage0" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match=r"checkpoint\.json: unreadable checkpoint .*--fresh"):
        run(options(tmp_path))
    assert json.loads((run_dir / "checkpoint.json").read_text())["stage"] == 0
