"""LLaCA's balance-weight bookkeeping and PEGP's basis statistics, each pinned on a hand-built case or on the smoke model."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.methods import pegp as pegp_module
from cvit_bench.methods.llaca import balance_weights, l1_norms
from cvit_bench.methods.projection import InputBasis
from cvit_bench.models.backend import load_model, projector_parameters
from cvit_bench.registry import ConfigError
from cvit_bench.runner import build_method
from cvit_bench.training.loop import make_optimizer, train_stage

from conftest import phrased


@pytest.fixture(scope="module")
def smoke(smoke_setup):
    suite, model_dir, data = smoke_setup
    return suite, model_dir, phrased(suite, data, "train", lambda task: task.template.training_phrasings("single"))


def fresh(smoke, method_name: str, dtype: torch.dtype = torch.float32, **options):
    suite, model_dir, _ = smoke
    torch.manual_seed(0)
    model, processor = load_model(model_dir, dtype=dtype)
    method = build_method(method_name, options)
    return method.wrap_model(model, suite.task_names), method, Collator(processor)


# --- LLaCA -----------------------------------------------------------------------------
def hand_built_llaca(**options):
    """A LLaCA whose two 'trainable tensors' (a LoRA A and a projector weight) are driven by hand through three steps."""
    method = build_method("llaca", options)
    method.params = [nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([3.0]))]
    method.kinds = ["lora_A", "projector"]
    method.before_stage(1, ("t",), nn.Module())
    steps = [  # (A's weights, A's gradient, projector weight, projector gradient) after each optimizer step
        ([1.0, -2.0], [0.5, 0.5], 3.0, 2.0),
        ([7.0, -2.0], [1.0, 0.0], 3.0, 2.0),
        ([5.0, 1.0], [1.0, 0.0], 23.0, 3.0),
    ]
    for a, a_grad, p, p_grad in steps:
        method.params[0].data, method.params[0].grad = torch.tensor(a), torch.tensor(a_grad)
        method.params[1].data, method.params[1].grad = torch.tensor([p]), torch.tensor([p_grad])
        method.after_optimizer_step(nn.Module())
    return method, method.after_stage(1, nn.Module(), [], None)


def test_llaca_fallback_share_and_start_weight_on_a_hand_built_run():
    method, facts = hand_built_llaca()
    # step 1: first update, both fall back (0.01); theta* = the step-1 weights.
    # step 2: A: |g| 1, |theta - theta*| 6, |g - g_prev| 1 -> beta 2*2/6 = 2/3; theta*_A = [1,-2] + 2/3 [6,0] = [5,-2].
    #         projector: no move, no gradient change -> 0/0 -> fallback.
    # step 3: A: gradient unchanged -> fallback; theta*_A = [5,-2] + 0.01 [0,3] = [5,-1.97].
    #         projector: |g| 3, distance 20, change 1 -> beta 2*4/20 = 0.4; theta*_P = 3 + 0.4 * 20 = 11.
    beta = facts["llaca_beta"]
    assert beta["steps"] == 3 and beta["steps_all_fallback"] == 1
    assert beta["fallback_rate"] == pytest.approx(4 / 6)
    assert beta["min"] == pytest.approx(0.01) and beta["max"] == pytest.approx(2 / 3)
    lora_a, projector = beta["kinds"]["lora_A"], beta["kinds"]["projector"]
    assert lora_a["median_start_weight"] == pytest.approx(0.99 * (1 / 3) * 0.99)
    assert projector["median_start_weight"] == pytest.approx(0.99 * 0.99 * 0.6)
    assert lora_a["fallback_rate"] == pytest.approx(2 / 3) and projector["fallback_rate"] == pytest.approx(2 / 3)
    assert (lora_a["median_grad_l1"], lora_a["median_distance_l1"], lora_a["median_grad_change_l1"]) == pytest.approx((1, 3, 0.5))
    assert (projector["median_grad_l1"], projector["median_distance_l1"], projector["median_grad_change_l1"]) == pytest.approx((2, 0, 0.5))
    torch.testing.assert_close(method.params[0].detach(), torch.tensor([5.0, -1.97]))
    torch.testing.assert_close(method.params[1].detach(), torch.tensor([11.0]))
    assert beta["scope"] == "tensor" and "deviations" not in facts


def test_global_beta_scope_sums_the_norms_over_tensors():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]
    ema = [torch.tensor([0.0, 0.0]), torch.tensor([-7.0])]
    grads = [torch.tensor([0.5, 0.5]), torch.tensor([2.0])]
    previous = [torch.tensor([0.0, -1.0]), torch.tensor([1.0])]
    norms = l1_norms(grads, previous, params, ema)
    torch.testing.assert_close(norms, torch.tensor([[1.0, 2.0], [3.0, 10.0], [2.0, 1.0]]))
    per_tensor, _ = balance_weights(norms, 0.01, "tensor")
    torch.testing.assert_close(per_tensor, torch.tensor([2 * 2 / (3 * 2), 2 * 3 / (10 * 1)]))
    one, fell_back = balance_weights(norms, 0.01, "global")  # 2 (1 + 3) / (13 * 3)
    torch.testing.assert_close(one, torch.full((2,), 8 / 39))
    assert not fell_back.any()
    # a small tensor's own beta leaves (0, 1) while the sums keep one in range for both
    small_and_large = torch.tensor([[1.0, 1.0], [1.0, 10.0], [1.0, 10.0]])
    per_tensor, fell_back = balance_weights(small_and_large, 0.01, "tensor")
    assert fell_back.tolist() == [True, False] and per_tensor.tolist() == pytest.approx([0.01, 0.04])
    one, fell_back = balance_weights(small_and_large, 0.01, "global")
    assert not fell_back.any() and one.tolist() == pytest.approx([6 / 121, 6 / 121])


def test_global_scope_is_recorded_as_a_deviation():
    _, facts = hand_built_llaca(beta_scope="global")
    assert facts["llaca_beta"]["scope"] == "global"
    assert len(facts["deviations"]) == 1 and "beta_scope=global" in facts["deviations"][0]
    with pytest.raises(ConfigError, match="beta_scope"):
        build_method("llaca", {"beta_scope": "layer"})


def test_llaca_trains_the_projector_at_a_tenth_of_the_lora_lr(smoke):
    suite, _, _ = smoke
    model, method, _ = fresh(smoke, "llaca")
    optimizer, _, trainable = make_optimizer(model, method, suite.training, steps=10)
    lora, projector = optimizer.param_groups
    assert lora["initial_lr"] == 1e-3 and projector["initial_lr"] == pytest.approx(1e-4)
    assert {id(p) for p in projector["params"]} == {id(p) for p in projector_parameters(model)}
    lora_names = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    assert {id(p) for p in lora["params"]} == lora_names
    assert len(trainable) == len([p for p in model.parameters() if p.requires_grad])


def test_llaca_on_bf16_weights_keeps_a_float32_average(smoke):
    suite, _, samples = smoke
    model, method, collator = fresh(smoke, "llaca", dtype=torch.bfloat16)
    assert any(p.dtype == torch.bfloat16 for p in method.params), "the projector keeps the base's dtype"
    method.before_stage(1, ("mcq",), model)
    train_stage(model, method, samples["mcq"], collator, dataclasses.replace(suite.training, warmup_steps=1), steps=3, seed="t")
    assert all(average.dtype == torch.float32 for average in method.ema)
    ema = [average.clone() for average in method.ema]
    facts = method.after_stage(1, model, samples["mcq"], collator)
    for parameter, average in zip(method.params, ema):
        assert torch.equal(parameter.detach(), average.to(parameter.dtype))
    assert set(facts["llaca_beta"]["kinds"]) == {"lora_A", "lora_B", "projector"}


# --- PEGP ------------------------------------------------------------------------------
def rotated(spectrum: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A covariance with the given eigenvalues in a random orthonormal frame, and that frame."""
    frame = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=torch.Generator().manual_seed(seed))).Q
    return frame @ torch.diag(torch.tensor(spectrum)) @ frame.T, frame


