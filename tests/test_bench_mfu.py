"""`cvit-bench bench` MFU: FLOPs of a train step (forward + backward), the measured matmul peak, and their ratio."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cvit_bench.benchmark import count_flops, matmul_peak_gflops, mfu_percent
from cvit_bench.cli import app
from cvit_bench.io import read_json

from conftest import SMOKE


def test_counted_flops_of_a_small_train_step_match_the_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = torch.randn(5, 8)

    def step() -> None:
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    # A (m x k) @ (k x n) product is 2mkn FLOPs. Forward: 5x8 @ 8x16 and 5x16 @ 16x4. Backward: the second
    # layer's weight gradient (4x5 @ 5x16) and its input gradient (5x4 @ 4x16), the first layer's weight
    # gradient (16x5 @ 5x8); the inputs need no gradient. Element-wise work (ReLU, loss, AdamW) is not counted.
    hand = 2 * (5 * 8 * 16 + 5 * 16 * 4) + 2 * (4 * 5 * 16 + 5 * 4 * 16 + 16 * 5 * 8)
    assert hand == 4480
    assert count_flops(step) == pytest.approx(hand, rel=0.01)


def test_mfu_is_step_flops_over_step_time_over_peak():
    # 2 GFLOP in 0.5 s is 4 GFLOP/s, a tenth of a 40 GFLOP/s peak
    assert mfu_percent(2e9, 0.5, 40.0) == pytest.approx(10.0)


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_gflops(size=256, repeats=2) > 0


def test_bench_reports_flops_and_mfu_per_training_method(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--suite", SMOKE, "--method", "zeroshot", "--steps", "2", "--warmup", "1",
                                      "--eval-samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = read_json(out)
    rows = {row["method"]: row for row in report["methods"]}
    assert report["matmul_peak_gflops"] > 0
    assert rows["seqlora"]["gflop_per_step"] > 0 and 0 < rows["seqlora"]["mfu_percent"] <= 100
    assert rows["zeroshot"]["gflop_per_step"] is None and rows["zeroshot"]["mfu_percent"] is None
    for text in ("GFLOP/step", "MFU %", "fp32 matmul peak:", f"{rows['seqlora']['mfu_percent']:.1f}"):
        assert text in result.output
