"""--save-adapters and `cvit-bench eval RUN_DIR --stage K`; what predictions.jsonl records; per-task generation length."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.data.collate import Collator
from cvit_bench.io import read_json
from cvit_bench.models.backend import load_processor
from cvit_bench.checkpoint import load_checkpoint, load_stage_weights, model_tensors
from cvit_bench.distributed import Processes
from cvit_bench.models.clip_towers import prepare_clip
from cvit_bench.runner import RunOptions, build_eval_plan, build_method, build_run_model, reevaluate_stage, run
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


# a peft adapter; mixture adapters, routers and selector state; experts with CLIP anchors (the CLIP bound again at eval)
@pytest.mark.parametrize("method", ["seqlora", "branchlora", "hide"])
def test_exported_stage_weights_restore_the_stage_and_reevaluate_to_its_row(method, short_suite, tmp_path, one_thread):
    path, model_dir = short_suite
    options = RunOptions(load_suite(str(path)), method, 0, tmp_path, model=str(model_dir), threads=one_thread, save_adapters=True)
    run_dir = run(options, keep_checkpoint=True)  # the last checkpoint holds the final stage's tensors to compare with
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["stage1", "stage2"]
    if method == "seqlora":
        config = json.loads((run_dir / "adapters" / "stage2" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (run_dir / "adapters" / "stage2" / "adapter_model.safetensors").is_file()
    rebuilt = build_method(method, {})
    clip = prepare_clip(options.suite, model_dir, f"external:{model_dir}") if rebuilt.needs_clip() else None
    model, _, _, _ = build_run_model(options, rebuilt, materialize(options.suite, 0), model_dir, Processes(), clip)
    load_stage_weights(run_dir / "adapters" / "stage2", model, rebuilt)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.stage == 2
    restored = model_tensors(model, set(checkpoint.model))
    assert restored.keys() == checkpoint.model.keys() and all(torch.equal(restored[k], checkpoint.model[k]) for k in restored)
    state = rebuilt.state_dict()
    assert state.keys() == checkpoint.method.keys() and all(torch.equal(state[k], checkpoint.method[k]) for k in state)
    for stage in (1, 2):
        report = reevaluate_stage(run_dir, stage)
        assert report["sets"] and all(row["vu"] == row["recorded"]["vu"] and row["if"] == row["recorded"]["if"] for row in report["sets"])
    assert read_json(run_dir / "eval-stage2.json")["stage"] == 2


def test_eval_command_prints_the_row_and_names_a_missing_stage(short_suite, tmp_path, one_thread):
    path, model_dir = short_suite
    run_dir = run(RunOptions(load_suite(str(path)), "seqlora", 0, tmp_path, model=str(model_dir), threads=one_thread, save_adapters=True))
    runner = CliRunner()
    shown = runner.invoke(app, ["eval", str(run_dir), "--stage", "1"])
    assert shown.exit_code == 0, shown.output
    assert "mcq" in shown.output and "recorded VU" in shown.output
    missing = runner.invoke(app, ["eval", str(run_dir), "--stage", "3"])
    assert missing.exit_code == 2 and "--stage 3: seqlora trains in stages [1, 2]" in missing.output
    plain = run(RunOptions(load_suite(str(path)), "seqlora", 1, tmp_path, model=str(model_dir), threads=one_thread))
    unexported = runner.invoke(app, ["eval", str(plain), "--stage", "1"])
    assert unexported.exit_code == 2 and "was the run started with --save-adapters?" in unexported.output
    results = read_json(run_dir / "results.json")
    results["run_info"]["config"]["method_config"]["lr"] = 0.5  # as if the suite's defaults had changed since the run
    (run_dir / "results.json").write_text(json.dumps(results))
    changed = runner.invoke(app, ["eval", str(run_dir), "--stage", "1"])
    assert changed.exit_code == 2 and "differs in: method_config" in changed.output and "cannot be evaluated" in " ".join(changed.output.split())


def test_predictions_carry_the_prompt_as_sent_and_the_extracted_answer(short_suite, tmp_path, one_thread):
    path, model_dir = short_suite
    run_dir = run(RunOptions(load_suite(str(path)), "zeroshot", 0, tmp_path, model=str(model_dir), threads=one_thread))
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert predictions and all({"prompt", "prediction", "extracted"} <= set(p) for p in predictions)
    mcq = next(p for p in predictions if p["set"] == "mcq")
    phrasing = load_suite(str(path)).tasks[0].template.train[0].prompt
    assert all(part.strip() in mcq["prompt"] for part in phrasing.split("{question}") if part.strip()), "the phrasing, as sent"
    assert mcq["extracted"] is None or mcq["extracted"] in "ABCDEFGH"


def test_a_tasks_max_new_tokens_replaces_the_reference_length(short_suite, tmp_path):
    path, model_dir = short_suite
    data = yaml.safe_load(path.read_text())
    data["tasks"][0]["max_new_tokens"] = 3
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    suite = load_suite(str(edited))
    collator = Collator(load_processor(model_dir, "llava"))
    plan = build_eval_plan(suite, materialize(suite, 0), collator, 0)
    lengths = {s.name: s.max_new_tokens for s in plan.seen}
    margin = suite.evaluation.max_new_tokens_margin
    assert lengths["mcq"] == 3 and lengths["vqa"] == collator.target_length(plan.seen[1].samples) + margin
    data["tasks"][0]["max_new_tokens"] = 0
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match=r"tasks\[0\]\.max_new_tokens: expected a positive integer, got 0"):
        load_suite(str(edited))
