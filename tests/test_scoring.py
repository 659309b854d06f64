"""Golden values for the visual-understanding scorers (cvit_bench.evaluation.scoring).

Every expected number is written out by hand (with the arithmetic beside it), so a change in a
matching rule or a metric shows up here as a changed number rather than passing silently.
Caption metrics call Java (PTBTokenizer), so their corpora are tiny and each is scored once per
module.
"""
from __future__ import annotations

import math

import pytest

from cvit_bench.evaluation import scoring
from cvit_bench.evaluation.scoring import (
    CORPUS_SCORERS,
    SAMPLE_SCORERS,
    SPICE_SKIP_REASON,
    VQA_VARIANTS,
    TaskScores,
    box_iou,
    caption_scores,
    cider_single_reference_scores,
    extract_answer,
    extract_option_letter,
    normalize_answer,
    parse_box,
    score_task,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------
# normalize_answer: the VQA script's processPunctuation + processDigitArticle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # punctuation: a mark not touching a space becomes a space, touching one it is deleted
        ("Two dogs!", "2 dogs"),
        ("What is it?", "what is it"),
        ("x,y", "x y"),
        ("x, y", "x y"),
        ("left-right", "left right"),
        ("x - y", "x y"),
        # periods: dropped unless a digit follows
        ("end.", "end"),
        ("Hello.", "hello"),
        ("3.5", "3.5"),
        ("e.g.", "eg"),
        # digit-comma-digit: the comma goes, and then every mark in the text is deleted
        ("1,000", "1000"),
        ("1,000 people-ish", "1000 peopleish"),
        # articles dropped (after lower-casing)
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("(a)", ""),
        # number words up to ten, "none" -> "0"; beyond ten untouched
        ("none", "0"),
        ("ten", "10"),
        ("Three", "3"),
        ("eleven", "eleven"),
        # contractions restored, quirks of the script's table included
        ("dont", "don't"),
        ("Its Ok, isnt it", "its ok isn't it"),
        ("somebody'd", "somebodyd"),
        ("Im", "im"),  # the capitalised key "Im" never matches: words are lower-cased first
        # whitespace cleanup
        ("yes\tno\n", "yes no"),
        ("  Yes  ", "yes"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# vqa_accuracy: min(1, matches / 3) averaged over the n leave-one-out subsets
# ---------------------------------------------------------------------------------------------

# With 10 answers of which k match the prediction, k subsets (the ones leaving a match out) hold
# k - 1 matches and the other 10 - k subsets hold k, so acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
LEAVE_ONE_OUT_10 = [
    (0, 0.0),  # (0*0 + 10*0) / 10
    (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
    (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
    (4, 1.0),  # (4*1 + 6*1) / 10: every subset still holds >= 3 matches
    (5, 1.0),
    (9, 1.0),
    (10, 1.0),
]


@pytest.mark.parametrize("variant", VQA_VARIANTS)
@pytest.mark.parametrize(("k", "expected"), LEAVE_ONE_OUT_10)
def test_vqa_accuracy_leave_one_out_over_ten_answers(k, expected, variant):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    score = vqa_accuracy("cat", answers, variant)
    assert score == pytest.approx(expected)
    assert 0.0 <= score <= 1.0


@pytest.mark.parametrize("variant", VQA_VARIANTS)
def test_vqa_accuracy_averages_n_subsets_for_fewer_answers(variant):
    # 3 answers, 2 match "cat": leaving out either "cat" leaves 1 match (1/3), leaving out "dog"
    # leaves 2 (2/3): (1/3 + 1/3 + 2/3) / 3 = 4/9.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"], variant) == pytest.approx(4 / 9)
    # 2 answers, both match: each subset of one holds 1 match -> 1/3.
    assert vqa_accuracy("cat", ["cat", "cat"], variant) == pytest.approx(1 / 3)


def test_vqa_accuracy_needs_two_answers():
    with pytest.raises(ValueError, match="at least 2 annotator answers, got 1"):
        vqa_accuracy("cat", ["cat"])
    with pytest.raises(ValueError, match="got 0"):
        vqa_accuracy("cat", [])


def test_vqa_accuracy_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown VQA variant 'official'; valid variants: vqaeval, normalized"):
        vqa_accuracy("cat", ["cat"] * 10, "official")


def test_vqa_default_variant_is_normalized():
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


@pytest.mark.parametrize(
    ("prediction", "answers", "normalized", "vqaeval"),
    [
        # Annotators agree: vqaeval compares after whitespace cleanup only.
        ("yes.", ["yes"] * 10, 1.0, 0.0),
        ("Yes", ["yes"] * 10, 1.0, 0.0),
        ("two", ["2"] * 10, 1.0, 0.0),
        ("the cat", ["cat"] * 10, 1.0, 0.0),
        ("yes", ["yes."] * 10, 1.0, 0.0),
        (" yes\n", ["yes"] * 10, 1.0, 1.0),  # whitespace cleanup happens in both variants
        ("yes", ["yes"] * 10, 1.0, 1.0),
        # Annotators disagree: vqaeval normalizes both sides too, so the variants agree.
        ("Yes.", ["yes"] * 9 + ["no"], 1.0, 1.0),
        # "two" -> "2" matches the three "2"s: (3*(2/3) + 7*1) / 10 = 0.9
        ("two", ["2"] * 3 + ["3"] * 7, 0.9, 0.9),
        # "The Cat!" -> "cat"; "a cat" -> "cat" too: 2 matches -> (2*(1/3) + 8*(2/3)) / 10 = 0.6
        ("The Cat!", ["cat", "a cat"] + ["dog"] * 8, 0.6, 0.6),
    ],
)
def test_vqa_variants_differ_only_when_annotators_agree(prediction, answers, normalized, vqaeval):
    assert vqa_accuracy(prediction, answers, "normalized") == pytest.approx(normalized)
    assert vqa_accuracy(prediction, answers, "vqaeval") == pytest.approx(vqaeval)


# ---------------------------------------------------------------------------------------------
# extract_answer / extract_option_letter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ('{"answer": "Blue"}', "blue"),
        ('{"answer": 3}', "3"),
        ('{"answer": [1]}', '{"answer": [1]}'),  # not a str/number: the raw text, lower-cased
        ("{not json", "{not json"),
        ("The answer is: Cat.", "cat"),
        ("the answer is dog", "dog"),
        ("Answer: dog", "dog"),
        ("  Blue.  ", "blue"),
        ("3.5", "3.5"),
        ("e.g.", "e.g"),  # only one trailing "." goes
        ("I think the answer is cat", "i think the answer is cat"),  # prefix only at the start
    ],
)
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


OPTIONS = ["red", "blue", "green"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # bare letters
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("  A\n", "A"),
        # a letter leading the option text
        ("B) blue", "B"),
        ("(B) blue", "B"),
        ("C. green", "C"),
        # a stated letter
        ("The answer is C", "C"),
        ("The answer is (B).", "B"),
        ("the answer is: C", "C"),
        ("The answer is B, blue", "B"),
        # the option text itself (fuzz.ratio >= 85)
        ("blue", "B"),
        ("Blue.", "B"),
        ("The answer is blue.", "B"),
        ('{"answer": "blue"}', "B"),
        ("answer: green", "C"),
        ("gren", "C"),  # fuzz.ratio("gren", "green") = 2*4/9 = 88.9
        # nothing chosen
        ("D", None),  # a letter beyond the options
        ("b", None),  # lower case is not read as a letter
        ("purple", None),
        ("The answer is A cat", None),
        ("I think B because", None),
        ("", None),
    ],
)
def test_extract_option_letter(output, expected):
    assert extract_option_letter(output, OPTIONS) == expected


def test_extract_option_letter_best_text_match_wins():
    # "dark blue" vs "blue": 2*4/13 = 61.5 < 85; vs "dark blue" exact: 100.
    assert extract_option_letter("dark blue", ["blue", "dark blue"]) == "B"
    # "A dog" is not the letter A (no ".", ":" or ")" after it), and "a dog" vs "dog" is 75 < 85.
    assert extract_option_letter("A dog", ["dog", "cat"]) is None


@pytest.mark.parametrize("output", ['{"answer": "B"}', "Answer: B"])
def test_extract_option_letter_reads_a_wrapped_letter(output):
    assert extract_option_letter(output, OPTIONS) == "B"


# ---------------------------------------------------------------------------------------------
# Per-sample scorers
# ---------------------------------------------------------------------------------------------

MCQ = {"answer": "B", "options": ["red", "blue", "green"]}
VQA_YES = {"answers": ["yes"] * 10}
BOX = {"box": [0.0, 0.0, 10.0, 10.0]}

# (scorer, output, sample, expected score)
SCORER_CASES = [
    ("option_letter", "(B)", MCQ, 1.0),
    ("option_letter", "The answer is blue.", MCQ, 1.0),
    ("option_letter", "C", MCQ, 0.0),
    ("option_letter", "purple", MCQ, 0.0),
    ("option_letter", "B", {"answer": " B ", "options": ["red", "blue"]}, 1.0),  # answer stripped
    ("vqa_accuracy", "The answer is 2.", {"answers": ["2"] * 10}, 1.0),
    ("vqa_accuracy", "yes!", VQA_YES, 1.0),
    ("vqa_accuracy", "two", {"answers": ["2"] * 2 + ["3"] * 8}, 0.6),  # (2*(1/3) + 8*(2/3)) / 10
    ("vqa_accuracy", "no", VQA_YES, 0.0),
    # vqaeval: extract_answer drops the "." and lower-cases, but "!" stays and is never normalized
    ("vqa_accuracy_vqaeval", "Yes.", VQA_YES, 1.0),
    ("vqa_accuracy_vqaeval", "yes!", VQA_YES, 0.0),
    ("vqa_accuracy_vqaeval", "no", VQA_YES, 0.0),
    ("exact_match", "The answer is the Left.", {"answer": "left"}, 1.0),
    ("exact_match", '{"answer": "Two"}', {"answer": "2"}, 1.0),
    ("exact_match", "right", {"answer": "left"}, 0.0),
    ("exact_match", "on the left", {"answer": "left"}, 0.0),
    ("label_match", "A Golden Retriever.", {"answer": "golden retriever"}, 1.0),
    ("label_match", "golden retreiver", {"answer": "golden retriever"}, 1.0),  # ratio 93.75 >= 90
    ("label_match", "cats", {"answer": "cat"}, 0.0),  # ratio 2*3/7 = 85.7 < 90
    ("label_match", "labrador", {"answer": "golden retriever"}, 0.0),
    ("substring_match", "Dog", {"answer": "hot dog"}, 1.0),  # prediction inside the label
    ("substring_match", "hot dog stand", {"answer": "hot dog"}, 1.0),  # label inside the prediction
    ("substring_match", "at", {"answer": "cat"}, 1.0),  # SMoLoRA's rule as it is
    ("substring_match", "", {"answer": "cat"}, 0.0),  # empty is wrong here (right in SMoLoRA)
    ("substring_match", "   ", {"answer": "cat"}, 0.0),
    ("substring_match", "dog", {"answer": "cat"}, 0.0),
    ("substring_match_cased", "hot dog", {"answer": "hot dog stand"}, 1.0),
    ("substring_match_cased", "Hot dog", {"answer": "hot dog stand"}, 0.0),  # CoIN compares case-sensitively
    ("substring_match_cased", "", {"answer": "cat"}, 0.0),
    ("lower_exact_match", " Harry Potter ", {"answer": "harry potter"}, 1.0),
    ("lower_exact_match", "harry potter.", {"answer": "Harry Potter"}, 0.0),  # no punctuation stripping
    ("lower_exact_match", "the harry potter", {"answer": "Harry Potter"}, 0.0),  # nor article removal
    ("grounding_iou_strict", "[0, 0, 0.5, 1]", {"box": [0, 0, 1, 1]}, 0.0),  # IoU exactly 0.5: CoIN counts > 0.5
    ("grounding_iou", "[0, 0, 0.5, 1]", {"box": [0, 0, 1, 1]}, 1.0),
    ("grounding_iou_strict", "[0, 0, 0.6, 1]", {"box": [0, 0, 1, 1]}, 1.0),
    ("upper_exact_match", " yes ", {"answer": "Yes"}, 1.0),
    ("upper_exact_match", "yes.", {"answer": "Yes"}, 0.0),
    ("upper_exact_match", "yes it is", {"answer": "Yes"}, 0.0),
    ("grounding_iou", "[0, 0, 10, 10]", BOX, 1.0),
    ("grounding_iou", "The box is 0,0,10,5.", BOX, 1.0),  # IoU = 50/100 = 0.5, the threshold
    ("grounding_iou", "[5, 0, 15, 10]", BOX, 0.0),  # IoU = 50/(100+100-50) = 1/3
    ("grounding_iou", "no box here", BOX, 0.0),
    # MLLM-CL's rules: one case each way here, the hand-scored cases in tests/test_mllm_cl_scoring.py.
    ("mllm_word_or_substring", "A long runway.", {"answer": "runway"}, 1.0),
    ("mllm_word_or_substring", "Unanswerable runway", {"answer": "runway"}, 0.0),
    ("mllm_contains", "Yes, it is", {"answer": "yes"}, 1.0),
    ("mllm_contains", "no", {"answer": "yes"}, 0.0),
    ("mllm_science", "b", {"answer": "B", "image": "AI2D_1.png", "prompt": "?"}, 1.0),
    ("mllm_science", "b.", {"answer": "B", "image": "AI2D_1.png", "prompt": "?"}, 0.0),
    ("mllm_finance", "B.", {"answer": "B"}, 1.0),
    ("mllm_finance", "A", {"answer": "B"}, 0.0),
    ("mllm_ocr", "It says STOP", {"answers": ["stop"], "meta": {"answer_type": "Regular Text Recognition"}}, 1.0),
    ("mllm_ocr", "go", {"answers": ["stop"], "meta": {"answer_type": "Regular Text Recognition"}}, 0.0),
    ("mllm_math_rules", "14", {"answer": "14", "meta": {"question_type": "free_form", "answer_type": "integer"}}, 1.0),
    ("mllm_math_rules", "It is 14", {"answer": "14", "meta": {"question_type": "free_form", "answer_type": "integer"}}, 0.0),
    ("mllm_spatial", "(A) box", {"answer": "(A)"}, 1.0),
    ("mllm_spatial", "A", {"answer": "(A)"}, 0.0),
]
NO_SCORE = {"not_computed"}  # scores nothing by design (NaN: an empty cell); tests/test_mllm_cl_scoring.py pins it


@pytest.mark.parametrize(("scorer", "output", "sample", "expected"), SCORER_CASES)
def test_sample_scorers(scorer, output, sample, expected):
    assert SAMPLE_SCORERS[scorer](output, sample) == pytest.approx(expected)


def test_every_sample_scorer_has_a_positive_and_a_negative_case():
    for name in set(SAMPLE_SCORERS) - NO_SCORE:
        expected = {case[3] for case in SCORER_CASES if case[0] == name}
        assert {0.0, 1.0} <= expected, name


# ---------------------------------------------------------------------------------------------
# parse_box / box_iou
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),
        ("The box is 10,20 , 30,40 pixels", (10.0, 20.0, 30.0, 40.0)),
        ("-1.5, +2, .5, 3.", (-1.5, 2.0, 0.5, 3.0)),
        ("1, 2, 3, 4, 5", (1.0, 2.0, 3.0, 4.0)),  # the first four
        ("box 2: 10, 20, 30, 40", (10.0, 20.0, 30.0, 40.0)),
        ("1, 2, 3", None),
        ("no numbers", None),
        ("", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),  # disjoint
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # sharing an edge only
        ([0, 0, 2, 2], [0, 0, 2, 1], 0.5),  # inter 2*1 = 2, union 4 + 2 - 2 = 4
        ([0, 0, 2, 2], [1, 0, 3, 2], 1 / 3),  # half of each overlaps: inter 2, union 4 + 4 - 2 = 6
        ([0, 0, 4, 4], [1, 1, 3, 3], 0.25),  # contained: inter 4, union 16
        ((0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75), 1 / 7),  # inter 1/16, union 2/4 - 1/16 = 7/16
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # degenerate: union 0
        ([2, 2, 0, 0], [0, 0, 2, 2], 0.0),  # inverted box has area 0
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Caption metrics (Java: scored once per module)
# ---------------------------------------------------------------------------------------------

