"""Property-based tests (hypothesis): no input makes the suite loader, the LLaVA reader, a contract checker or a scorer
fail with anything but the harness's own error, and every score lies in its documented range.

Examples are derandomized (the same inputs on every run, so CI cannot flake) and kept to a few
hundred per property; ``EXAMPLES`` counts what each property ran, and the module checks the
counts when it ends (``pytest -s`` prints them).
"""
from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvit_bench.data.llava_format import DataError, read_llava_json
from cvit_bench.evaluation.contracts import CONTRACTS, check_contract
from cvit_bench.evaluation.scoring import SAMPLE_SCORERS, sample_problem, score_task
from cvit_bench.suites.schema import Suite, SuiteError, load_suite

from conftest import SMOKE

EXAMPLES: Counter[str] = Counter()
MINIMUM = {"suite": 150, "reader": 150, "contracts": 150, "scorers": 150, "captions": 10}


def fixed(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def examples_ran():
    """After the module: each property ran at least its minimum of examples (a property skipped by -k is not counted)."""
    yield
    print("\nhypothesis examples run: " + ", ".join(f"{name} {count}" for name, count in sorted(EXAMPLES.items())))
    for name, count in EXAMPLES.items():
        assert count >= MINIMUM[name], f"{name}: only {count} examples ran"


leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
json_like = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                         max_leaves=12)
SMOKE_SUITE = yaml.safe_load(load_suite(SMOKE).path.read_text())
SECTIONS = {"training": ["steps_per_task", "batch_size", "lr", "warmup_steps", "weight_decay", "max_grad_norm"],
            "evaluation": ["batch_size", "max_new_tokens_margin", "future_tasks", "side_sets"],
            "data": ["source", "seed", "image_size", "images"]}


@st.composite
def edited_suites(draw) -> dict:
    """The smoke suite with one to three of its values (top level, a section's field, a task's field) replaced by anything."""
    suite = json.loads(json.dumps(SMOKE_SUITE))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "section", "task", "method_defaults"]))
        value = draw(json_like)
        if where == "top":
            suite[draw(st.sampled_from(["name", "tasks", "unseen", "orders", "instruction_setting", "data", "training", "x"]))] = value
        elif where == "section":
            section = draw(st.sampled_from(sorted(SECTIONS)))
            if isinstance(suite.get(section), dict):
                suite[section][draw(st.sampled_from(SECTIONS[section]))] = value
        elif where == "task" and isinstance(suite.get("tasks"), list) and suite["tasks"]:
            task = suite["tasks"][draw(st.integers(0, len(suite["tasks"]) - 1))]
            if isinstance(task, dict):
                task[draw(st.sampled_from(["name", "kind", "template", "scorer", "train_size", "test_size", "shots", "data"]))] = value
        else:
            suite["method_defaults"] = {draw(st.sampled_from(["seqlora", "replay", "smolora", "nope"])): {
                draw(st.sampled_from(["lr", "r", "fraction", "router_seed", "x"])): value}}
    return suite


@fixed(200)
@given(edited_suites())
def test_the_suite_loader_accepts_or_lists_problems_and_nothing_else(suite):
    EXAMPLES["suite"] += 1
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "suite.yaml"
        path.write_text(yaml.safe_dump(suite))
        try:
            loaded = load_suite(str(path))
        except SuiteError as error:
            assert error.problems and all(isinstance(problem, str) and problem for problem in error.problems)
            return
    assert isinstance(loaded, Suite) and loaded.training.steps_per_task >= 1 and loaded.training.lr > 0
    assert 0 <= loaded.seed < 2**32 and loaded.training.batch_size >= 1 and loaded.evaluation.batch_size >= 1


