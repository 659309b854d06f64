"""Both model families through the same code path: Auto classes, shipped chat templates, module maps,
dtype, gradient checkpointing, step budgets, and batched left-padded generation that matches one-by-one."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import Sample, phrase_all
from cvit_bench.evaluation.generate import generate
from cvit_bench.io import read_json
from cvit_bench.models.backend import load_model, module_map_for, parse_module_patterns, projector_parameters, vision_parameters
from cvit_bench.registry import ConfigError
from cvit_bench.runner import RunOptions, build_method, declare_suite_tasks, run
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite

from conftest import needs_smolora
from model_builders import build_tiny_llava, build_tiny_qwen2_vl

FAMILIES = {"llava": build_tiny_llava, "qwen2_vl": build_tiny_qwen2_vl}
TWO_TASKS = """
name: two-tasks
description: two short tasks for backend tests
data: {source: synthetic, seed: 0, image_size: 64}
training: {steps_per_task: 50, batch_size: 4, lr: 0.001, warmup_steps: 1}
evaluation: {batch_size: 4}
tasks:
  - {name: mcq, kind: mcq, template: mcq, scorer: option_letter, train_size: 8, test_size: 3}
  - {name: vqa, kind: vqa, template: vqa, scorer: vqa_accuracy, train_size: 8, test_size: 3}
unseen:
  - {name: scene, kind: scene, template: classify, scorer: label_match, test_size: 2, shots: [0, 2]}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build(root / family) for family, build in FAMILIES.items()}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "two-tasks.yaml"
    path.write_text(TWO_TASKS)
    return load_suite(str(path))


def _samples(suite, task: str, split: str = "train") -> list[Sample]:
    spec = next(t for t in suite.tasks + suite.unseen if t.name == task)
    data = materialize(suite, 0)
    return phrase_all(data.records(task, split), task, spec.template.training_phrasings("single"))


@pytest.mark.parametrize("family", FAMILIES)
def test_module_map_finds_each_part(family, checkpoints):
    model, processor = load_model(checkpoints[family])
    modules = module_map_for(model)
    layers = model.config.text_config.num_hidden_layers
    assert len(modules.matching(model, modules.llm_linears)) == 7 * layers
    assert len(modules.matching(model, modules.llm_ffn)) == 3 * layers
    assert len(modules.matching(model, modules.projector)) == 2
    vision, projector = {id(p) for p in vision_parameters(model)}, {id(p) for p in projector_parameters(model)}
    assert vision and projector and not vision & projector
    assert processor.chat_template  # the checkpoint's own template is what prompts are built with


def test_module_patterns_override_the_family_and_unknown_input_fails(checkpoints):
    model, _ = load_model(checkpoints["llava"], module_patterns=parse_module_patterns([r"llm_linears=.*language_model\.layers\.0\.self_attn\.q_proj"]))
    wrapped = build_method("seqlora", {}).wrap_model(model, ["a"])
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 1 and re.search(r"layers\.0\.self_attn\.q_proj$", adapted.pop())
    with pytest.raises(ConfigError, match="KEY=REGEX"):
        parse_module_patterns(["attention=q_proj"])
    with pytest.raises(ConfigError, match="invalid regular expression"):
        parse_module_patterns(["llm_ffn=(unclosed"])
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="no built-in module map.*--module-pattern"):
        module_map_for(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_batch_labels_only_the_answer(family, checkpoints, suite):
    model, processor = load_model(checkpoints[family])
    collator = Collator(processor)
    samples = _samples(suite, "vqa")[:3]
    batch = collator.train_batch(samples)
    for row, sample in enumerate(samples):
        answer = batch["labels"][row][batch["labels"][row] != -100]
        assert collator.tokenizer.decode(answer[:-1]) == sample.target and answer[-1] == collator.tokenizer.eos_token_id
    if "mm_token_type_ids" in batch:  # Qwen2-VL: image tokens marked, padded with the input ids
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
        image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
        assert torch.equal((batch["mm_token_type_ids"] == 1).sum(1), image_tokens) and image_tokens.min() > 0
    assert model(**batch).loss.isfinite()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["seqlora", "branchlora", pytest.param("smolora", marks=needs_smolora)])