# Single references; no n-gram occurs in all three ("the" is in 1 and 2, "a" and "on" in 1 and 3),
# so every n-gram has a positive idf. A prediction identical (after PTB tokenization) to its one
# reference then has cosine 1 at each of the 4 n-gram orders and no length penalty:
# CIDEr-D = mean(1, 1, 1, 1) * 10 = 10. A prediction sharing no word with it scores exactly 0.
REFERENCES = [
    ["a black dog runs on the grass"],  # 7 tokens
    ["two people ride bikes down the street"],  # 7 tokens
    ["a red apple sits on a wooden table"],  # 8 tokens
]
PREDICTIONS = [
    "A Black dog runs on the grass.",  # PTB: lower-cased, "." dropped -> identical to its reference
    "purple elephants juggle quietly",  # 4 tokens, no word in common
    "a red apple\rsits on a wooden table",  # "\r" collapsed to a space -> identical
]
# BLEU-4, corpus level: clipped matches / candidate n-grams over the three samples
#   1-grams (7+0+8)/(7+4+8) = 15/19, 2-grams (6+0+7)/(6+3+7) = 13/16,
#   3-grams (5+0+6)/(5+2+6) = 11/13, 4-grams (4+0+5)/(4+1+5) = 9/10,
#   brevity penalty exp(1 - reflen/testlen) = exp(1 - 22/19).
EXPECTED_BLEU4 = (15 / 19 * 13 / 16 * 11 / 13 * 9 / 10) ** (1 / 4) * math.exp(1 - 22 / 19)  # 0.71390
EXPECTED_ROUGE_L = (1.0 + 0.0 + 1.0) / 3  # LCS F-measure per sample, averaged


