"""MLLM-CL's answer rules (evaluation/mllm_cl.py), each pinned by replies scored by hand from the authors' scripts."""
from __future__ import annotations

import math

import pytest

from cvit_bench.evaluation.scoring import SAMPLE_SCORERS, sample_problem, score_task


def sample(answer: str = "", *, answers: list[str] | None = None, options: list[str] | None = None, prompt: str = "",
           image: str = "x.png", meta: dict | None = None) -> dict:
    return {"answer": answer, "answers": answers or [answer], "options": options or [], "box": [], "prompt": prompt,
            "image": image, "meta": meta or {}}


@pytest.mark.parametrize(("reply", "answer", "score"), [
    ("The runway is visible.", "runway", 1.0),  # "runway " in the reply
    ("It is a runway.", "runway", 1.0),  # "runway."
    ("runway, then a road", "runway", 1.0),  # "runway,"
    ("runways", "runway", 1.0),  # a one-word reply: substring
    ("many runways here", "runway", 1.0),  # " runway" (the summary's rule: a prefix of a word still counts)
    ("a parking lot", "lot.", 1.0),  # the answer's final "." is dropped
    ("The answer is yes", "Yes", 1.0),  # lower-cased
    ("the dense residential area", "dense residential", 1.0),  # multi-word: substring
    ("dense and residential", "dense residential", 0.0),
    ("carts everywhere now", "car", 0.0),  # inside another word of a longer reply: not a word
    ("Unanswerable, but runway", "runway", 0.0),  # "Unanswerable" anywhere is wrong
    ("unanswerable runway", "runway", 1.0),  # the check is case-sensitive, as the scripts' `in`
])
def test_rs_and_ad_word_or_substring_rule(reply, answer, score):
    assert SAMPLE_SCORERS["mllm_word_or_substring"](reply, sample(answer)) == score


@pytest.mark.parametrize(("reply", "answer", "score"), [
    ("Yes, there is necrosis", "yes", 1.0),
    ("Adenocarcinoma of the colon", "adenocarcinoma", 1.0),
    ("colon", "adenocarcinoma of the colon", 0.0),
    ("Unanswerable", "unanswerable", 0.0),
])
def test_med_answer_inside_the_reply(reply, answer, score):
    assert SAMPLE_SCORERS["mllm_contains"](reply, sample(answer)) == score


@pytest.mark.parametrize(("reply", "answer", "image", "prompt", "score"), [
    ("B", "b", "AI2D_0001.png", "Which part?", 1.0),  # exact after lower-casing
    ("B.", "B", "TQA_12.png", "Which part?", 0.0),  # exact: the "." counts
    ("a leaf", "leaf", "images/VQA_3.png", "What is it?", 0.0),  # the source is the file name's prefix: exact match
    ("a leaf", "leaf", "images/MapQA_3.png", "What is it?", 1.0),
    ("ohio, texas", "Ohio, Texas, Utah", "MapQA_7.png", "Which states have the highest value?", 2 / 3),
    ("texas, ohio", "Ohio, Texas", "MapQA_7.png", "Which states are shown?", 0.0),  # items keep their spaces
    ("ohio,texas", "Ohio,Texas", "MapQA_7.png", "Which states are shown?", 1.0),
    ("the value is 42 here", "42", "MapQA_8.png", "What is the value of Ohio?", 1.0),  # other MapQA: substring
    ("Unanswerable", "a", "AI2D_1.png", "?", 0.0),
])
def test_sci_rules_by_source(reply, answer, image, prompt, score):
    assert SAMPLE_SCORERS["mllm_science"](reply, sample(answer, image=image, prompt=prompt)) == pytest.approx(score)


@pytest.mark.parametrize(("reply", "answer", "score"), [
    ("B.", "B", 1.0),
    ("Y es", "Yes", 1.0),  # spaces removed
    ("No", "no", 1.0),
    ("B) 12%", "B", 0.0),
    ("Unanswerable", "No", 0.0),
])
def test_fin_normalised_equality(reply, answer, score):
    assert SAMPLE_SCORERS["mllm_finance"](reply, sample(answer)) == score


