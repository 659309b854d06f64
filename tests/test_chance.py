"""Image-blind chance and CIDEr ceilings: the fast constant-reply CIDEr equals pycocoevalcap's, chance is the best
constant's score, and declared values that differ are flagged."""
from __future__ import annotations

from collections import Counter

import pytest
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.evaluation.chance import TaskChance, constant_scores, measure_chance
from cvit_bench.evaluation.scoring import caption_scores, constant_reply_cider, reference_cider
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite

REFERENCES = [
    ["a red circle on the left.", "there is a red circle.", "a red circle left of the image."],
    ["a blue square below the word cat.", "the word cat above a blue square."],
    ["two green stars.", "a pair of green stars on the right.", "green stars."],
]


def test_constant_reply_cider_equals_pycocoevalcap_for_every_candidate():
    candidates = ["a red circle.", "the word cat.", "green stars on the left of the image.", "zebra", "a a a a red red."]
    fast = constant_reply_cider(candidates, REFERENCES)
    for candidate, value in zip(candidates, fast):
        assert value == pytest.approx(caption_scores([candidate] * len(REFERENCES), REFERENCES).corpus["CIDEr"], abs=1e-9)
    assert fast[3] == 0.0  # shares no n-gram with any reference


def test_reference_cider_of_references_that_agree_is_cider_maximum():
    # Each reference scored against an identical one: cosine 1 for every n, no length penalty -> 10 x mean over n = 10.
    assert reference_cider([["x y z w", "x y z w"], ["a b c d", "a b c d"]]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="two references"):
        reference_cider([["only one"]])


def test_constant_scores_golden():
    samples = [{"answer": "ring"}, {"answer": "ring"}, {"answer": "star"}]
    assert list(constant_scores("exact_match", ["ring", "star", "moon"], samples)) == pytest.approx([200 / 3, 100 / 3, 0.0])


def test_chance_is_the_best_training_answer_given_to_every_test_item():
    suite = load_suite("cvit-v1-smoke")
    rows = {row.task: row for row in measure_chance(suite, seeds=[0])}
    data = materialize(suite, 0)
    labels = Counter(record.answer for record in data.records("classify", "test"))
    trained = {answer for record in data.records("classify", "train") for answer in (record.answer, *record.answers)}
    best = max(count for label, count in labels.items() if label in trained)
    assert rows["classify"].chance == pytest.approx(100 * best / sum(labels.values()))
    assert rows["caption"].ceiling is not None and rows["caption"].ceiling > rows["caption"].chance
    assert rows["mcq"].ceiling is None
    assert set(rows) == {t.name for t in suite.tasks + suite.unseen}


def test_declared_values_that_differ_are_flagged():
    row = TaskChance("caption", "cider", 83.94, "a circle.", 534.41, declared_chance=83.9, declared_ceiling=400.0)
    assert row.mismatches() == ["ceiling declared 400.0 but measured 534.4"]
    assert TaskChance("mcq", "option_letter", 28.0, "B", None, None, None).mismatches() == ["chance declared None but measured 28.0"]
    assert not TaskChance("mcq", "option_letter", 28.0, "B", None, 28.0, None).mismatches()


def test_chance_command_exits_1_where_the_suite_declares_nothing():
    result = CliRunner().invoke(app, ["chance", "--suite", "cvit-v1-smoke", "--seeds", "0"])
    assert result.exit_code == 1, result.output
    assert "chance declared None but measured" in result.output and "cvit-v1-smoke.yaml" in " ".join(result.output.split())
