"""Mechanism tests of CL-MoE (``clmoe``) and HiDe-LLaVA (``hide``): each fails if the method's defining mechanism is removed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cvit_bench.methods.clmoe import CountingTokenRouter, merge_experts, merge_weights
from cvit_bench.methods.hide import ExpertSchedule, HideGates, HideLoraLinear, anchor_weights
from cvit_bench.methods.mixture import Routing
from cvit_bench.models.backend import load_model
from cvit_bench.registry import ConfigError
from cvit_bench.runner import build_method
from cvit_bench.training.loop import train_stage

from conftest import fresh_method as fresh
from conftest import with_clip


def train(smoke, model, method, collator, task: str, stage: int, steps: int = 3):
    suite, _, samples = smoke
    config = dataclasses.replace(suite.training, warmup_steps=1)
    method.before_stage(stage, (task,), model)
    train_stage(model, method, samples[task], collator, config, steps=steps, seed=f"test-{stage}")
    return method.after_stage(stage, model, samples[task], collator)


# --- CL-MoE ------------------------------------------------------------------------------
def test_clmoe_merge_moves_shifted_experts_by_beta_and_the_rest_by_lambda():
    old = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # 3 experts, one row each
    new = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    shifted = torch.tensor([True, False, False])  # expert 0: used by the previous task, not by this one
    merged = merge_experts(old, new, merge_weights(shifted, beta=0.7, lam=0.3))
    # expert 0: 0.3*old + 0.7*new = (1.7, 0.3); experts 1, 2: 0.7*old + 0.3*new = (1.3, 0.7)
    assert torch.allclose(merged, torch.tensor([[1.7, 0.3], [1.3, 0.7], [1.3, 0.7]]))
    assert torch.equal(merge_experts(old, new, merge_weights(shifted, beta=1.0, lam=1.0)), new), "weights of 1 keep the new experts"


def test_clmoe_router_counts_each_real_tokens_top_two_picks():
    routing = Routing()
    router = CountingTokenRouter(d_in=3, n_experts=4, picks=2, routing=routing)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [1.0, 1.0, 1.0]]))
    x = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])  # tokens prefer experts 0, 1, 2, each with expert 3 second
    router.counts = torch.zeros(4)
    with routing.bind(attention_mask=torch.tensor([[1, 1, 0]])):  # the third token is padding
        gates = router(x)
    assert torch.allclose(gates.sum(-1), torch.ones(1, 3)), "dense softmax over all experts"
    assert router.counts.tolist() == [1.0, 1.0, 0.0, 2.0]


def test_clmoe_task_expert_set_is_each_layers_most_picked(smoke):
    _, method, _ = fresh(smoke, "clmoe")
    counts = torch.tensor([[5.0, 1.0, 3.0, 3.0], [0.0, 9.0, 0.0, 8.0]])
    assert method.expert_set(counts).tolist() == [[True, False, True, False], [False, True, False, True]]


def test_clmoe_after_stage_counts_usage_and_merges_against_the_previous_tasks_experts(smoke):
    model, method, collator = fresh(smoke, "clmoe")
    _, _, samples = smoke
    facts = train(smoke, model, method, collator, "mcq", 1)
    assert len(method.usage) == 1 and "shifted_experts" not in facts, "the first task has nothing to merge against"
    layers = len(method.layers)
    assert method.usage[0].shape == (layers, 4) and (method.usage[0].sum(-1) == method.usage[0].sum(-1)[0]).all()
    assert abs(sum(facts["expert_usage_share"]) - 1) < 1e-6

    method.before_stage(2, ("ocr",), model)
    old = {name: (a.clone(), b.clone()) for name, (a, b) in method.old.items()}
    with torch.no_grad():  # stands in for training: every expert moves
        for layer in method.layers.values():
            layer.lora_A.add_(1.0)
            layer.lora_B.add_(1.0)
    new = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in method.layers.items()}
    method.usage[0] = torch.tensor([[9.0, 9.0, 0.0, 0.0]]).repeat(layers, 1)  # the previous task used experts 0 and 1 everywhere
    facts = method.after_stage(2, model, samples["ocr"], collator)
    shifted = torch.tensor([[True, True, False, False]]) & ~method.expert_set(method.usage[1])
    assert facts["shifted_experts"] == int(shifted.sum())
    for row, (name, layer) in enumerate(method.layers.items()):
        w = torch.where(shifted[row], 0.7, 0.3)[:, None, None]
        assert torch.allclose(layer.lora_A, (1 - w) * old[name][0] + w * new[name][0])
        assert torch.allclose(layer.lora_B, (1 - w) * old[name][1] + w * new[name][1])

    restored = build_method("clmoe", {})
    restored.load_state_dict(method.state_dict())
    assert [torch.equal(a, b) for a, b in zip(restored.usage, method.usage)] == [True, True]


def test_clmoe_refuses_an_expert_set_larger_than_the_experts():
    with pytest.raises(ConfigError, match="must not exceed experts"):
        build_method("clmoe", {"experts": 2, "task_experts": 3})


# --- HiDe-LLaVA --------------------------------------------------------------------------
def hide_layer(schedule: ExpertSchedule, top: bool) -> HideLoraLinear:
    torch.manual_seed(0)
    layer = HideLoraLinear(nn.Linear(6, 5), n_experts=3, rank=2, scaling=2.0, gates=HideGates(schedule, top), init_std=0.01)
    nn.init.normal_(layer.lora_A)
    nn.init.normal_(layer.lora_B)
    return layer


def test_hide_training_runs_only_the_current_tasks_expert():
    schedule = ExpertSchedule(3, "factors", Routing())
    layer, x = hide_layer(schedule, top=False), torch.randn(2, 4, 6)
    schedule.current = 1
    a, b = layer.lora_A[1], layer.lora_B[1]
    assert torch.allclose(layer(x), layer.base(x) + 2.0 * x @ a.T @ b.T, atol=1e-5)


@pytest.mark.parametrize("fusion", ["factors", "average"])
def test_hide_lower_layers_fuse_the_trained_experts_at_inference(fusion):
    schedule = ExpertSchedule(3, fusion, Routing())
    layer, x = hide_layer(schedule, top=False), torch.randn(2, 4, 6)
    schedule.trained = 2  # experts 0 and 1 trained, expert 2 not yet
    A, B = layer.lora_A, layer.lora_B
    if fusion == "factors":  # the authors' code: (B0 + B1)(A0 + A1), cross terms included
        delta = x @ (A[0] + A[1]).T @ (B[0] + B[1]).T
    else:  # the paper's uniform merging: the average of B_i A_i
        delta = (x @ A[0].T @ B[0].T + x @ A[1].T @ B[1].T) / 2
    assert torch.allclose(layer(x), layer.base(x) + 2.0 * delta, atol=1e-4)


def test_hide_top_layer_mixes_experts_by_the_per_sample_anchor_weights():
    routing = Routing()
    schedule = ExpertSchedule(3, "factors", routing)
    layer, x = hide_layer(schedule, top=True), torch.randn(2, 4, 6)
    schedule.trained = 2
    weights = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    with routing.bind(expert_weights=weights):
        out = layer(x)
    A, B = layer.lora_A, layer.lora_B
    expected = torch.stack([sum(weights[i, k] * x[i] @ A[k].T @ B[k].T for k in range(3)) for i in range(2)])
    assert torch.allclose(out, layer.base(x) + 2.0 * expected, atol=1e-4)


def test_hide_anchor_softmax_at_temperature_point_one_picks_the_matching_task():
    image_anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_anchors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    text = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    weights = anchor_weights(image, text, image_anchors, text_anchors, temperature=0.1)
    # sample 0 matches task 1 (similarities 0 and 1): softmax([0, 10]) = (e^-10 / (1 + e^-10), 1 / (1 + e^-10))
    golden = torch.tensor([4.5398e-05, 9.99954602e-01])
    assert torch.allclose(weights[0], golden, atol=1e-7) and torch.allclose(weights[1], golden.flip(0), atol=1e-7)
    assert torch.allclose(anchor_weights(image, text, image_anchors, text_anchors, temperature=1.0)[0], torch.softmax(torch.tensor([0.0, 1.0]), 0))


def test_hide_keeps_other_experts_bit_exact_stores_anchors_and_routes_by_them(smoke):
    model, method, collator = fresh(smoke, "hide")
    _, _, samples = smoke
    n_tasks = len(method.tasks)
    assert all(layer.n_experts == n_tasks for layer in method.layers.values())
    assert len(method.layers) == 7 * model.config.text_config.num_hidden_layers, "every LLM linear: q, k, v, o, gate, up, down"
    train(smoke, model, method, collator, "mcq", 1)
    before = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in method.layers.items()}
    facts = train(smoke, model, method, collator, "ocr", 2)
    assert facts["experts_trained"] == 2 and facts["anchor_samples"] == len(samples["ocr"])
    assert facts["deviations"] == [], "CLIP features and the code's fusion: no deviation by default"
    assert method.image_anchors.shape[1] == method.clip.image_width and method.text_anchors.shape[1] == method.clip.text_width
    for name, layer in method.layers.items():
        for trained, saved in ((layer.lora_A, before[name][0]), (layer.lora_B, before[name][1])):
            assert torch.equal(trained[0], saved[0]) and torch.equal(trained[2:], saved[2:]), f"{name}: only expert 1 trains in stage 2"
        assert not torch.equal(layer.lora_B[1], before[name][1][1])
    assert method.image_anchors[:2].norm(dim=-1).min() > 0 and method.image_anchors[2:].abs().sum() == 0

    for index, task in enumerate(("mcq", "ocr")):
        chunk = samples[task][:8]
        with method.batch_context(chunk, collator.train_batch(chunk)):
            weights = method.routing.facts["expert_weights"]
        assert weights.shape == (8, n_tasks) and torch.allclose(weights.sum(-1), torch.ones(8)) and (weights[:, 2:] == 0).all()
        assert (weights.argmax(-1) == index).all(), f"{task}: its own anchors are the nearest"
    facts = method.evaluation_facts(method.evaluation_records())
    assert facts["anchor_accuracy"] == 100.0 and facts["anchor_samples"] == 16

    restored = with_clip(build_method("hide", {}), smoke[0])
    restored.wrap_model(load_model(smoke[1])[0], smoke[0].task_names)
    restored.load_state_dict(method.state_dict())
    assert restored.schedule.trained == 2 and torch.equal(restored.image_anchors, method.image_anchors)