@pytest.fixture(scope="module")
def mixed_captions():
    return caption_scores(PREDICTIONS, REFERENCES)


@pytest.fixture(scope="module")
def mixed_task():
    return score_task("cider", PREDICTIONS, [{"answers": refs} for refs in REFERENCES])


def test_caption_scores_golden_values(mixed_captions):
    assert mixed_captions.per_sample_cider == pytest.approx([10.0, 0.0, 10.0])
    assert set(mixed_captions.corpus) >= {"CIDEr", "BLEU-4", "ROUGE-L"}
    assert mixed_captions.corpus["CIDEr"] == pytest.approx(20 / 3)  # mean of the per-sample scores
    assert mixed_captions.corpus["BLEU-4"] == pytest.approx(EXPECTED_BLEU4, rel=1e-6)
    assert mixed_captions.corpus["ROUGE-L"] == pytest.approx(EXPECTED_ROUGE_L)


def test_caption_scores_perfect_beats_wrong(mixed_captions):
    perfect, wrong, _ = mixed_captions.per_sample_cider
    assert len(mixed_captions.per_sample_cider) == len(PREDICTIONS)
    assert perfect > wrong


def test_caption_scores_names_spice_as_skipped_without_its_jars(mixed_captions):
    if scoring._spice_jars_present():
        pytest.skip("Stanford CoreNLP jars are installed: SPICE runs")
    assert mixed_captions.skipped == {"SPICE": SPICE_SKIP_REASON}
    assert "SPICE" not in mixed_captions.corpus


