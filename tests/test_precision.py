"""Reduced precision and batching: every method in bf16/fp16, fp32 adapters, gradient accumulation, mixed precision."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.io import read_json
from cvit_bench.methods import METHODS
from cvit_bench.methods.mixture import MixtureLoraLinear
from cvit_bench.methods.moelora import DenseTokenRouter
from cvit_bench.models.backend import load_model
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.runner import RunOptions, build_method, run
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite
from cvit_bench.training.loop import Precision, train_stage

SMOKE = "cvit-v1-smoke"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_evaluates_in_reduced_precision(method, dtype, short_suite, tmp_path):
    path, model_dir = short_suite
    options = RunOptions(load_suite(str(path)), method, 0, tmp_path, model=str(model_dir), dtype=dtype, threads=1)
    result = read_json(run(options) / "results.json")
    vu = np.asarray(result["matrices"]["seen"]["vu"], dtype=float)
    assert not np.isnan(vu[-1]).any()
    assert all(np.isfinite(stage["final_loss"]) for stage in result["stages"])
    assert result["run_info"]["config"]["dtype"] == dtype


def test_mixture_experts_stay_fp32_under_a_bf16_base_and_return_its_dtype():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(torch.bfloat16)
    layer = MixtureLoraLinear(base, n_experts=4, rank=2, scaling=2.0, router=DenseTokenRouter(12, 4))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12).to(torch.bfloat16)
    out = layer(x)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router.weight.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    twin = MixtureLoraLinear(nn.Linear(12, 10), n_experts=4, rank=2, scaling=2.0, router=layer.router)
    with torch.no_grad():
        for ours, theirs in ((twin.base.weight, base.weight), (twin.base.bias, base.bias), (twin.lora_A, layer.lora_A), (twin.lora_B, layer.lora_B)):
            ours.copy_(theirs.float())
        assert torch.allclose(out.float(), twin(x.float()), atol=0.05), "the bf16 layer computes what an fp32 one does, to bf16 rounding"


# --- gradient accumulation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_samples():
    suite = load_suite(SMOKE)
    model_dir, _ = prepare_base(suite)
    data = materialize(suite, 0)
    samples = [s for task in suite.tasks[:2] for s in phrase_all(data.records(task.name, "train"), task.name, task.template.training_phrasings("single"))]
    return suite, model_dir, samples


def _losses(smoke_samples, method_name: str, batch_size: int, grad_accum: int, steps: int = 4, precision: str = "no"):
    suite, model_dir, samples = smoke_samples
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    method = build_method(method_name, {})
    model = method.wrap_model(model, suite.task_names)
    losses: list[float] = []
    config = dataclasses.replace(suite.training, batch_size=batch_size, warmup_steps=1)
    train_stage(model, method, samples, Collator(processor), config, steps=steps, seed="accumulation", log_every=1,
                report=lambda step, loss, rate: losses.append(loss), grad_accum=grad_accum, precision=Precision(precision))
    trained = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    return np.asarray(losses), trained


def test_four_forwards_of_four_match_one_forward_of_sixteen(smoke_samples):
    """The loss of every step and the trained weights after it: gradient accumulation splits the batch, not the step."""
    whole, whole_weights = _losses(smoke_samples, "seqlora", batch_size=16, grad_accum=1)
    split, split_weights = _losses(smoke_samples, "seqlora", batch_size=16, grad_accum=4)
    assert np.abs(whole - split).max() < 1e-5, (whole, split)
    assert torch.allclose(whole_weights, split_weights, atol=1e-5)


def test_accumulation_needs_a_sample_per_forward(smoke_samples):
    with pytest.raises(Exception, match="--grad-accum 4: a process's share of the batch holds only 2 samples"):
        _losses(smoke_samples, "seqlora", batch_size=2, grad_accum=4, steps=1)


def test_bf16_mixed_precision_trains_fp32_weights_close_to_fp32(smoke_samples):
    exact, exact_weights = _losses(smoke_samples, "seqlora", batch_size=8, grad_accum=1, steps=2)
    mixed, mixed_weights = _losses(smoke_samples, "seqlora", batch_size=8, grad_accum=1, steps=2, precision="bf16")
    assert mixed_weights.dtype == torch.float32
    assert not np.array_equal(exact, mixed), "autocast must change the arithmetic"
    assert np.abs(exact - mixed).max() < 0.05 * np.abs(exact).max()


def test_an_unknown_mixed_precision_is_refused():
    with pytest.raises(Exception, match="--mixed-precision 'fp8': expected one of no, bf16, fp16"):
        Precision("fp8")
