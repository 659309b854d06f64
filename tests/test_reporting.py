import io
import math
import re
import multiprocessing

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console

from cvit_bench.io import atomic_write_json
from cvit_bench.reporting.heatmaps import plot_matrix, plot_run_heatmaps
from cvit_bench.reporting.leaderboard import (
    COLUMNS,
    build_leaderboard,
    find_results,
    rebuild_leaderboards,
    write_leaderboard,
)
from cvit_bench.reporting.tables import leaderboard_table, matrix_table, run_summary_table

SUITE = "cvit-v1-smoke"
TASKS = ["mcq", "ocr"]


def make_result(method, seed, metrics, *, suite=SUITE, total_s=100.0, status="complete", **run_info):
    return {
        "schema_version": 1,
        "run_info": {
            "suite": suite, "method": method, "method_config": {"rank": 8}, "seed": seed,
            "task_order": TASKS, "unseen_tasks": ["scene"], "heldout_tasks": TASKS,
            "model": "tiny-llava", "base_checkpoint_hash": "b1", "data_hash": f"d{seed}",
            "data_recipe_hash": "r1", "config_hash": "c1", "config": {"steps_per_task": 100},
            "finished": "2026-01-01T00:00:00", "status": status, **run_info,
        },
        "matrices": {
            "seen": {
                "vu": [[10.0, None], [90.0, None], [40.0, 85.0]],
                "if": [[50.0, 20.0], [95.0, 10.0], [30.0, 99.0]],
            },
            "unseen": {"vu": [[5.0], [7.5], [6.0]]},
        },
        "metrics": {"AP": None, "MFT": None, "BWT": None, "FWT": None, "IF-AP": None, **metrics},
        "timings": {"total_s": total_s, "stages": []},
    }


def three_runs():
    """Two seeds of seqlora and one of replay; means and sample stds worked out by hand in the tests."""
    return [
        make_result("seqlora", 1, {"AP": 64.0, "BWT": -10.0, "IF-AP": 81.0}, total_s=110.0),
        make_result("replay", 0, {"AP": 70.0, "BWT": -5.0, "IF-AP": 90.0, "MFT": 75.0}, total_s=130.0),
        make_result("seqlora", 0, {"AP": 60.0, "BWT": -20.0, "IF-AP": 80.0, "MFT": 50.0}, total_s=100.0),
    ]


def write_runs(results_dir, results):
    for index, result in enumerate(results):
        info = result["run_info"]
        atomic_write_json(results_dir / info["suite"] / info["method"] / f"run{index}" / "results.json", result)


def test_leaderboard_means_and_sample_stds_match_hand_computation():
    board = build_leaderboard(three_runs())
    assert list(board.columns) == COLUMNS
    assert list(board["method"]) == ["replay", "seqlora"]
    replay, seqlora = board.iloc[0], board.iloc[1]
    # seqlora AP: mean(60, 64) = 62; sample std = sqrt((2² + 2²) / 1) = 2.828…
    assert seqlora["AP_mean"] == 62.0 and seqlora["AP_std"] == 2.83
    # BWT: mean(-20, -10) = -15; std = sqrt(5² + 5²) = 7.071…; IF-AP std = sqrt(0.5² + 0.5²) = 0.707…
    assert seqlora["BWT_mean"] == -15.0 and seqlora["BWT_std"] == 7.07
    assert seqlora["IF-AP_mean"] == 80.5 and seqlora["IF-AP_std"] == 0.71
    assert seqlora["n_seeds"] == 2 and seqlora["seeds"] == "0;1" and seqlora["wall_time_s_mean"] == 105.0
    assert replay["AP_mean"] == 70.0 and math.isnan(replay["AP_std"])
    assert replay["n_seeds"] == 1 and replay["seeds"] == "0"


def test_metric_missing_in_any_seed_has_no_mean():
    board = build_leaderboard(three_runs()).set_index("method")
    assert math.isnan(board.loc["seqlora", "MFT_mean"])  # 50.0 in seed 0, null in seed 1
    assert board.loc["replay", "MFT_mean"] == 75.0
    assert math.isnan(board.loc["replay", "FWT_mean"])