def test_batched_generation_matches_one_by_one(family, method, checkpoints, suite):
    """Left padding, the KV cache and length bucketing change nothing: each reply is the one it gets alone.

    Adapters get random weights so that routing and adapters matter (a zero LoRA B would hide them);
    the batch mixes few-shot prompts (several images) with short ones, so padding is large.
    """
    torch.manual_seed(0)
    model, processor = load_model(checkpoints[family])
    method_instance = build_method(method, {"route_as": "scene=mcq"} if method == "smolora" else {})  # this suite has no classify
    declare_suite_tasks(method_instance, suite)
    model = method_instance.wrap_model(model, suite.task_names)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.2)
    if method == "branchlora":
        method_instance.trained = 2  # evaluate as after two stages: the task selector picks each sample's router
    collator = Collator(processor)
    data = materialize(suite, 0)
    spec = suite.unseen[0]
    shots = phrase_all(data.records("scene", "test"), "scene", spec.template.training_phrasings("single"), shots=2,
                       shot_pool=data.records("scene", "train"), seed=0)
    samples = _samples(suite, "mcq", "test") + shots + _samples(suite, "vqa", "test")
    kwargs = dict(max_new_tokens=6, batch_context=method_instance.batch_context)
    batched, _ = generate(model, collator, samples, batch_size=len(samples), **kwargs)
    alone = [generate(model, collator, [sample], batch_size=1, **kwargs)[0][0] for sample in samples]
    assert batched == alone
    assert len(set(alone)) > 1  # replies differ, so a mix-up of rows would show


def test_bfloat16_weights_and_inputs(checkpoints, suite):
    model, processor = load_model(checkpoints["qwen2_vl"], dtype=torch.bfloat16)
    batch = Collator(processor, dtype=torch.bfloat16).train_batch(_samples(suite, "mcq")[:2])
    assert next(model.parameters()).dtype == torch.bfloat16 and batch["pixel_values"].dtype == torch.bfloat16
    assert model(**batch).loss.isfinite()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family, checkpoints, suite):
    grads = []
    for checkpointing in (False, True):
        model, processor = load_model(checkpoints[family], gradient_checkpointing=checkpointing)
        model.train()
        model(**Collator(processor).train_batch(_samples(suite, "vqa")[:2])).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # renamed in transformers 5.23
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_epochs_per_task_sets_each_stage_steps_from_its_samples(checkpoints, suite, tmp_path):
    """8 training samples per task, batch 4: 1.5 epochs = 3 steps per stage, capped by --max-steps when given."""
    for max_steps, expected in ((None, 3), (2, 2)):
        options = RunOptions(suite, "seqlora", 0, tmp_path, model=str(checkpoints["llava"]), epochs_per_task=1.5, max_steps=max_steps,
                             threads=1, run_id=f"cap{max_steps}")
        result = read_json(run(options) / "results.json")
        assert [stage["steps"] for stage in result["stages"]] == [expected, expected]
        assert result["run_info"]["config"]["epochs_per_task"] == 1.5 and result["run_info"]["config"]["steps_per_task"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_full_run_on_each_family_within_a_step_budget(family, checkpoints, suite, tmp_path):
    run_dir = run(RunOptions(suite, "seqlora", 0, tmp_path, model=str(checkpoints[family]), max_steps=2, threads=1))
    result = read_json(run_dir / "results.json")
    assert result["run_info"]["config"]["max_steps"] == 2 and result["run_info"]["config"]["model"] == str(checkpoints[family])
    assert result["run_info"]["request"]["max_steps"] == 2
    assert len(result["stages"]) == 2 and all(stage["final_loss"] > 0 for stage in result["stages"])
    assert set(result["matrices"]) == {"seen", "unseen", "heldout"}