@pytest.mark.parametrize(("reply", "answers", "category", "score"), [
    ("The sign says STOP here", ["stop"], "Regular Text Recognition", 1.0),
    ("Total:\n$12.50", ["total: $12.50", "12.50"], "Key Information Extraction", 1.0),  # any answer; newlines removed
    ("x ^ { 2 } + 1", ["x^{2}+1"], "Handwritten Mathematical Expression Recognition", 1.0),  # without spaces
    ("X^{2}+1", ["x^{2}+1"], "Handwritten Mathematical Expression Recognition", 0.0),  # case-sensitive
    ("X^{2}+1", ["x^{2}+1"], "Regular Text Recognition", 1.0),
    ("nothing", ["stop"], "Regular Text Recognition", 0.0),
])
def test_ocr_any_answer_inside_the_reply(reply, answers, category, score):
    assert SAMPLE_SCORERS["mllm_ocr"](reply, sample(answers[0], answers=answers, meta={"answer_type": category})) == score


MC = {"question_type": "multi_choice", "answer_type": "text"}


@pytest.mark.parametrize(("reply", "answer", "meta", "score"), [
    ("B", "8/11", MC, 1.0),
    ("The correct answer is (B) 8/11.", "8/11", MC, 1.0),  # one letter named as a word
    ("A or B", "8/11", MC, 0.0),  # two letters: then the option texts, none of which it holds
    ("It is 8/11 of the shape", "8/11", MC, 1.0),  # no letter: the one option text it contains
    ("3/11 or 8/11", "8/11", MC, 0.0),  # two option texts: undecided, left to the judge (0 here)
    ("Cannot determine the answer", "8/11", MC, 0.0),
    ("14", "14", {"question_type": "free_form", "answer_type": "integer"}, 1.0),
    (" 14\n", "14", {"question_type": "free_form", "answer_type": "integer"}, 1.0),  # int() ignores surrounding space
    ("The answer is 14", "14", {"question_type": "free_form", "answer_type": "integer"}, 0.0),  # the judge's part
    ("1.50", "1.5", {"question_type": "free_form", "answer_type": "float"}, 1.0),
    ("[1, 2]", "[1, 2]", {"question_type": "free_form", "answer_type": "list"}, 0.0),  # only the judge reads lists
])
def test_math_rules_confirm_or_leave_to_the_judge(reply, answer, meta, score):
    options = ["3/11", "8/11", "6/11", "3/5"]
    assert SAMPLE_SCORERS["mllm_math_rules"](reply, sample(answer, options=options, meta=meta)) == score


@pytest.mark.parametrize(("reply", "answer", "score"), [
    ("(B) 3", "(B)", 1.0),  # spaces, "." and case removed: "(b)3" holds "(b)"
    ("The answer is (A).", "(a)", 1.0),
    ("B", "(B)", 0.0),
])
def test_vp_substring_without_spaces_and_periods(reply, answer, score):
    assert SAMPLE_SCORERS["mllm_spatial"](reply, sample(answer)) == score


def test_app_is_not_computed_and_leaves_the_cell_empty():
    scores = score_task("not_computed", ["click the button"], [sample("tap")])
    assert all(math.isnan(value) for value in scores.per_sample)


@pytest.mark.parametrize(("scorer", "fields", "problem"), [
    ("mllm_ocr", sample("a"), "meta.answer_type"),
    ("mllm_math_rules", sample("a", meta={"question_type": "essay"}), "meta.question_type"),
    ("mllm_math_rules", sample("9", options=["1", "2"], meta=MC), "answer: a multiple-choice answer"),
])
def test_records_a_rule_cannot_read_are_reported_before_a_run(scorer, fields, problem):
    assert problem in sample_problem(scorer, fields)
    assert sample_problem(scorer, {key: value for key, value in fields.items() if key != "meta"}) is None
