"""The MLLM-CL benchmarks' answer rules (MLLM-DCL: RS, Med, AD, Sci, Fin; MLLM-ACL: OCR, Math, VP), as pure functions.

Each rule follows the authors' evaluation scripts (github.com/bjzhb666/MLLM-CL, ETrain/Eval/LLaVA/CoIN/eval_*.py)
or, where the stored copy of a script differs, the rule ../shared/REFERENCE-FIELD.md records from a later one; each
docstring says which. Every function takes a reply and the sample's scoring fields (``Sample.scoring_fields``: the
answer(s), options, the prompt as sent, the image's file name and the record's ``meta``) and returns a score in [0, 1].
The rules are the benchmark's, quirks included; a quirk is named where it is kept.
"""
from __future__ import annotations

import math

# Every MLLM-DCL script skips a reply containing this word before comparing, while still counting it: it scores 0.
# The check is on the raw reply, case-sensitive, as the scripts do it (`'Unanswerable' in result['text']`).
UNANSWERABLE = "Unanswerable"
# eval_sci.py: images whose file name starts with one of these (before the first "_") are scored by exact match;
# every other image is MapQA's.
SCI_EXACT_SOURCES = frozenset({"AI2D", "TQA", "VQA"})
MAPQA_LIST_QUESTION = "Which states"
HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"  # the OCRBench category compared as is
# VLMEvalKit's MathVista prefetch (copied into eval_math.py): these characters split a reply into words.
_OPTION_SEPARATORS = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def refuses(reply: str) -> bool:
    """A DCL reply that says "Unanswerable" anywhere, which every DCL script counts as wrong."""
    return UNANSWERABLE in reply


def word_or_substring_score(reply: str, sample: dict) -> float:
    """RS and AD (MLLM-DCL): lower-cased; a multi-word answer must be a substring of the reply; a one-word answer
    (its final "." dropped) must stand as a word (" a", "a ", "a." or "a," in the reply), or be a substring when
    the reply itself is one word.

    The rule of REFERENCE-FIELD.md. The copy of eval_ai2d.py read (MLLM-CL commit 39e063a) scores every answer as a
    plain substring; the word rule is the later one, so a one-word answer inside a longer word ("car" in "cart")
    counts here only when the reply is that one word.
    """
    if refuses(reply):
        return 0.0
    text, answer = reply.strip().lower(), sample["answer"].strip().lower()
    if len(answer.split()) > 1:
        return float(answer in text)
    answer = answer.removesuffix(".")
    if not answer:
        return 0.0
    if len(text.split()) <= 1:
        return float(answer in text)
    return float(any(form in text for form in (f" {answer}", f"{answer} ", f"{answer}.", f"{answer},")))


def contains_answer_score(reply: str, sample: dict) -> float:
    """Med (MLLM-DCL, eval_pvqa.py): the lower-cased answer is a substring of the lower-cased reply."""
    if refuses(reply):
        return 0.0
    return float(sample["answer"].lower() in reply.lower())


def science_score(reply: str, sample: dict) -> float:
    """Sci (MLLM-DCL, eval_sci.py), by the image's source (its file name up to the first "_"): AI2D, TQA and VQA
    need the lower-cased reply to equal the answer; MapQA questions with "Which states" in the prompt score the share
    of the answer's comma-separated items found among the reply's; other MapQA questions need the answer as a substring.

    Kept quirk: the items are split on "," without stripping, so "ohio, texas" holds " texas", which a reply
    "texas, ohio" (items "texas", " ohio") does not contain; the order and spacing of a list matter.
    """
    if refuses(reply):
        return 0.0
    text, answer = reply.lower(), sample["answer"].lower()
    if sample["image"].split("/")[-1].split("_")[0] in SCI_EXACT_SOURCES:
        return float(text == answer)
    if MAPQA_LIST_QUESTION in sample["prompt"]:
        wanted, given = answer.split(","), text.split(",")
        return sum(item in given for item in wanted) / len(wanted)
    return float(answer in text)


def finance_score(reply: str, sample: dict) -> float:
    """Fin (MLLM-DCL): the reply, lower-cased with its spaces and "." removed, equals the lower-cased answer
    (a yes/no word or an option letter).

    The rule of REFERENCE-FIELD.md, from a later eval_finvis.py; the copy read (MLLM-CL commit 5708d02) compares the
    lower-cased reply as is, so "B." scores 0 there and 1 here.
    """
    if refuses(reply):
        return 0.0
    return float(reply.lower().replace(" ", "").replace(".", "") == sample["answer"].lower())