def test_equal_ap_is_ordered_by_method_name():
    runs = [make_result(name, 0, {"AP": 50.0}) for name in ("zeta", "alpha", "mid")]
    runs.append(make_result("unscored", 0, {}))
    assert list(build_leaderboard(runs)["method"]) == ["alpha", "mid", "zeta", "unscored"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("data_recipe_hash", "r2"), ("base_checkpoint_hash", "b2"), ("method_config", {"rank": 16})],
)
def test_refuses_to_average_runs_with_different_setups(field, value):
    runs = three_runs()
    runs[0]["run_info"][field] = value
    with pytest.raises(ValueError, match=f"seqlora runs with different {field}"):
        build_leaderboard(runs)


def test_refusal_of_a_different_config_names_the_differing_key():
    runs = three_runs()
    runs[0]["run_info"].update(config_hash="c2", config={"steps_per_task": 50})
    with pytest.raises(ValueError, match=r"different config_hash \(steps_per_task\)"):
        build_leaderboard(runs)


def test_seeds_with_different_generated_data_share_one_row():
    """Generated data is seed-specific (data_hash differs); the recipe is what must match."""
    runs = three_runs()
    assert runs[0]["run_info"]["data_hash"] != runs[2]["run_info"]["data_hash"]
    assert build_leaderboard(runs).set_index("method").loc["seqlora", "n_seeds"] == 2


def test_duplicate_seed_error_names_both_result_files(tmp_path):
    runs = three_runs()
    runs.append(make_result("seqlora", 1, {"AP": 1.0}))
    write_runs(tmp_path, runs)
    with pytest.raises(ValueError, match=r"seqlora with seed 1: .*run0.*results\.json and .*run3.*results\.json"):
        build_leaderboard(find_results(tmp_path))


def test_refuses_to_mix_suites():
    runs = three_runs()
    runs[1]["run_info"]["suite"] = "cvit-v1"
    with pytest.raises(ValueError, match="one suite"):
        build_leaderboard(runs)


def test_find_results_skips_unfinished_runs_and_filters_by_suite(tmp_path):
    write_runs(tmp_path, [
        *three_runs(),
        make_result("ewc", 0, {"AP": 1.0}, status="running"),
        make_result("ewc", 0, {"AP": 1.0}, suite="cvit-v1"),
    ])
    found = find_results(tmp_path, suite=SUITE)
    # sorted by path: replay/run1, seqlora/run0, seqlora/run2
    assert [(r["run_info"]["method"], r["run_info"]["seed"]) for r in found] == [
        ("replay", 0), ("seqlora", 1), ("seqlora", 0)
    ]
    assert len(find_results(tmp_path)) == 4


def test_csv_format_and_byte_determinism(tmp_path):
    write_runs(tmp_path / "results", three_runs())
    out_dir = tmp_path / "leaderboards"
    out_dir.mkdir()
    (out_dir / f"{SUITE}.csv").write_text("stale,row\n")
    first = rebuild_leaderboards(tmp_path / "results", out_dir)[SUITE].read_bytes()
    second = rebuild_leaderboards(tmp_path / "results", out_dir)[SUITE].read_bytes()
    assert first == second
    lines = first.decode().split("\n")
    assert lines[0] == ",".join(COLUMNS) and lines[-1] == "" and len(lines) == 4
    assert lines[1].startswith("replay,70.00,,") and lines[1].endswith(",1,0,130.00")
    assert lines[2].startswith("seqlora,62.00,2.83,") and lines[2].endswith(",2,0;1,105.00")


def test_rebuild_writes_one_csv_per_suite(tmp_path):
    write_runs(tmp_path / "results", [*three_runs(), make_result("ewc", 0, {"AP": 1.0}, suite="cvit-v1")])
    written = rebuild_leaderboards(tmp_path / "results", tmp_path / "boards")
    assert written == {"cvit-v1": tmp_path / "boards" / "cvit-v1.csv", SUITE: tmp_path / "boards" / f"{SUITE}.csv"}


def _rebuild_repeatedly(results_dir, out_dir, times):
    for _ in range(times):
        rebuild_leaderboards(results_dir, out_dir)


def test_concurrent_rebuilds_match_a_serial_rebuild_and_are_never_seen_half_written(tmp_path):
    results_dir = tmp_path / "results"
    write_runs(results_dir, three_runs())
    expected = rebuild_leaderboards(results_dir, tmp_path / "serial")[SUITE].read_bytes()
    target = tmp_path / "shared" / f"{SUITE}.csv"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_rebuild_repeatedly, args=(results_dir, tmp_path / "shared", 25)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        if target.exists():
            assert target.read_bytes() == expected
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert target.read_bytes() == expected


