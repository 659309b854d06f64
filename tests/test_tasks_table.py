"""The per-task leaderboard table: diagonals, finals, nAP-scale finals and each task's share of nAP."""
import math

import pytest

from cvit_bench.reporting.tasks import tasks_table


def _run(final: list[float], diagonal: list[float]) -> dict:
    tasks = [{"name": "a", "chance": 20.0}, {"name": "b", "chance": 50.0, "ceiling": 250.0}, {"name": "c"}]
    vu = [[0.0, 0.0, 0.0], [diagonal[0], 0.0, 0.0], [0.0, diagonal[1], 0.0], final]
    vu[3][2] = diagonal[2]
    return {"run_info": {"task_order": ["a", "b", "c"], "config": {"suite": {"tasks": tasks}}},
            "matrices": {"seen": {"vu": vu}}, "n_items": {"seen": {"a": 200, "b": 200, "c": 200}}}


def test_tasks_table_golden_values():
    runs = [_run([60.0, 100.0, 30.0], [80.0, 150.0, 30.0]), _run([40.0, 200.0, 50.0], [90.0, 250.0, 50.0])]
    rows = tasks_table({"m": runs}).set_index("task")
    assert rows.loc["a", "diag_mean"] == pytest.approx(85.0)
    assert rows.loc["a", "diag_std"] == pytest.approx(math.sqrt(50.0))
    assert rows.loc["b", "final_mean"] == pytest.approx(150.0)
    # a: (50 - 20) / (100 - 20) = 37.5; b: (150 - 50) / (250 - 50) = 50; c declares no chance
    assert rows.loc["a", "final_norm_mean"] == pytest.approx(37.5)
    assert rows.loc["b", "final_norm_mean"] == pytest.approx(50.0)
    assert math.isnan(rows.loc["c", "final_norm_mean"]) and math.isnan(rows.loc["c", "nAP_share"])
    assert rows.loc["a", "nAP_share"] == pytest.approx(37.5 / 87.5)  # nAP averages the tasks with a chance


def test_nap_share_sums_to_one_where_every_task_has_a_chance():
    run = _run([60.0, 100.0, 30.0], [80.0, 150.0, 30.0])
    for task in run["run_info"]["config"]["suite"]["tasks"]:
        task.setdefault("chance", 10.0)
    rows = tasks_table({"m": [run]}).set_index("task")
    assert rows["nAP_share"].sum() == pytest.approx(1.0)
    # a: 50, b: 25, c: 22.2 on the 0..100 scale -> a carries 50 / 97.2 of nAP
    assert rows.loc["a", "nAP_share"] == pytest.approx(50.0 / (50.0 + 25.0 + 200.0 / 9))
