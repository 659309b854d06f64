"""Mechanism tests of SEFE (``sefe``): RegLoRA's mask, accumulation, penalty and merged base; ASD's rewritten samples; resume."""
from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cvit_bench.evaluation.contracts import check_contract
from cvit_bench.methods.sefe import answer_text, diversify, kept_abs_mean, top_positions
from cvit_bench.models.backend import projector_parameters
from cvit_bench.runner import build_method
from cvit_bench.training.loop import train_stage

from conftest import fresh_method


def fresh(smoke, **options):
    return fresh_method(smoke, "sefe", **{"asd_share": 0.0, **options})


def train(smoke, model, method, collator, task: str, stage: int, steps: int = 2):
    suite, _, samples = smoke
    method.before_stage(stage, (task,), model)
    train_stage(model, method, samples[task], collator, dataclasses.replace(suite.training, warmup_steps=1), steps=steps, seed=f"test-{stage}")
    return method.after_stage(stage, model, samples[task], collator)


def bases(method) -> list[torch.Tensor]:
    return [layer.base.weight.detach().clone() for layer in method.layers.values()]


# --- RegLoRA on small tensors --------------------------------------------------------------
def test_mask_keeps_exactly_the_top_fraction_of_abs_delta():
    torch.manual_seed(0)
    delta = torch.randn(10, 20)
    kept = top_positions(delta, 0.05)
    assert kept.dtype == torch.int32 and len(kept) == 10, "int(0.05 * 200) positions, stored as int32"
    assert set(kept.tolist()) == set(delta.abs().flatten().argsort(descending=True)[:10].tolist())
    assert len(top_positions(delta, 0.001)) == 1, "at least one position on a tiny module"


def test_penalty_equals_brute_force_mean_abs_BA_at_kept_positions_and_its_gradients():
    torch.manual_seed(0)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([0, 8, 34, 8, 17, 20], dtype=torch.int32)  # 8 twice: a duplicate counts twice
    value = kept_abs_mean(a, b, positions)
    brute = (b @ a).flatten()[positions.long()].abs().mean()
    assert torch.allclose(value, brute)
    grads = torch.autograd.grad(value, (a, b))
    brute_grads = torch.autograd.grad(brute, (a, b))
    assert all(torch.allclose(g, h) for g, h in zip(grads, brute_grads))
    assert torch.autograd.gradcheck(lambda a, b: kept_abs_mean(a, b, positions), (a, b))
    unique = kept_abs_mean(a, b, positions.unique())
    assert not torch.allclose(value, unique), "duplicates weigh more than once"


# --- RegLoRA on the smoke model ------------------------------------------------------------
def test_merged_base_equals_base_plus_every_earlier_tasks_delta_and_each_task_starts_fresh(smoke):
    model, method, collator = fresh(smoke)
    original = bases(method)
    deltas = [torch.zeros_like(w) for w in original]
    for stage, task in enumerate(("mcq", "ocr"), start=1):
        train(smoke, model, method, collator, task, stage)
        for m, (layer, (a, b)) in enumerate(zip(method.layers.values(), method.finished[-1])):
            assert b.abs().sum() > 0, "the task's LoRA trained"
            deltas[m] += layer.scaling * b @ a
            assert torch.allclose(layer.base.weight, original[m] + deltas[m], atol=1e-6)
            assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)), "the next task starts from B = 0"
            assert not torch.equal(layer.lora_A[0], a), "and from a new A"
    assert len(method.finished) == 2


def test_kept_positions_are_each_tasks_top_two_percent_accumulated_with_duplicates(smoke):
    model, method, collator = fresh(smoke)
    train(smoke, model, method, collator, "mcq", 1)
    first = [kept.clone() for kept in method.positions]
    for kept, (a, b) in zip(first, method.finished[0]):
        delta = b @ a
        assert len(kept) == int(0.02 * delta.numel())
        assert set(kept.tolist()) == set(delta.abs().flatten().topk(len(kept)).indices.tolist())
    facts = train(smoke, model, method, collator, "ocr", 2)
    for before, after, (a, b) in zip(first, method.positions, method.finished[1]):
        assert after.dtype == torch.int32 and torch.equal(after[: len(before)], before)
        assert set(after[len(before) :].tolist()) == set((b @ a).abs().flatten().topk(len(before)).indices.tolist())
    assert facts["kept_positions"] == 2 * sum(len(kept) for kept in first)
    assert facts["regularizer_first"] == 0 < facts["regularizer_last"], "the fresh LoRA (B = 0) moves under the penalty"


def test_unique_positions_count_a_position_kept_by_two_tasks_once(smoke):
    model, method, collator = fresh(smoke, unique_positions=True)
    method.positions = [torch.tensor([3, 1], dtype=torch.int32) for _ in method.layers]  # as if a first task had kept 3 and 1
    method.finished = [[(torch.zeros_like(layer.lora_A[0]), torch.zeros_like(layer.lora_B[0])) for layer in method.layers.values()]]
    facts = train(smoke, model, method, collator, "mcq", 2)
    for kept in method.positions:
        assert kept.tolist() == sorted(set(kept.tolist())) and {1, 3} <= set(kept.tolist())
    assert any("unique_positions" in d for d in facts["deviations"])