@pytest.mark.parametrize("energy, threshold, kept", [
    # spectrum 4, 2, 1.2, 0.8: shares of lambda 0.5, 0.75, 0.9, 1; of lambda^2 (16, 4, 1.44, 0.64)/22.08: 0.725, 0.906, 0.971, 1
    ("eigenvalue", 0.8, 2), ("eigenvalue", 0.95, 3), ("squared", 0.8, 1), ("squared", 0.95, 2),
])
def test_first_task_keeps_the_directions_strictly_below_the_threshold(energy, threshold, kept):
    covariance, frame = rotated([4.0, 2.0, 1.2, 0.8])
    basis = InputBasis(4)
    assert basis.extend(covariance, threshold, energy) == kept
    assert basis.basis.dtype == torch.float32
    leading = frame[:, :kept]
    torch.testing.assert_close(basis.basis @ basis.basis.T, leading @ leading.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("energy, kept", [
    # spectrum 2, 2, 1, 1 with the first direction already kept, threshold 0.85:
    # lambda: captured 1/3, then 2/3, 5/6, 1 -> below 2, plus the one that reaches -> 3
    # lambda^2 (4, 4, 1, 1)/10: captured 0.4, then 0.8, 0.9, 1 -> below 1, plus the one that reaches -> 2
    ("eigenvalue", 3), ("squared", 2),
])
def test_later_tasks_add_directions_until_the_threshold_is_reached(energy, kept):
    covariance, frame = rotated([2.0, 2.0, 1.0, 1.0], seed=1)
    basis = InputBasis(4)
    basis.basis, basis.tasks = frame[:, :1].contiguous(), 1
    assert basis.extend(covariance, 0.85, energy) == kept
    assert basis.size == 1 + kept


def test_first_task_dominated_by_one_direction_keeps_none():
    """The authors' strict count: a direction that alone carries the threshold's share is not kept on a first task."""
    covariance, _ = rotated([1.0, 0.001, 0.0])
    assert InputBasis(3).extend(covariance, 0.99, "squared") == 0
    assert InputBasis(3).extend(covariance, 0.99, "eigenvalue") == 0


def sample_pair(smoke):
    """Two samples whose token counts differ, so batching them pads the shorter one."""
    _, _, samples = smoke
    return samples["mcq"][0], samples["caption"][0]


def test_padding_rows_do_not_change_the_covariance(smoke):
    model, method, collator = fresh(smoke, "pegp")
    short, long = sample_pair(smoke)
    mask = collator.train_batch([short, long])["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1], "the batch holds padding"
    names = list(method.layers)
    together = method.covariances(model, names, [short, long], collator)
    alone = [method.covariances(model, names, [sample], collator) for sample in (short, long)]
    assert together.keys() == alone[0].keys() and len(together) == 2 * len(names)
    for key, covariance in together.items():
        torch.testing.assert_close(covariance, alone[0][key] + alone[1][key], rtol=1e-4, atol=1e-3)


def test_pegp_statistics_are_float32_on_a_bf16_model(smoke):
    _, _, samples = smoke
    model, method, collator = fresh(smoke, "pegp", dtype=torch.bfloat16)
    sums = method.covariances(model, list(method.layers), samples["mcq"][:4], collator)
    assert all(covariance.dtype == torch.float32 for covariance in sums.values())
    facts = method.after_stage(1, model, samples["mcq"], collator)
    assert all(basis.basis.dtype == torch.float32 for layer in method.layers.values() for basis in (layer.x_basis, layer.h_basis))
    assert facts["basis_fill"]["x_mean"] > 0


def test_bases_grown_layer_group_by_group_equal_one_pass(smoke, monkeypatch):
    _, _, samples = smoke
    bases = []
    for budget in (pegp_module.COVARIANCE_BUDGET_BYTES, 1):  # all layers in one pass; one layer per pass
        monkeypatch.setattr(pegp_module, "COVARIANCE_BUDGET_BYTES", budget)
        model, method, collator = fresh(smoke, "pegp")
        assert len(pegp_module.layer_groups(method.layers, budget)) == (1 if budget > 1 else len(method.layers))
        method.after_stage(1, model, samples["mcq"][:4], collator)
        bases.append(method.state_dict())
    assert bases[0].keys() == bases[1].keys()
    for key in bases[0]:
        torch.testing.assert_close(bases[0][key], bases[1][key])


def test_b_side_threshold_and_energy_rule_are_recorded(smoke):
    _, _, samples = smoke
    fills = {}
    for options in ({}, {"h_threshold": 0.5}, {"energy": "eigenvalue"}):
        model, method, collator = fresh(smoke, "pegp", **options)
        facts = method.after_stage(1, model, samples["mcq"], collator)
        fills[tuple(options)] = facts["basis_fill"]
        assert ("deviations" in facts) == bool(options)
    default, separate, eigenvalue = fills[()], fills[("h_threshold",)], fills[("energy",)]
    assert default["energy"] == "squared" and eigenvalue["energy"] == "eigenvalue"
    assert separate["x_mean"] == default["x_mean"] and separate["h_mean"] < default["h_mean"]
    assert eigenvalue["x_mean"] > default["x_mean"], "lambda spreads energy over more directions than lambda^2"
    with pytest.raises(ConfigError, match="energy"):
        build_method("pegp", {"energy": "singular"})
