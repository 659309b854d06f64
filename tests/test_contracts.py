"""Golden table for the instruction-following checks: each row is a raw output and its verdict."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvit_bench.evaluation.contracts import CONTRACTS, FAMILIES, ContractResult, check_contract, reply_family

# (contract, output, keyword arguments, expected pass, fragment expected in the reason)
CASES = [
    # letter: exactly one upper-case letter, within the offered options
    ("letter", "B", {}, True, "ok"),
    ("letter", "  C\n", {"n_options": 4}, True, "ok"),
    ("letter", "B.", {}, False, "single option letter, got 'B.'"),
    ("letter", "The answer is B", {}, False, "single option letter"),
    ("letter", "b", {}, False, "single option letter"),
    ("letter", "blue", {}, False, "got 'blue'"),
    ("letter", "E", {"n_options": 4}, False, "beyond the 4 options"),
    ("letter", "", {}, False, "single option letter"),
    # short: SMoLoRA's rule, at most two words or else the ground truth ignoring case
    ("short", "red", {}, True, "ok"),
    ("short", "light blue", {}, True, "ok"),
    ("short", "the red car", {}, False, "at most two words, got 3"),
    ("short", "The Red Car", {"ground_truth": "the red car"}, True, "ok"),
    ("short", "the red bus", {"ground_truth": "the red car"}, False, "at most two words"),
    ("short", "   ", {}, False, "empty output"),
    # ... but only for replies of its own family: no letters, upper-case labels or (truncated) JSON
    ("short", "A", {}, False, "is a letter reply, not a short one"),
    ("short", "(B)", {}, False, "is a letter reply"),
    ("short", "RING", {}, False, "is a uppercase reply"),
    ("short", '{"answer": "zip', {}, False, "is a json reply"),
    ("short", "2", {}, True, "ok"),
    # sentence: ends with "." and has more than four words
    ("sentence", "A red circle above a square.", {}, True, "ok"),
    ("sentence", "A red circle above a square", {}, False, "ending with '.'"),
    ("sentence", "A red circle here.", {}, False, "more than four words, got 4"),
    # yes_no
    ("yes_no", "Yes", {}, True, "ok"),
    ("yes_no", "No", {}, True, "ok"),
    ("yes_no", "NO", {}, False, "is a uppercase reply, not a short one"),
    ("yes_no", "yes.", {}, False, "expected 'yes' or 'no'"),
    ("yes_no", "yes, it is", {}, False, "expected 'yes' or 'no'"),
    # number: digits only
    ("number", "12", {}, True, "ok"),
    ("number", "two", {}, False, "only digits, got 'two'"),
    ("number", "3.", {}, False, "only digits"),
    ("number", "²", {}, False, "only digits"),
    # uppercase: letters present, all upper case, at most two words unless it is the ground truth
    ("uppercase", "RED", {}, True, "ok"),
    ("uppercase", "Red", {}, False, "all letters upper-case"),
    ("uppercase", "42", {}, False, "expected upper-case letters"),
    ("uppercase", "THE RED CAR", {}, False, "at most two words, got 3"),
    ("uppercase", "THE RED CAR", {"ground_truth": "the red car"}, True, "ok"),
    ("uppercase", "A", {}, False, "is a letter reply, not a uppercase one"),
    ("uppercase", "B.", {}, False, "is a letter reply"),
    ("uppercase", "A RED CIRCLE ABOVE A SQUARE.", {"ground_truth": "a red circle above a square."}, False, "is a sentence reply"),
    # json_answer: a JSON object whose only key is "answer", with a string value
    ("json_answer", '{"answer": "red"}', {}, True, "ok"),
    ("json_answer", "{'answer': 'red'}", {}, False, "expected a JSON object"),
    ("json_answer", '{"answer": "red", "why": "x"}', {}, False, "got ['answer', 'why']"),
    ("json_answer", '["red"]', {}, False, "got list"),
    ("json_answer", '{"answer": 3}', {}, False, "string under 'answer', got int"),
    # bbox: [x1, y1, x2, y2] in [0, 1], x1 < x2 and y1 < y2
    ("bbox", "[0.1, 0.2, 0.5, 0.75]", {}, True, "ok"),
    ("bbox", "[0,0,1,1]", {}, True, "ok"),
    ("bbox", "(0.1, 0.2, 0.5, 0.75)", {}, False, "expected '[x1, y1, x2, y2]'"),
    ("bbox", "box: [0.1, 0.2, 0.5, 0.75]", {}, False, "expected '[x1, y1, x2, y2]'"),
    ("bbox", "[0.1, 0.2, 0.5]", {}, False, "expected '[x1, y1, x2, y2]'"),
    ("bbox", "[0.1, 0.2, 1.5, 0.75]", {}, False, "in [0, 1]"),
    ("bbox", "[0.5, 0.2, 0.1, 0.75]", {}, False, "x1 < x2 and y1 < y2"),
    # lowercase_sentence: a sentence with no upper-case letter
    ("lowercase_sentence", "a red circle above a square.", {}, True, "ok"),
    ("lowercase_sentence", "A red circle above a square.", {}, False, "lower-case"),
    ("lowercase_sentence", "a red circle here.", {}, False, "more than four words"),
]


@pytest.mark.parametrize(("output", "family"), [
    ('{"answer": "zip"}', "json"), ('{"answer": "zip', "json"), ("[0.1, 0.2, 0.5, 0.75]", "bbox"), ("B", "letter"),
    ("(C)", "letter"), ("A red circle above a square.", "sentence"), ("RING", "uppercase"), ("TRAFFIC LIGHT", "uppercase"),
    ("ring", "short"), ("Yes", "short"), ("3", "short"), ("a red circle here.", "short"), ("", "short"),
])
def test_every_reply_has_one_family(output, family):
    assert reply_family(output) == family


def test_every_contract_names_its_family():
    assert set(FAMILIES) == set(CONTRACTS)


# Replies built from the pieces each contract looks at, so near-misses of every family are drawn often.
_PIECES = st.sampled_from(["{", "}", "[", "]", '"answer"', '"', ":", ",", " ", ".", "(", ")", "A", "B", "Z", "I",
                           "red", "RED", "Red", "yes", "NO", "0", "0.5", "1", "12", "a", "the", "circle", "ß", "\n"])
_REPLIES = st.one_of(st.text(max_size=30), st.lists(_PIECES, max_size=12).map("".join))


@settings(max_examples=1500, deadline=None)
@given(reply=_REPLIES, truth=st.sampled_from(["same", "upper", "lower", "none"]), n_options=st.sampled_from([None, 4]))
def test_no_reply_passes_two_families_contracts(reply, truth, n_options):
    ground_truth = {"same": reply, "upper": reply.upper(), "lower": reply.lower(), "none": None}[truth]
    passed = {FAMILIES[c] for c in CONTRACTS if check_contract(c, reply, ground_truth=ground_truth, n_options=n_options).passed}
    assert len(passed) <= 1, (reply, passed)


@pytest.mark.parametrize(("contract", "output", "kwargs", "passed", "reason"), CASES)
def test_contract_table(contract, output, kwargs, passed, reason):
    result = check_contract(contract, output, **kwargs)
    assert result.passed is passed
    assert reason in result.reason


def test_every_contract_has_rows_in_the_table():
    assert {case[0] for case in CASES} == set(CONTRACTS)


def test_passing_reason_is_ok_and_result_is_frozen():
    result = check_contract("number", "3")
    assert result == ContractResult(True, "ok")
    with pytest.raises(AttributeError):
        result.passed = False  # type: ignore[misc]


def test_unknown_contract_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown contract 'haiku'.*letter, short, sentence"):
        check_contract("haiku", "an old silent pond")


def test_long_outputs_are_shortened_in_reasons():
    result = check_contract("letter", "x" * 100)
    assert not result.passed
    assert "x" * 37 + "..." in result.reason and "x" * 38 not in result.reason
