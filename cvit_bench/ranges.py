"""Allowed ranges of numeric settings, checked where each value enters (command line, suite YAML, method options).

A number outside its range does not fail where it is used -- a negative step count trains
nothing and still writes complete results, a negative learning rate ascends the loss, a seed
of 2**32 crashes NumPy after the data is generated -- so every entry point checks it against
the range declared here or next to its field, and ``cvit-bench ls`` prints the same range.
Zero is a value like any other: no check treats it as "not given".
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval; a missing bound is unbounded. Values must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "any finite"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Choices:
    """The values a text setting allows (a method's mode switches); ``cvit-bench ls`` prints them as its range."""

    values: tuple[str, ...]

    def __contains__(self, value: object) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(self.values)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)  # shares and probabilities that must leave something: [0, 1)
SEED = Range(0, 2**32 - 1)  # what NumPy's and Python's seeding accept on every platform


def range_problem(where: str, value: object, allowed: Range | Choices, integer: bool = False) -> str | None:
    """``"WHERE: expected an integer >= 1, got 0"`` when ``value`` is not an (integer) number in ``allowed``, else None;
    for :class:`Choices`, ``"WHERE: expected one of a, b, got 'c'"``."""
    if isinstance(allowed, Choices):
        return None if value in allowed else f"{where}: expected {allowed}, got {value!r}"
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if (is_integer or not integer) and value in allowed:
        return None
    kind = "integer" if integer else "number"
    if allowed == ANY:
        return f"{where}: expected a finite {kind}, got {value!r}"
    return f"{where}: expected {'an' if integer else 'a'} {kind} {allowed}, got {value!r}"