def test_penalty_is_lambda_times_the_module_mean_and_reaches_only_the_current_lora(smoke):
    model, method, collator = fresh(smoke)
    assert method.extra_loss({}, None) is None, "nothing is kept before the first task ends"
    train(smoke, model, method, collator, "mcq", 1)
    method.before_stage(2, ("ocr",), model)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.normal_()  # the fresh B is 0, which gives a penalty of 0 and no gradient to A
    model.zero_grad(set_to_none=True)
    loss = method.extra_loss({}, None)
    brute = torch.stack([(layer.lora_B[0] @ layer.lora_A[0]).flatten()[kept.long()].abs().mean()
                         for layer, kept in zip(method.layers.values(), method.positions)]).mean()
    assert torch.allclose(loss, 2500.0 * brute)
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(re.search(r"\.lora_[AB]$", name) for name in with_grad)
    assert not any(p.grad is not None for p in projector_parameters(model))
    assert all(layer.base.weight.grad is None for layer in method.layers.values()), "the merged base is frozen"


def test_state_round_trip_through_safetensors_rebuilds_the_merged_base_bit_exactly(smoke, tmp_path):
    model, method, collator = fresh(smoke)
    train(smoke, model, method, collator, "mcq", 1)
    train(smoke, model, method, collator, "ocr", 2)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, tmp_path / "method.safetensors")
    restored_model, restored, _ = fresh(smoke)
    restored.load_state_dict(load_file(tmp_path / "method.safetensors"))
    assert all(torch.equal(x, y) for x, y in zip(bases(restored), bases(method)))
    assert all(torch.equal(x, y) and x.dtype == torch.int32 for x, y in zip(restored.positions, method.positions))
    assert len(restored.finished) == 2
    restored.before_stage(3, ("caption",), restored_model)
    method.before_stage(3, ("caption",), model)
    with torch.no_grad():
        for mine, theirs in zip(method.layers.values(), restored.layers.values()):
            theirs.lora_A.copy_(mine.lora_A)
            theirs.lora_B.normal_(generator=torch.Generator().manual_seed(1))
            mine.lora_B.copy_(theirs.lora_B)
    assert torch.equal(restored.extra_loss({}, None), method.extra_loss({}, None))


# --- ASD -----------------------------------------------------------------------------------
def stated_candidate(prompt: str) -> str:
    return re.search(r'\nIs the answer "(.*)"\?\n', prompt).group(1)


@pytest.mark.parametrize("task", ["ocr", "mcq", "vqa", "caption"])
def test_asd_rewrites_the_stated_share_into_well_formed_yes_no_and_multiple_choice_with_right_answers(smoke, task):
    _, _, samples = smoke
    originals = {s.id: s for s in samples[task]}
    share = 0.5
    rewritten, built = diversify(samples[task], share, random.Random(0))
    changed = [s for s in rewritten if s.id.endswith("-asd")]
    assert len(rewritten) == len(originals) and len(changed) == round(share * len(originals)) == sum(built.values())
    assert [s.id.removesuffix("-asd") for s in rewritten] == list(originals), "rewritten in place"
    for sample in changed:
        original = originals[sample.id.removesuffix("-asd")]
        right = answer_text(original)
        assert sample.turns[-1].image == original.turns[-1].image
        assert check_contract(sample.contract, sample.target, ground_truth=sample.answer, n_options=len(sample.options) or None).passed
        if sample.phrasing_id == "asd/yes_no":
            assert sample.contract == "yes_no" and sample.target in ("yes", "no")
            assert (stated_candidate(sample.turns[-1].prompt).lower() == right.lower()) == (sample.target == "yes")
            assert "\nA. " not in sample.turns[-1].prompt, "a multiple-choice question loses its listed options"
        else:
            assert sample.phrasing_id == "asd/multiple_choice" and sample.contract == "letter"
            assert 2 <= len(sample.options) <= 4 and len({o.lower() for o in sample.options}) == len(sample.options)
            assert sample.options["ABCD".index(sample.target)] == right
            listed = re.findall(r"\n([A-D])\. (.*)", sample.turns[-1].prompt)
            assert [text for _, text in listed] == list(sample.options)
            if original.answer.lower() in ("yes", "no"):
                assert sorted(o.lower() for o in sample.options) == ["no", "yes"]
    if task == "mcq":
        assert built == {"yes_no": len(changed)}, "a multiple-choice task's other buildable style is yes/no"
    elif task in ("ocr", "caption"):
        assert built["yes_no"] == built["multiple_choice"], "an open task's share is split equally"
    yes_no = [s.target for s in changed if s.phrasing_id == "asd/yes_no"]
    assert abs(yes_no.count("yes") - yes_no.count("no")) <= 1


def test_asd_runs_through_the_train_data_hook_and_is_recorded(smoke):
    _, _, samples = smoke
    method = build_method("sefe", {})
    stage_samples = method.train_data(1, samples["ocr"])
    assert sum(s.id.endswith("-asd") for s in stage_samples) == round(0.2 * len(samples["ocr"]))
    assert method.train_data(1, samples["ocr"]) == stage_samples, "the same rewrite on a resumed run"
    assert sum(method.asd_built.values()) == round(0.2 * len(samples["ocr"]))
    assert "rule-buildable" in method.config.deviations()[0]
    assert build_method("sefe", {"asd_share": 0.0}).config.deviations() == ["asd_share=0: no answer style diversification (MCITlib's SEFE, RegLoRA only)"]
