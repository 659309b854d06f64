"""Two processes (gloo, CPU) give the single process's run: DDP + token-weighted losses + sharded, gathered evaluation,
also with the frozen weights sharded by FSDP; FSDP gathers once per generate call, not once per token."""
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
    # Under FSDP every frozen base tensor is a shard: all 46 but the projector's 4 (trained); CLIP's class embedding
    # (owned by a module with children) is sharded in that module's own unit.
    assert double["run_info"].get("fsdp_sharded_tensors", 0) == (42 if mode == "--use_fsdp" else 0)
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



def _shard_and_count(rank: int, model_dir: str, out_dir: str) -> None:
    """One of two gloo processes: shard a tiny LLaVA as a run does and count FSDP's all-gathers while it generates."""
    import gc
    import weakref

    import torch
    from PIL import Image
    from torch.distributed.tensor import DTensor

    from cvit_bench.distributed import gathered, shard_frozen_weights
    from cvit_bench.models.backend import load_model

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    try:
        model, processor = load_model(model_dir)
        model.requires_grad_(False)
        inputs = processor(images=[Image.new("RGB", (16, 16), (200, 40, 90))], text=["USER: <image>\nWhat is it?\nASSISTANT:\n"],
                           return_tensors="pt")

        def reply(tokens: int) -> list[int]:
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)[0].tolist()

        whole_reply = reply(5)
        base = {id(p) for p in model.parameters()}
        block_weight = weakref.ref(model.model.language_model.layers[0].self_attn.q_proj.weight)
        sharded = shard_frozen_weights(model, base, Processes(rank, 2, torch.device("cpu"), True))
        gc.collect()
        calls: list[int] = []
        original = torch.distributed.all_gather_single

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        counts = {}
        torch.distributed.all_gather_single = counted
        try:
            for tokens in (1, 5):
                calls.clear()
                counts[f"sharded_{tokens}"] = (reply(tokens), len(calls))
                calls.clear()
                with gathered(model):
                    gathering = len(calls)
                    counts[f"gathered_{tokens}"] = (reply(tokens), gathering, len(calls) - gathering)
        finally:
            torch.distributed.all_gather_single = original
        whole = sorted(name for name, p in model.named_parameters() if not isinstance(p, DTensor))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "counts": counts, "whole_reply": whole_reply, "base": len(base), "sharded": sharded, "whole": whole,
            "original_alive": block_weight() is not None}))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_shards_the_root_and_gathers_once_per_generate_call(tmp_path):
    """Every frozen weight but the tied embedding is a shard (CLIP's class embedding too, in its embeddings' unit) and the
    unsharded originals are not kept alive. Sharded, a 5-token reply costs more all-gathers than a 1-token one (each
    forward gathers every unit it runs); inside ``gathered`` the all-gathers happen once up front, the same number for
    either length, and generating makes none -- with the unsharded model's reply."""
    import torch.multiprocessing

    from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer

    config = TinyLlavaConfig(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
                             text_layers=2, text_heads=2, text_intermediate=64, vocab_size=300, max_positions=256)
    tokenizer = train_tokenizer(["USER: What is it?\nASSISTANT:\nA red square."] * 4, config.vocab_size)
    save_tiny(build_model(tokenizer, config), build_processor(tokenizer, config), tmp_path / "model")
    torch.multiprocessing.start_processes(_shard_and_count, args=(str(tmp_path / "model"), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["whole"] == ["model.language_model.embed_tokens.weight"]  # tied to lm_head: no single unit owns it
        assert result["sharded"] == result["base"] - 1
        assert not result["original_alive"]
        counts = result["counts"]
        (reply_1, sharded_1), (reply_5, sharded_5) = counts["sharded_1"], counts["sharded_5"]
        assert sharded_5 > sharded_1 > 0
        gathering = counts["gathered_1"][1]
        assert gathering == sharded_1  # one all-gather per unit: what one full forward (prefill) costs
        assert counts["gathered_1"] == [reply_1, gathering, 0] and counts["gathered_5"] == [reply_5, gathering, 0]
        assert reply_1 == result["whole_reply"][: len(reply_1)] and reply_5 == result["whole_reply"]
