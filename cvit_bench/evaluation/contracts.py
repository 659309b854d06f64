"""Instruction-following checks: did the raw output obey the phrasing's format contract?

Visual understanding is scored leniently elsewhere; these checks are strict on purpose, because
losing a task's output format is the instruction-following half of dual forgetting. Each check
sees the raw output with only surrounding whitespace stripped and explains a failure in words.

Contracts come in families that do not overlap: every reply belongs to exactly one family
(``reply_family``) and passes only contracts of that family. Without this, a model that answers
everything in the last task's format passes earlier tasks' contracts by accident (a single
letter passed ``uppercase``, and ``short`` accepted letters, upper-case labels and a truncated
``{"answer": "zip``), and instruction following could not tell methods apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ContractResult:
    """Pass/fail plus a short reason, so a failing prediction can be read, not just counted."""

    passed: bool
    reason: str


_OK = ContractResult(True, "ok")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BBOX = re.compile(r"\[\s*({0})\s*,\s*({0})\s*,\s*({0})\s*,\s*({0})\s*\]".format(_NUMBER))


def _fail(reason: str) -> ContractResult:
    return ContractResult(False, reason)


def _shown(text: str) -> str:
    """Quote an output in a reason, shortened so reasons stay one line."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _letter(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    if not re.fullmatch(r"[A-Z]", text):
        return _fail(f"expected a single option letter, got {_shown(text)}")
    if n_options is not None and ord(text) - ord("A") >= n_options:
        return _fail(f"option letter {text!r} is beyond the {n_options} options")
    return _OK


def _short(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    # SMoLoRA's rule: at most two words, or else the ground truth itself (ignoring case).
    if not text:
        return _fail("empty output")
    n_words = len(text.split())
    if n_words <= 2:
        return _OK
    if ground_truth is not None and text.lower() == ground_truth.strip().lower():
        return _OK
    return _fail(f"expected at most two words, got {n_words}: {_shown(text)}")


def _sentence(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    # SMoLoRA's caption rule: ends with "." and has more than four words.
    if not text.endswith("."):
        return _fail(f"expected a sentence ending with '.', got {_shown(text)}")
    n_words = len(text.split())
    if n_words <= 4:
        return _fail(f"expected more than four words, got {n_words}: {_shown(text)}")
    return _OK


def _yes_no(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    if text.lower() in ("yes", "no"):
        return _OK
    return _fail(f"expected 'yes' or 'no', got {_shown(text)}")


def _number(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    # ASCII digits only: str.isdigit would also accept '²'.
    if re.fullmatch(r"[0-9]+", text):
        return _OK
    return _fail(f"expected only digits, got {_shown(text)}")


def _uppercase(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    if not any(c.isalpha() for c in text):
        return _fail(f"expected upper-case letters, got {_shown(text)}")
    if text != text.upper():
        return _fail(f"expected all letters upper-case, got {_shown(text)}")
    n_words = len(text.split())
    if n_words <= 2 or (ground_truth is not None and text == ground_truth.strip().upper()):
        return _OK
    return _fail(f"expected at most two words, got {n_words}: {_shown(text)}")


def _json_answer(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return _fail(f"expected a JSON object, got {_shown(text)}")
    if not isinstance(parsed, dict) or list(parsed) != ["answer"]:
        keys = sorted(parsed) if isinstance(parsed, dict) else type(parsed).__name__
        return _fail(f"expected a JSON object whose only key is 'answer', got {keys}")
    if not isinstance(parsed["answer"], str):
        return _fail(f"expected a string under 'answer', got {type(parsed['answer']).__name__}")
    return _OK


def _bbox(text: str, ground_truth: str | None, n_options: int | None) -> ContractResult:
    match = _BBOX.fullmatch(text)
    if match is None:
        return _fail(f"expected '[x1, y1, x2, y2]', got {_shown(text)}")
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        return _fail(f"expected coordinates in [0, 1], got {_shown(text)}")
    if not (x1 < x2 and y1 < y2):
        return _fail(f"expected x1 < x2 and y1 < y2, got {_shown(text)}")
    return _OK


def _lowercase_sentence(
    text: str, ground_truth: str | None, n_options: int | None
) -> ContractResult:
    result = _sentence(text, ground_truth, n_options)
    if result.passed and any(c.isupper() for c in text):
        return _fail(f"expected all letters lower-case, got {_shown(text)}")
    return result


# Each contract's family; contracts of one family are refinements of one answer form.
FAMILIES: dict[str, str] = {
    "letter": "letter",
    "short": "short",
    "yes_no": "short",
    "number": "short",
    "sentence": "sentence",
    "lowercase_sentence": "sentence",
    "uppercase": "uppercase",
    "json_answer": "json",
    "bbox": "bbox",
}
_LETTER_SHAPED = re.compile(r"\(?[A-Z]\)?[.:)]?")  # "B", "B.", "(B)", "B)": an option letter, however decorated


def reply_family(text: str) -> str:
    """The one contract family a reply belongs to (surrounding whitespace ignored); the first matching rule decides.

    JSON-like (starts with "{"), box-like (starts with "["), an option letter, a sentence (ends with
    "." and has more than four words), upper-case (letters, none lower-case), else a short answer.
    """
    text = text.strip()
    if text.startswith("{"):
        return "json"
    if text.startswith("["):
        return "bbox"
    if _LETTER_SHAPED.fullmatch(text):
        return "letter"
    if text.endswith(".") and len(text.split()) > 4:
        return "sentence"
    if any(c.isalpha() for c in text) and not any(c.islower() for c in text):
        return "uppercase"
    return "short"


_CHECKERS: dict[str, Callable[[str, str | None, int | None], ContractResult]] = {
    "letter": _letter,
    "short": _short,
    "sentence": _sentence,
    "yes_no": _yes_no,
    "number": _number,
    "uppercase": _uppercase,
    "json_answer": _json_answer,
    "bbox": _bbox,
    "lowercase_sentence": _lowercase_sentence,
}

CONTRACTS: tuple[str, ...] = tuple(_CHECKERS)


def check_contract(
    contract: str,
    output: str,
    *,
    ground_truth: str | None = None,
    n_options: int | None = None,
) -> ContractResult:
    """Check `output` against a named format contract.

    `ground_truth` lets `short` and `uppercase` accept a longer answer that is exactly right
    (SMoLoRA's rule); `n_options` bounds the `letter` contract to the options offered. A reply
    that obeys the contract's own rule still fails when it belongs to another family.
    """
    checker = _CHECKERS.get(contract)
    if checker is None:
        raise ValueError(f"unknown contract {contract!r}; valid contracts: {', '.join(CONTRACTS)}")
    text = output.strip()
    result = checker(text, ground_truth, n_options)
    family = reply_family(text)
    if result.passed and family != FAMILIES[contract]:
        return _fail(f"{_shown(text)} is a {family} reply, not a {FAMILIES[contract]} one")
    return result