def test_write_leaderboard_of_no_runs_is_a_header(tmp_path):
    write_leaderboard(build_leaderboard([]), tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == ",".join(COLUMNS) + "\n"


def _pixels_of(png_path, rgb):
    image = matplotlib.image.imread(png_path)[..., :3]
    return int(np.all(np.abs(image - np.array(rgb) / 255) < 0.5 / 255, axis=-1).sum())


def test_heatmap_shows_unevaluated_cells_in_grey_and_is_deterministic(tmp_path):
    with_nan = [[10.0, None], [90.0, float("nan")], [40.0, 85.0]]
    path = plot_matrix(with_nan, ["stage 0", "stage 1", "stage 2"], TASKS, "VU", tmp_path / "a" / "vu.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"matplotlib" not in data
    lightgrey = (211, 211, 211)
    full = plot_matrix([[10.0, 1.0], [90.0, 2.0], [40.0, 85.0]], ["0", "1", "2"], TASKS, "VU", tmp_path / "full.png")
    assert _pixels_of(path, lightgrey) > 1000 > _pixels_of(full, lightgrey)
    again = plot_matrix(with_nan, ["stage 0", "stage 1", "stage 2"], TASKS, "VU", tmp_path / "again.png")
    assert again.read_bytes() == data


def test_run_heatmaps_cover_seen_vu_if_and_unseen_vu(tmp_path):
    result = three_runs()[0]
    paths = plot_run_heatmaps(result, tmp_path)
    assert [p.name for p in paths] == ["seen_vu.png", "seen_if.png", "unseen_vu.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    del result["matrices"]["unseen"]
    assert [p.name for p in plot_run_heatmaps(result, tmp_path / "no_unseen")] == ["seen_vu.png", "seen_if.png"]


def render(table):
    console = Console(file=io.StringIO(), width=250, record=True)
    console.print(table)
    return console.export_text()


def test_leaderboard_table_shows_mean_plus_minus_std():
    text = render(leaderboard_table(build_leaderboard(three_runs())))
    seqlora_line = next(line for line in text.splitlines() if "seqlora" in line)
    assert "62.00 ± 2.83" in seqlora_line and "-15.00 ± 7.07" in seqlora_line
    replay_line = next(line for line in text.splitlines() if "replay" in line)
    assert "70.00" in replay_line and "±" not in replay_line


def test_nap_and_the_mif_floor_join_the_leaderboard_only_when_every_run_reports_them():
    later = {"nAP": 40.0, "MIF": 50.0, "MIF_floor": 33.33}
    runs = [make_result("seqlora", 0, {"AP": 60.0, **later}), make_result("seqlora", 1, {"AP": 64.0, **later, "nAP": 44.0})]
    board = build_leaderboard(runs)
    columns = list(board.columns)
    assert columns[columns.index("AP_std") + 1] == "nAP_mean" and columns[columns.index("MIF_std") + 1] == "MIF_floor_mean"
    assert board.loc[0, "nAP_mean"] == 42.0 and board.loc[0, "MIF_floor_mean"] == 33.33
    text = render(leaderboard_table(board))
    assert "nAP" in text and "MIF_floor" in text and "42.00 ± 2.83" in text
    assert list(build_leaderboard(three_runs()).columns) == COLUMNS  # cvit-v1's runs: its published columns
    mixed = build_leaderboard([runs[0], make_result("seqlora", 1, {"AP": 64.0})])
    assert "nAP_mean" not in mixed.columns


def test_matrix_table_marks_unevaluated_cells():
    text = render(matrix_table([[10.0, None], [12.345, 85.0]], ["stage 0", "stage 1"], TASKS, "VU"))
    assert "12.3" in text and "–" in text
    assert "None" not in text and "nan" not in text


def test_run_summary_table_lists_every_metric():
    table = run_summary_table(three_runs()[1])
    assert table.title == "replay on cvit-v1-smoke, seed 0"
    text = render(table)
    for metric, shown in [("AP", "70.00"), ("MFT", "75.00"), ("FWT", "–")]:
        assert re.search(rf"│ {metric} +│ +{shown} │", text), metric
