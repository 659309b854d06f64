"""Two processes (gloo, CPU) give the single process's run: DDP + token-weighted losses + sharded, gathered evaluation,
also with the frozen weights sharded by FSDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvit_bench.distributed import Processes, current_processes
from cvit_bench.io import read_json
from cvit_bench.registry import ConfigError

SMOKE = "cvit-v1-smoke"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shares_cover_every_item_once_in_order(count):
    items = list(range(10))
    shares = [Processes(index, count).share(items) for index in range(count)]
    assert [x for share in shares for x in share] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("variable, value", [("ACCELERATE_USE_DEEPSPEED", "true"), ("FSDP_OFFLOAD_PARAMS", "true"),
                                             ("FSDP_RESHARD_AFTER_FORWARD", "false"), ("FSDP_RESHARD_AFTER_FORWARD", "SHARD_GRAD_OP")])
def test_unsupported_launch_modes_fail_before_any_work(variable, value, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match="is not supported"):
        current_processes()


@pytest.mark.parametrize("method, mode", [("seqlora", "--multi_gpu"), ("branchlora", "--multi_gpu"), ("seqlora", "--use_fsdp"),
                                          ("branchlora", "--use_fsdp")])
def test_two_processes_match_one(method, mode, tmp_path, uninterrupted_smoke):
    single, single_dir = uninterrupted_smoke(method)
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", mode, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "cvit_bench", "run", "--suite", SMOKE, "--method", method, "--results-dir", str(tmp_path), "--threads", "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / SMOKE / method / "seed0"
    double = read_json(run_dir / "results.json")
    assert double["run_info"]["processes"] == 2
    # Under FSDP every frozen base tensor was a shard: all 46 but the projector's 4 (trained) and CLIP's class
    # embedding (owned by a module with children, kept whole).
    assert double["run_info"].get("fsdp_sharded_tensors", 0) == (41 if mode == "--use_fsdp" else 0)
    # Matrices and replies are identical; the per-stage losses differ only by summation order across processes.
    for group, kinds in single["matrices"].items():
        for kind, matrix in kinds.items():
            np.testing.assert_allclose(np.asarray(double["matrices"][group][kind], dtype=float), np.asarray(matrix, dtype=float), atol=1e-6)
    replies = lambda path: [(p["stage"], p["set"], p["id"], p["prediction"]) for p in map(json.loads, path.read_text().splitlines())]
    assert replies(run_dir / "predictions.jsonl") == replies(single_dir / "predictions.jsonl")
    np.testing.assert_allclose([s["final_loss"] for s in double["stages"]], [s["final_loss"] for s in single["stages"]], rtol=1e-4)
    # What the method observed while evaluating (BranchLoRA's selector accuracy) covers every process's share.
    facts = lambda result: [(s.get("selector_samples"), s.get("selector_accuracy_train"), s.get("selector_accuracy_train_per_task")) for s in result["stages"]]
    assert facts(double) == facts(single)
    assert not (tmp_path / SMOKE / method / "seed0" / "checkpoint.json").exists()