def test_caption_scores_skips_spice_when_jars_are_absent(monkeypatch):
    monkeypatch.setattr(scoring, "_spice_jars_present", lambda: False)
    result = caption_scores(["dog", "dog"], [["dog"], ["cat"]])
    assert result.skipped == {"SPICE": SPICE_SKIP_REASON}
    assert "SPICE" not in result.corpus


def test_caption_scores_a_failing_optional_metric_is_named_not_fatal(monkeypatch):
    def broken(gts, res):
        raise RuntimeError("boom")

    monkeypatch.setattr(scoring, "_spice_jars_present", lambda: True)
    monkeypatch.setattr(scoring, "_spice", broken)
    result = caption_scores(["dog", "dog"], [["dog"], ["cat"]])
    assert result.skipped == {"SPICE": "SPICE failed: RuntimeError('boom')"}
    # "dog" vs "dog": idf log(2/1) > 0, unigram cosine 1, no higher orders: mean(1,0,0,0)*10 = 2.5
    assert result.per_sample_cider == pytest.approx([2.5, 0.0])
    assert set(result.corpus) == {"CIDEr", "BLEU-4", "ROUGE-L"}


def test_caption_scores_corpus_of_one_scores_zero():
    # idf = log(1) - log(df=1) = 0 for every n-gram (documented: a corpus of one caption scores 0)
    assert caption_scores(["a dog runs"], [["a dog runs"]]).per_sample_cider == [0.0]


