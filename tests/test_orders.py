"""Task orders (`orders:`, `--order`) and rank agreement of methods across seeds and orders (`cvit-bench report`)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import cvit_bench.runner as runner_module
from cvit_bench.cli import app
from cvit_bench.io import atomic_write_json, read_json
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.models.clip_towers import prepare_clip
from cvit_bench.paths import config_hash
from cvit_bench.registry import ConfigError
from cvit_bench.reporting.leaderboard import rebuild_leaderboards
from cvit_bench.reporting.rank_agreement import COLUMNS, kendall_tau_b, rank_agreement, rebuild_rank_agreement
from cvit_bench.regression import bands_path
from cvit_bench.runner import RunOptions, _setup_only, build_method, resolved_config, run
from cvit_bench.suites.materialize import SuiteData
from cvit_bench.suites.orders import TaskOrder, in_order, order_label, resolve_order
from cvit_bench.suites.schema import SUITES_DIR, SuiteError, load_suite
from cvit_bench.sweep import plan_sweep

from conftest import SMOKE

LEADERBOARD_RUNS = Path(__file__).resolve().parents[1] / "leaderboards" / "runs"
LISTED = ["mcq", "ocr", "caption", "classify", "relation", "vqa"]
REVERSED = LISTED[::-1]
REVERSED_NAME = "059cc431"  # config_hash(REVERSED, 8): the name a comma list of the reversed smoke tasks gets
cli = CliRunner()


def write_suite(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((SUITES_DIR / f"{SMOKE}.yaml").read_text())
    data.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- the `orders:` key -------------------------------------------------------------------
def test_declared_orders_load_as_permutations_of_the_tasks(tmp_path):
    suite = load_suite(str(write_suite(tmp_path, orders={"reverse": REVERSED, "default": LISTED})))
    assert suite.orders == {"reverse": tuple(REVERSED), "default": tuple(LISTED)}
    assert suite.task_names == LISTED  # declaring orders does not reorder the suite


def test_bad_orders_are_each_reported_with_file_and_field(tmp_path):
    path = write_suite(tmp_path, orders={
        "Reverse": REVERSED, "short": ["mcq", "ocr"], "odd": ["mcq", "mcq", "ocr", "caption", "classify", "relation", "scene"],
        "default": REVERSED, "text": "mcq,ocr",
    })
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    problems = error.value.problems
    assert all(str(path) in problem for problem in problems) and len(problems) == 5
    text = "\n".join(problems)
    assert "orders.Reverse: an order name may use only a-z, 0-9, '_' and '-'" in text
    assert "orders.short: must list every training task exactly once (missing: caption, classify, relation, vqa)" in text
    assert "orders.odd: must list every training task exactly once (missing: vqa; unknown: scene; repeated: mcq)" in text
    assert "orders.default: 'default' names the tasks' listed order" in text
    assert "orders.text: expected a list of task names" in text


def test_orders_must_be_a_mapping(tmp_path):
    with pytest.raises(SuiteError, match=r"suite.yaml: orders: expected a mapping of order names"):
        load_suite(str(write_suite(tmp_path, orders=[REVERSED])))


# --- resolving --order -------------------------------------------------------------------
def test_a_comma_list_is_named_by_a_stable_hash_unless_the_suite_names_it(tmp_path):
    smoke = load_suite(SMOKE)
    order = resolve_order(smoke, ",".join(REVERSED))
    assert order == TaskOrder(REVERSED_NAME, tuple(REVERSED), declared=False) and REVERSED_NAME == config_hash(REVERSED, 8)
    assert order.spec == ",".join(REVERSED) and order_label(order.spec) == REVERSED_NAME
    declaring = load_suite(str(write_suite(tmp_path, orders={"reverse": REVERSED})))
    for spec in ("reverse", " , ".join(REVERSED)):
        assert resolve_order(declaring, spec) == TaskOrder("reverse", tuple(REVERSED), declared=True)
    assert order_label("reverse") == "reverse" and order_label(None) == "default"


@pytest.mark.parametrize("spec", [None, "default", ",".join(LISTED)])
def test_the_listed_order_however_asked_for_is_the_default(spec):
    assert resolve_order(load_suite(SMOKE), spec) is None


@pytest.mark.parametrize("spec, message", [
    ("reverse", "cvit-v1-smoke.yaml declares no orders; give a comma-separated permutation of its tasks (mcq,ocr,caption,"),
    ("mcq,ocr", "must list each task of"),
    ("vqa,vqa,relation,classify,caption,ocr,scene", "(missing: mcq; unknown: scene; repeated: vqa)"),
])
def test_a_bad_order_is_refused_naming_the_suite(spec, message):
    with pytest.raises(ConfigError) as error:
        resolve_order(load_suite(SMOKE), spec)
    assert message in str(error.value) and "cvit-v1-smoke.yaml" in str(error.value)


def test_an_unknown_order_name_suggests_the_declared_one(tmp_path):
    with pytest.raises(ConfigError, match=r"orders: unknown order 'revers'; did you mean 'reverse'\?"):
        resolve_order(load_suite(str(write_suite(tmp_path, orders={"reverse": REVERSED}))), "revers")


def test_reordering_is_idempotent_and_keeps_every_task_spec():
    smoke = load_suite(SMOKE)
    order = resolve_order(smoke, ",".join(REVERSED))
    once = in_order(smoke, order)
    assert once.task_names == REVERSED and in_order(once, order) == once
    assert sorted(once.tasks, key=lambda t: t.name) == sorted(smoke.tasks, key=lambda t: t.name) and once.unseen == smoke.unseen


# --- what an order changes in a run's identity ---------------------------------------------
def _config(options: RunOptions) -> dict:
    data = SuiteData(Path("."), data_hash="d", recipe_hash="r")
    return resolved_config(options, build_method(options.method, {}), data, "b", options.suite.training.steps_per_task)


def test_the_default_order_leaves_committed_cvit_v1_runs_unchanged():
    committed = read_json(LEADERBOARD_RUNS / "cvit-v1" / "seqlora" / "seed0" / "results.json")["run_info"]
    suite = load_suite("cvit-v1")
    with_orders = dataclasses.replace(suite, orders={"reverse": tuple(reversed(suite.task_names))})
    for loaded in (suite, with_orders):  # declaring orders is not part of the setup either
        options = RunOptions(loaded, "seqlora", 0, Path("results"), threads=1)
        assert _config(options)["suite"] == committed["config"]["suite"]
        assert options.request() == committed["request"] and options.run_dir == Path("results/cvit-v1/seqlora/seed0")
        assert _setup_only(dataclasses.asdict(loaded)) == _setup_only(dataclasses.asdict(suite))


# Methods re-implemented since cvit-v1 was published (issue 19: LLaCA's projector lr and beta statistics, PEGP's
# energy rule and first-task count; BranchLoRA on every LLM linear, MoELoRA at seqlora's rank budget, SMoLoRA routed per
# task): their committed cvit-v1 rows are the old code's, and a re-run is a new setup.
REIMPLEMENTED = {"llaca", "pegp", "branchlora", "moelora", "smolora"}


@pytest.mark.parametrize("path", sorted(p for p in LEADERBOARD_RUNS.glob("*/*/seed0/results.json")
                                         if not (p.parts[-4].startswith("cvit-v1") and p.parts[-3] in REIMPLEMENTED)),
                         ids=lambda p: f"{p.parts[-4]}/{p.parts[-3]}")
def test_committed_runs_keep_their_config_hash_and_request(path):
    """Options added since (projector_lr, epochs_per_task, max_new_tokens, batch and precision flags) stay out of the setup at their defaults."""
    info = read_json(path)["run_info"]
    request = info["request"]
    options = RunOptions(load_suite(request["suite"]), request["method"], request["seed"], Path("results"), threads=request.get("threads"),
                         method_overrides=request["method_overrides"], steps_per_task=request["steps_per_task"],
                         **{key: request[key] for key in runner_module.BACKEND_OPTIONS if key in request})
    method = build_method(options.method, options.method_overrides, options.suite.method_defaults.get(options.method))
    data = SuiteData(Path("."), data_hash="d", recipe_hash=info["data_recipe_hash"])
    clip = prepare_clip(options.suite, *prepare_base(options.suite)) if method.needs_clip() else None  # the shipped CLIP
    config = resolved_config(options, method, data, info["base_checkpoint_hash"], info["config"]["steps_per_task"], clip)
    assert config_hash(config) == info["config_hash"] and options.request() == request


def test_a_non_default_order_is_part_of_the_setup_and_has_its_own_run_directory():
    smoke = load_suite(SMOKE)
    listed = RunOptions(smoke, "seqlora", 1, Path("r"))
    ordered = RunOptions(smoke, "seqlora", 1, Path("r"), order=resolve_order(smoke, ",".join(REVERSED)))
    assert ordered.suite.task_names == REVERSED and listed.suite.task_names == LISTED
    assert ordered.run_dir == Path(f"r/{SMOKE}/seqlora/seed1-order-{REVERSED_NAME}") and listed.run_dir == Path(f"r/{SMOKE}/seqlora/seed1")
    assert ordered.request()["order"] == ",".join(REVERSED) and "order" not in listed.request()
    assert config_hash(_config(ordered)) != config_hash(_config(listed))
    assert [t["name"] for t in _config(ordered)["suite"]["tasks"]] == REVERSED
    assert dataclasses.replace(ordered, threads=2).suite.task_names == REVERSED  # re-created options are not reordered twice


def test_sweep_children_get_the_order_and_its_run_directories():
    order = resolve_order(load_suite(SMOKE), ",".join(REVERSED))
    runs = plan_sweep(SMOKE, SMOKE, ["seqlora", "ewc"], [0, 1], Path("r"), 1, ["--dtype", "float32"], order)
    assert [run.run_dir.name for run in runs] == [f"seed{s}-order-{REVERSED_NAME}" for s in (0, 0, 1, 1)]
    assert all(run.command[run.command.index("--order") + 1] == ",".join(REVERSED) for run in runs)
    assert [run.run_dir.name for run in plan_sweep(SMOKE, SMOKE, ["seqlora"], [2], Path("r"), 1, [])] == ["seed2"]
    assert "--order" not in plan_sweep(SMOKE, SMOKE, ["seqlora"], [2], Path("r"), 1, [])[0].command


def test_check_keeps_an_orders_bands_apart():
    order = resolve_order(load_suite(SMOKE), ",".join(REVERSED))
    assert bands_path("cvit-v1-check").name == "cvit-v1-check.yaml"
    assert bands_path("cvit-v1-check", order).name == f"cvit-v1-check-order-{REVERSED_NAME}.yaml"


@pytest.mark.parametrize("command", [["run", "--method", "seqlora"], ["run", "--method", "seqlora,ewc", "--seeds", "0,1"], ["check"]])
def test_run_sweep_and_check_refuse_a_bad_order_before_running(tmp_path, command):
    result = cli.invoke(app, [*command, "--suite", SMOKE, "--order", "mcq,ocr", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "must list each task of" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())


# --- training in an order ----------------------------------------------------------------
@pytest.fixture
def mcq_is_answered(monkeypatch):
    """Generation that answers every mcq sample correctly and nothing else, so the mcq column is the only one that scores."""
    def generate(model, collator, samples, **kwargs):
        return [s.target if s.task == "mcq" else "" for s in samples], len(samples)

    monkeypatch.setattr(runner_module, "generate", generate)


def test_tasks_train_in_the_order_and_every_column_follows_its_task(tmp_path, mcq_is_answered):
    smoke = load_suite(SMOKE)
    listed = read_json(run(RunOptions(smoke, "seqlora", 0, tmp_path, steps_per_task=1)) / "results.json")
    result = read_json(run(RunOptions(smoke, "seqlora", 0, tmp_path, steps_per_task=1, order=resolve_order(smoke, ",".join(REVERSED))))
                       / "results.json")
    info = result["run_info"]
    assert info["task_order"] == REVERSED and info["heldout_tasks"] == REVERSED and info["request"]["order"] == ",".join(REVERSED)
    assert [stage["tasks"] for stage in result["stages"]] == [[task] for task in REVERSED]
    assert info["unseen_tasks"] == listed["run_info"]["unseen_tasks"] and info["data_hash"] == listed["run_info"]["data_hash"]
    assert info["config_hash"] != listed["run_info"]["config_hash"]
    for run_result, mcq_column in ((listed, 0), (result, 5)):
        for group in ("seen", "heldout"):
            vu = np.array(run_result["matrices"][group]["vu"])
            assert (vu[:, mcq_column] > 0).all() and (np.delete(vu, mcq_column, axis=1) == 0).all(), group
    assert result["metrics"]["AP"] == pytest.approx(100 / 6) == listed["metrics"]["AP"]


class Crash(Exception):
    pass


class CrashInStage(runner_module.Reporter):
    def __init__(self, stage: int) -> None:
        self.crash_stage = stage

    def stage(self, stage: int, tasks: tuple[str, ...], steps: int) -> None:
        if stage == self.crash_stage:
            raise Crash(f"crash in stage {stage}")


def test_resume_continues_in_the_recorded_order(tmp_path, mcq_is_answered):
    smoke = load_suite(SMOKE)
    options = RunOptions(smoke, "seqlora", 0, tmp_path, steps_per_task=1, order=resolve_order(smoke, ",".join(REVERSED)))
    with pytest.raises(Crash):
        run(options, CrashInStage(3))
    resumed = RunOptions.from_run_dir(options.run_dir)
    assert resumed.order == options.order and resumed.suite.task_names == REVERSED
    result = cli.invoke(app, ["run", "--resume", str(options.run_dir)])
    assert result.exit_code == 0, result.output
    info = read_json(options.run_dir / "results.json")["run_info"]
    assert info["task_order"] == REVERSED and info["resumed_after_stages"] == [2]
    again = cli.invoke(app, ["run", "--resume", str(options.run_dir)])  # the recorded request rebuilds the same configuration
    assert again.exit_code == 0 and "already complete" in again.output


def test_a_sweep_passes_the_order_to_its_runs_and_report_keeps_them_apart(tmp_path):
    results = tmp_path / "results"
    sweep = cli.invoke(app, ["run", "--suite", SMOKE, "--method", "zeroshot", "--seeds", "0,1", "--jobs", "2", "--threads", "1",
                             "--order", ",".join(REVERSED), "--results-dir", str(results)])
    assert sweep.exit_code == 0, sweep.output
    for seed in (0, 1):
        run_dir = results / SMOKE / "zeroshot" / f"seed{seed}-order-{REVERSED_NAME}"
        assert read_json(run_dir / "results.json")["run_info"]["task_order"] == REVERSED and (run_dir / "run.log").is_file()
    report = cli.invoke(app, ["report", "--results-dir", str(results), "--out-dir", str(tmp_path / "boards"), "--no-heatmaps"])
    assert report.exit_code == 0, report.output
    assert sorted(p.name for p in (tmp_path / "boards").glob("*.csv")) == [f"{SMOKE}-order-{REVERSED_NAME}.csv"]


# --- Kendall tau-b (golden values worked out by hand) ---------------------------------------
@pytest.mark.parametrize("x, y, tau", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    # pairs of positions (1,2) C (1,3) D (1,4) D (1,5) C (2,3) D (2,4) D (2,5) C (3,4) C (3,5) C (4,5) C: (6 - 4) / 10
    ([1, 2, 3, 4, 5], [3, 4, 1, 2, 5], 0.2),
    # (1,2) C (1,3) C (1,4) C (2,3) tied in x (2,4) D (3,4) tied in y: (3 - 1) / sqrt(5 * 5)
    ([1, 2, 2, 3], [1, 3, 2, 2], 0.4),
    # three pairs tied in x, none in y; the three untied pairs all concordant: 3 / sqrt(3 * 6)
    ([1, 1, 1, 2], [1, 2, 3, 4], 1 / math.sqrt(2)),
])
def test_kendall_tau_b_golden_values(x, y, tau):
    assert kendall_tau_b(x, y) == pytest.approx(tau)
    assert kendall_tau_b(y, x) == pytest.approx(tau)


def test_kendall_tau_b_without_a_ranking_is_nan_and_refuses_bad_input():
    assert math.isnan(kendall_tau_b([5, 5, 5], [1, 2, 3]))
    assert math.isnan(kendall_tau_b([1], [1]))
    with pytest.raises(ValueError, match="NaN scores have no rank"):
        kendall_tau_b([1, float("nan"), 3], [1, 2, 3])
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        kendall_tau_b([1, 2, 3], [1, 2])


# --- rank agreement in report --------------------------------------------------------------
def result(method: str, seed: int, ap: float | None, order: str | None = None, suite: str = SMOKE, tasks=LISTED) -> dict:
    request = {"suite": suite, "method": method, "seed": seed, **({"order": order} if order else {})}
    config = {"suite": {"tasks": [{"name": name} for name in tasks]}, "method": method}
    return {
        "run_info": {"suite": suite, "method": method, "seed": seed, "task_order": list(tasks), "method_config": {},
                     "data_recipe_hash": "r", "base_checkpoint_hash": "b", "config_hash": config_hash(config), "config": config,
                     "request": request, "status": "complete"},
        "metrics": {"AP": ap},
        "timings": {"total_s": 1.0},
    }


def runs_in_two_orders() -> list[dict]:
    """Four methods; seeds 0 and 1 in the listed order, seeds 0 and 1 in the reversed one (τ values worked out by hand)."""
    rev = ",".join(REVERSED)
    return [
        # listed order, seed 0: a > b > c > d; seed 1: a > c > b > d (one discordant pair of 6: tau = 4/6)
        result("a", 0, 40.0), result("b", 0, 30.0), result("c", 0, 20.0), result("d", 0, 10.0),
        result("a", 1, 44.0), result("b", 1, 22.0), result("c", 1, 33.0), result("d", 1, 11.0),
        # reversed order: seed 0 d > c > b > a, seed 1 the same (tau 1); d has no seed 1
        result("a", 0, 1.0, rev, tasks=REVERSED), result("b", 0, 2.0, rev, tasks=REVERSED),
        result("c", 0, 3.0, rev, tasks=REVERSED), result("d", 0, 4.0, rev, tasks=REVERSED),
        result("a", 1, 1.0, rev, tasks=REVERSED), result("b", 1, 2.0, rev, tasks=REVERSED), result("c", 1, 3.0, rev, tasks=REVERSED),
    ]


def test_rank_agreement_over_seed_pairs_and_order_pairs():
    table = rank_agreement(runs_in_two_orders())
    assert list(table.columns) == COLUMNS and set(table["suite"]) == {SMOKE} and set(table["metric"]) == {"AP"}
    rows = [(r.comparison, r.a, r.b, r.n_methods, round(r.tau, 4)) for r in table.itertuples()]
    rev = f"order-{REVERSED_NAME}"
    # listed-order means a 42, b 26, c 26.5, d 10.5 -> a > c > b > d; reversed means a 1, b 2, c 3, d 4 -> d > c > b > a:
    # of the 6 pairs only (b, c) is concordant -> (1 - 5) / 6
    assert rows == [
        ("seeds", "seed0", "seed1", 4, round(4 / 6, 4)),
        ("seeds", f"seed0-{rev}", f"seed1-{rev}", 3, 1.0),
        ("seeds", "mean", "2 pairs", 3, round((4 / 6 + 1) / 2, 4)),
        ("seeds", "min", "2 pairs", 3, round(4 / 6, 4)),
        ("orders", "default", REVERSED_NAME, 4, round(-4 / 6, 4)),
        ("orders", "mean", "1 pairs", 4, round(-4 / 6, 4)),
        ("orders", "min", "1 pairs", 4, round(-4 / 6, 4)),
    ]


def test_fewer_than_three_common_methods_are_not_compared_and_write_nothing(tmp_path):
    runs = [result("a", 0, 1.0), result("b", 0, 2.0), result("c", 0, 3.0), result("a", 1, 1.0), result("b", 1, 2.0)]
    assert rank_agreement(runs).empty
    assert rebuild_rank_agreement(runs, tmp_path) == {} and not list(tmp_path.iterdir())


def test_a_method_without_the_score_is_left_out_of_the_comparison():
    runs = [result(m, s, float(v)) for s in (0, 1) for m, v in zip("abc", (1, 2, 3))] + [result("d", 0, None), result("d", 1, 9.0)]
    assert rank_agreement(runs).iloc[0][["n_methods", "tau"]].tolist() == [3, 1.0]


def test_orders_whose_runs_differ_in_more_than_the_order_are_not_compared():
    runs = runs_in_two_orders()
    for run_result in runs:
        if run_result["run_info"]["method"] == "c" and "order" in run_result["run_info"]["request"]:
            run_result["run_info"]["config"]["steps_per_task"] = 5
    with pytest.raises(ValueError, match="refusing to compare task orders of c"):
        rank_agreement(runs)


def _write(results_dir: Path, runs: list[dict]) -> None:
    for run_result in runs:
        info = run_result["run_info"]
        order = info["request"].get("order")
        run_id = f"seed{info['seed']}" + (f"-order-{order_label(order)}" if order else "")
        atomic_write_json(results_dir / info["suite"] / info["method"] / run_id / "results.json", run_result)


def test_report_writes_order_leaderboards_apart_and_the_rank_agreement(tmp_path):
    listed_only = [r for r in runs_in_two_orders() if "order" not in r["run_info"]["request"]]
    _write(tmp_path / "listed", listed_only)
    _write(tmp_path / "both", runs_in_two_orders())
    alone = rebuild_leaderboards(tmp_path / "listed", tmp_path / "alone")
    written = rebuild_leaderboards(tmp_path / "both", tmp_path / "boards")
    assert list(written) == [SMOKE, f"{SMOKE}-order-{REVERSED_NAME}"]
    assert written[SMOKE].read_bytes() == alone[SMOKE].read_bytes()  # runs of another order never enter the main rows
    report = cli.invoke(app, ["report", "--results-dir", str(tmp_path / "both"), "--out-dir", str(tmp_path / "boards"), "--no-heatmaps"])
    assert report.exit_code == 0, report.output
    lines = (tmp_path / "boards" / f"{SMOKE}-rank-agreement.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and lines[1] == f"{SMOKE},AP,seeds,seed0,seed1,4,0.667"
    assert f"{SMOKE},AP,orders,default,{REVERSED_NAME},4,-0.667" in lines
    assert f"Rank agreement: {SMOKE}" in report.output and "0.667" in report.output


def test_methods_added_to_a_suite_later_record_their_defaults_only_in_their_own_runs():
    """cvit-v2's published rows keep their hash when clmoe, hide and sefe get suite defaults; those methods' runs record them."""
    suite = load_suite("cvit-v2")
    assert runner_module.METHOD_DEFAULTS_ADDED_LATER & set(suite.method_defaults) == {"clmoe", "hide", "sefe"}
    recorded = _config(RunOptions(suite, "seqlora", 0, Path("r")))["suite"]["method_defaults"]
    assert not runner_module.METHOD_DEFAULTS_ADDED_LATER & set(recorded) and "branchlora" in recorded
    assert _config(RunOptions(suite, "sefe", 0, Path("r")))["suite"]["method_defaults"]["sefe"] == suite.method_defaults["sefe"]


def test_a_key_added_to_a_methods_suite_defaults_later_is_recorded_only_by_its_own_runs():
    """cvit-v2's branchlora selects on the text key alone (image_feature: none); no other method's setup records that key."""
    suite = load_suite("cvit-v2")
    assert suite.method_defaults["branchlora"]["image_feature"] == "none"
    assert "image_feature" not in _config(RunOptions(suite, "seqlora", 0, Path("r")))["suite"]["method_defaults"]["branchlora"]
    own = _config(RunOptions(suite, "branchlora", 0, Path("r")))
    assert own["suite"]["method_defaults"]["branchlora"]["image_feature"] == "none"
    method = build_method("branchlora", {}, suite.method_defaults["branchlora"])
    assert method.config.image_feature == "none" and method.config.deviations()