def ocr_score(reply: str, sample: dict) -> float:
    """OCR (MLLM-ACL, OCRBench's rule in eval_ocr.py): 1 when any answer is a substring of the reply, both
    lower-cased, stripped and without line breaks; the handwritten-math category keeps its case and drops all spaces."""
    handwritten_math = sample["meta"].get("answer_type") == HANDWRITTEN_MATH
    for answer in sample["answers"]:
        if handwritten_math:
            found = _without_spaces(answer) in _without_spaces(reply)
        else:
            found = answer.lower().strip().replace("\n", "") in reply.lower().strip().replace("\n", "")
        if found:
            return 1.0
    return 0.0


def _without_spaces(text: str) -> str:
    return text.strip().replace(" ", "").replace("\n", "")


def spatial_score(reply: str, sample: dict) -> float:
    """VP (MLLM-ACL, CV-Bench, eval_sat.py): with spaces, line breaks and "." removed and lower-cased, the answer is a
    substring of the reply."""
    return float(_squeezed(sample["answer"]) in _squeezed(reply))


def _squeezed(text: str) -> str:
    return text.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")


def math_rule_score(reply: str, sample: dict) -> float:
    """Math (MLLM-ACL, MathVista): 1 when MathVista's rules confirm the reply, else 0.

    The rules are VLMEvalKit's prefetch, as eval_math.py copies it: a multiple-choice reply names exactly one option
    letter as a word (after the separators ``.()[],:;!*#{}`` become spaces), or else contains exactly one option's
    text; an integer or float answer equals ``int(reply)`` / ``float(reply)``. Whatever the rules do not confirm goes
    to an LLM judge in the authors' evaluation; that judge is not run offline (the suite declares it not computed),
    so those items score 0 and this is a lower bound of the published Math score.
    """
    meta = sample["meta"]
    if meta.get("question_type") == "multi_choice":
        options = sample["options"]
        letters = [chr(ord("A") + i) for i in range(len(options))]
        return float(_inferred_letter(reply, dict(zip(letters, options))) == letters[options.index(sample["answer"])])
    kind = {"integer": int, "float": float}.get(meta.get("answer_type"))
    if kind is None:
        return 0.0
    try:
        return float(kind(reply) == kind(sample["answer"]))
    except ValueError:
        return 0.0


def _inferred_letter(reply: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer``: the one option letter named in ``reply``, else the one option whose text it contains."""
    if any(refusal in reply for refusal in _REFUSALS):
        return "Z"
    words = reply
    for separator in _OPTION_SEPARATORS:
        words = words.replace(separator, " ")
    named = [letter for letter in choices if letter in words.split()]
    if len(named) == 1:
        return named[0]
    if not named and "Z" in words.split():
        return "Z"
    lowered = reply.lower()
    containing = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return containing[0] if len(containing) == 1 else None


def not_computed_score(reply: str, sample: dict) -> float:
    """A task scored only where cvit-bench cannot score it (APP: a remote server): NaN, a cell left empty, so the
    replies are kept in predictions.jsonl and no number stands in for the real one."""
    return math.nan


def problem(scorer: str, sample: dict) -> str | None:
    """The field an MLLM-CL scorer needs that ``sample`` lacks, or None (see ``scoring.sample_problem``).

    The fields live in the record's ``meta``; a caller that passes no ``meta`` gets no verdict on them.
    """
    meta = sample.get("meta")
    if meta is None:
        return None
    if scorer == "mllm_math_rules":
        kind = meta.get("question_type")
        if kind not in ("multi_choice", "free_form"):
            return f"meta.question_type: mllm_math_rules needs 'multi_choice' or 'free_form', got {kind!r}"
        if kind == "multi_choice" and sample["answer"] not in sample["options"]:
            return f"answer: a multiple-choice answer must be one of the options {sample['options']}, got {sample['answer']!r}"
    if scorer == "mllm_ocr" and not isinstance(meta.get("answer_type"), str):
        return "meta.answer_type: mllm_ocr needs the OCRBench category of each record (the release's answer_type)"
    return None