@pytest.mark.parametrize("function", [caption_scores, cider_single_reference_scores])
def test_caption_inputs_are_checked(function):
    with pytest.raises(ValueError, match="no predictions to score"):
        function([], [])
    with pytest.raises(ValueError, match="1 predictions but 2 reference lists"):
        function(["a dog"], [["a dog"], ["a cat"]])
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        function(["a dog", "a cat"], [["a dog"]])
    with pytest.raises(ValueError, match="at least one reference caption"):
        function(["a dog"], [[]])


def test_cider_single_reference_keeps_the_best_reference():
    predictions = ["a black dog runs on the grass", "two people ride bikes down the street"]
    references = [
        ["purple elephants juggle quietly", "a black dog runs on the grass"],
        ["two people ride bikes down the street"],
    ]
    # Sample 0 keeps its second reference (identical to the prediction); scored swapped with the
    # idf over the two predictions ("the" is in both: idf 0, every other n-gram idf log 2), an
    # identical pair has cosine 1 at every order -> 10. Keeping the first reference would give 0.
    scores = cider_single_reference_scores(predictions, references)
    assert len(scores) == len(predictions)
    assert scores == pytest.approx([10.0, 10.0])


def test_cider_single_reference_counts_idf_over_the_predictions():
    predictions, references = ["dog", "dog"], [["dog"], ["cat"]]
    # Usual direction: idf over the references {dog}, {cat}: log(2/1) > 0 -> [2.5, 0] (see above).
    # Swapped: idf over the predictions {dog}, {dog}: "dog" gets log(2/2) = 0 -> every score 0.
    assert cider_single_reference_scores(predictions, references) == pytest.approx([0.0, 0.0])


