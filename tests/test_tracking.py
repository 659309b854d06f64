"""--log-with: each optimizer step's loss and learning rate, per stage, through accelerate's tracker interface."""
from __future__ import annotations

import importlib.util
import math

import accelerate.tracking
import numpy as np
import pytest
import torch
from accelerate.tracking import GeneralTracker, register_tracker_class
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.io import read_json
from cvit_bench.runner import RunOptions, run
from cvit_bench.suites.schema import load_suite
from cvit_bench.training.tracking import TRACKING_DIR


class MemoryTracker(GeneralTracker):
    """A tracker as a user registers one with accelerate: it keeps what the run logs."""

    name = "cvit-test-memory"
    requires_logging_directory = True
    instances: list["MemoryTracker"] = []

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name, self.logging_dir = run_name, logging_dir
        self.config: dict = {}
        self.logged: list[tuple[int, dict]] = []
        self.finished = False
        MemoryTracker.instances.append(self)

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values: dict):
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_every_step_logs_its_loss_and_learning_rates_per_stage(short_suite, tmp_path, one_thread):
    register_tracker_class(MemoryTracker)
    path, model_dir = short_suite
    options = RunOptions(load_suite(str(path)), "seqlora", 0, tmp_path, model=str(model_dir), threads=one_thread, log_with=MemoryTracker.name)
    run_dir = run(options)
    tracker = MemoryTracker.instances[-1]
    assert tracker.finished and tracker.logging_dir == str(run_dir / TRACKING_DIR)
    assert tracker.config["method"] == "seqlora" and tracker.config["batch_size"] == 2
    result = read_json(run_dir / "results.json")
    assert result["run_info"]["request"]["log_with"] == MemoryTracker.name
    for stage, facts in enumerate(result["stages"], start=1):
        logged = [(step, values) for step, values in tracker.logged if f"stage{stage}/loss" in values]
        assert [step for step, _ in logged] == [1, 2]  # the short suite's two steps a stage
        losses = [values[f"stage{stage}/loss"] for _, values in logged]
        assert all(math.isfinite(loss) for loss in losses)
        np.testing.assert_allclose(np.mean(losses), facts["final_loss"], rtol=1e-6)  # the stage's one log window
        # The rate each step used: one warm-up step, then the cosine's start, both the method's full lr (1e-3, not the suite's).
        assert [values[f"stage{stage}/lr"] for _, values in logged] == pytest.approx([tracker.config["lr"]] * 2)
        assert tracker.config["lr"] != tracker.config["suite_lr"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed in this environment")
def test_tensorboard_writes_event_files_into_the_run_directory(short_suite, tmp_path, one_thread):
    path, model_dir = short_suite
    run_dir = run(RunOptions(load_suite(str(path)), "seqlora", 0, tmp_path, model=str(model_dir), threads=one_thread, log_with="tensorboard"))
    assert list((run_dir / TRACKING_DIR).rglob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_or_unknown_exits_2_naming_the_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as where tensorboard is not installed
    runner = CliRunner()
    missing = runner.invoke(app, ["run", "--suite", "cvit-v1-smoke", "--method", "seqlora", "--results-dir", str(tmp_path),
                                  "--log-with", "tensorboard"])
    assert missing.exit_code == 2 and "--log-with tensorboard: the tensorboard package is not installed" in missing.output
    unknown = runner.invoke(app, ["run", "--suite", "cvit-v1-smoke", "--method", "seqlora", "--results-dir", str(tmp_path),
                                  "--log-with", "tensorbored"])
    assert unknown.exit_code == 2 and "--log-with 'tensorbored': expected none or one of accelerate's trackers" in unknown.output
    assert not any(tmp_path.iterdir())  # refused before anything was written