RECORD_KEYS = ["id", "image", "conversations", "question", "answer", "answers", "options", "box", "meta"]
VALID = {"id": "r0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}


@st.composite
def records(draw) -> object:
    """A valid record with some fields replaced or added, or any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_like)
    record = dict(VALID)
    for key in draw(st.lists(st.sampled_from(RECORD_KEYS), max_size=3)):
        record[key] = draw(json_like | st.lists(st.floats(), min_size=4, max_size=4) | st.lists(st.text(max_size=5), max_size=3))
    return record


@fixed(200)
@given(st.lists(records(), max_size=3) | json_like)
def test_the_llava_reader_returns_well_formed_records_or_a_data_error(content):
    EXAMPLES["reader"] += 1
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        Image.new("RGB", (4, 4)).save(root / "a.png")
        (root / "train.json").write_text(json.dumps(content))
        try:
            read = read_llava_json(root / "train.json")
        except DataError as error:
            assert str(error).startswith(str(root / "train.json"))
            return
    for record in read:
        assert isinstance(record.question, str) and isinstance(record.answer, str) and record.answers
        assert all(isinstance(option, str) for option in record.options)
        assert len(record.box) in (0, 4) and all(math.isfinite(value) for value in record.box)


outputs = st.one_of(st.text(max_size=40), st.sampled_from([
    "A", "(B)", "B) blue", "The answer is C.", '{"answer": "B"}', '{"answer": 3}', "[0.1, 0.2, 0.5, 0.6]", "[1, 2, 0, 1]",
    "0.1, 0.2, 0.5, 0.6", "9" * 400 + ", 0, 1, 1", "yes", "No", "2", "two dogs", "A DOG", "a dog runs on the grass.", "", "  \n",
]))


@fixed(300)
@given(st.sampled_from(CONTRACTS), outputs, st.none() | st.text(max_size=20), st.none() | st.integers(0, 30))
def test_every_contract_check_passes_or_fails_with_a_reason(contract, output, ground_truth, n_options):
    EXAMPLES["contracts"] += 1
    result = check_contract(contract, output, ground_truth=ground_truth, n_options=n_options)
    assert isinstance(result.passed, bool) and isinstance(result.reason, str) and result.reason


finite = st.floats(-10, 10, allow_nan=False)
samples = st.fixed_dictionaries({
    "answer": st.text(max_size=15) | st.sampled_from(["A", "B", "2", "yes", "dog"]),
    "answers": st.lists(st.text(max_size=10) | st.sampled_from(["2", "two", "yes"]), min_size=1, max_size=10),
    "options": st.lists(st.text(max_size=10), max_size=5),
    "box": st.just([]) | st.lists(finite, min_size=4, max_size=4),
    # what Sample.scoring_fields adds for the rules that read the prompt, the image name or the record's meta (MLLM-CL)
    "prompt": st.text(max_size=20) | st.just("Which states have the highest value?"),
    "image": st.sampled_from(["0.png", "mapqa_1.png", "ai2d_2.png"]),
    "meta": st.just({}) | st.fixed_dictionaries({
        "question_type": st.sampled_from(["multi_choice", "free_form"]),
        "answer_type": st.sampled_from(["text", "integer", "float", "list", "Handwritten Mathematical Expression Recognition"]),
    }),
})


@fixed(400)
@given(st.sampled_from(sorted(SAMPLE_SCORERS)), outputs, samples)
def test_every_sample_scorer_gives_a_score_in_0_1(scorer, output, sample):
    """Samples a scorer cannot read are refused before a run (``sample_problem``); every other one scores in [0, 1],
    except a task declared not computed (MLLM-ACL's server-scored APP), which is NaN so that no mean counts it."""
    assume(sample_problem(scorer, sample) is None)
    EXAMPLES["scorers"] += 1
    [score] = score_task(scorer, [output], [sample]).per_sample
    if scorer == "not_computed":
        assert math.isnan(score)
    else:
        assert isinstance(score, float) and 0.0 <= score <= 1.0


@fixed(12)
@given(st.sampled_from(["cider", "cider_single_ref"]), st.lists(st.tuples(outputs, st.lists(st.text(max_size=30), min_size=1, max_size=3)),
                                                                   min_size=1, max_size=4))
def test_caption_scorers_give_cider_in_0_10(scorer, pairs):
    """Per-sample CIDEr-D lies in [0, 10] (its clipped, length-penalised n-gram similarity times 10)."""
    EXAMPLES["captions"] += 1
    scores = score_task(scorer, [output for output, _ in pairs], [{"answers": refs} for _, refs in pairs])
    assert len(scores.per_sample) == len(pairs) and all(0.0 <= score <= 10.0 + 1e-9 for score in scores.per_sample)