def test_cider_single_reference_all_empty_predictions_score_zero():
    scores = cider_single_reference_scores(["", "  "], [["a dog runs"], ["a cat sits", "a cat"]])
    assert scores == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# score_task
# ---------------------------------------------------------------------------------------------


def test_score_task_sample_scorer():
    result = score_task("exact_match", ["Left", "right"], [{"answer": "left"}, {"answer": "left"}])
    assert result == TaskScores([1.0, 0.0], {}, {})


def test_score_task_unknown_scorer_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scorer 'bleu'; valid scorers: ") as error:
        score_task("bleu", ["x"], [{"answer": "x"}])
    for name in (*SAMPLE_SCORERS, *CORPUS_SCORERS):
        assert name in str(error.value)


def test_score_task_length_mismatch():
    with pytest.raises(ValueError, match="2 outputs but 1 samples"):
        score_task("exact_match", ["a", "b"], [{"answer": "a"}])
    with pytest.raises(ValueError, match="1 outputs but 2 samples"):
        score_task("cider", ["a"], [{"answers": ["a"]}, {"answers": ["b"]}])


def test_score_task_cider(mixed_task, mixed_captions):
    assert mixed_task.per_sample == pytest.approx([10.0, 0.0, 10.0])
    assert set(mixed_task.extra) >= {"CIDEr", "BLEU-4", "ROUGE-L"}
    assert mixed_task.extra["CIDEr"] == pytest.approx(20 / 3)
    assert mixed_task.extra["BLEU-4"] == pytest.approx(EXPECTED_BLEU4, rel=1e-6)
    assert mixed_task.extra["ROUGE-L"] == pytest.approx(EXPECTED_ROUGE_L)
    assert mixed_task.skipped == mixed_captions.skipped


def test_caption_mean_is_ucits_average_of_seven_metrics_matched_by_order():
    """Each prediction repeats its own reference, so matched by index (and only so) every n-gram finds its match: by
    hand BLEU-1..4 = 1 (brevity penalty 1), ROUGE-L = 1, CIDEr-D = 10 (equal tf-idf vectors, cosine 1 for each n,
    no length penalty; the captions share no n-gram, so every idf is log 3 > 0). METEOR comes from its Java tool
    (its fragmentation penalty keeps an exact match below 1); the score is the mean of the seven."""
    captions = ["a brown dog runs across green grass", "two children play football in a park", "an old man reads the newspaper"]
    result = score_task("caption_mean", captions, [{"answers": [caption]} for caption in captions])
    expected = {"BLEU-1": 1.0, "BLEU-2": 1.0, "BLEU-3": 1.0, "BLEU-4": 1.0, "ROUGE-L": 1.0, "CIDEr": 10.0}
    assert {name: result.extra[name] for name in expected} == pytest.approx(expected, rel=1e-6)
    assert 0.0 < result.extra["METEOR"] <= 1.0
    assert result.extra["caption_mean"] == pytest.approx((15.0 + result.extra["METEOR"]) / 7)
    assert sum(result.per_sample) / len(captions) == pytest.approx(result.extra["caption_mean"])  # the matrix records the mean
    assert "SPICE" in result.skipped


def test_one_meteor_process_serves_every_set_and_carries_nothing_between_them():
    """The Java tool starts once per process; a set scored after another scores as it does in a fresh process."""
    first = ["a brown dog runs across green grass", "two children play football in a park"]
    other = ["an old man reads the newspaper", "a red car parks by the station"]
    scoring._meteor_tool.cache_clear()
    fresh = score_task("caption_mean", first, [{"answers": [c]} for c in reversed(first)])
    tool = scoring._meteor_tool()
    score_task("caption_mean", other, [{"answers": [c]} for c in other])
    again = score_task("caption_mean", first, [{"answers": [c]} for c in reversed(first)])
    assert scoring._meteor_tool() is tool
    assert again.extra["METEOR"] == fresh.extra["METEOR"] and again.per_sample == fresh.per_sample


def test_score_task_cider_single_ref():
    samples = [{"answers": ["dog"]}, {"answers": ["cat"]}]
    result = score_task("cider_single_ref", ["dog", "dog"], samples)
    assert result.per_sample == pytest.approx([0.0, 0.0])
    assert result.extra == {"CIDEr": pytest.approx(0.0)}
