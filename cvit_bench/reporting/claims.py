"""Which published claims a leaderboard supports, computed from its rows rather than written by hand.

A claim is data (a file in ``cvit_bench/claims/`` naming the ``suites`` it is tested on): its statement, where it
comes from, and the metric comparisons it needs ("smolora's BWT above seqlora's"). A comparison *holds* when the claimed difference is at
least the smallest difference the board's seeds can detect (``power.detectable_difference``: 80 % power, two-sided
5 %), *does not hold* when it goes the other way by as much, and is *not shown* in between; it is *not run* when a
method or metric is missing. A claim holds when all its comparisons hold and fails when any fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cvit_bench.registry import ConfigError
from cvit_bench.reporting.power import detectable_difference
from cvit_bench.resources import CLAIMS, shipped

HOLDS, FAILS, NOT_SHOWN, NOT_RUN = "holds", "does not hold", "not shown", "not run"
DIRECTIONS = ("higher", "lower")
_CLAIM_KEYS = {"statement", "source", "compare"}
_COMPARE_KEYS = {"method", "than", "metric", "better"}


@dataclass(frozen=True)
class Comparison:
    """``method``'s ``metric`` is ``better`` (higher or lower) than ``than``'s."""

    method: str
    than: str
    metric: str
    better: str = "higher"


@dataclass(frozen=True)
class Claim:
    statement: str
    source: str
    compare: tuple[Comparison, ...]


def load_claims(suite: str, folder: Path | None = None) -> list[Claim]:
    """The claims of every claims file that lists ``suite`` (none when no file does); a problem names the file and field."""
    claims = []
    for path in sorted((folder or shipped(CLAIMS)).glob("*.yaml")):
        suites, entries = _read_claims_file(path)
        if suite in suites:
            claims += [_claim(entry, f"{path}: claims[{i}]") for i, entry in enumerate(entries)]
    return claims


def _read_claims_file(path: Path) -> tuple[list[str], list[Any]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict) or set(data) != {"suites", "claims"}:
        raise ConfigError(f"{path}: expected the keys suites (a list of suite names) and claims")
    if not isinstance(data["suites"], list) or not all(isinstance(name, str) for name in data["suites"]):
        raise ConfigError(f"{path}: suites: expected a list of suite names")
    if not isinstance(data["claims"], list):
        raise ConfigError(f"{path}: claims: expected a list of {{statement, source, compare}} mappings")
    return data["suites"], data["claims"]


def _claim(entry: Any, where: str) -> Claim:
    if not isinstance(entry, dict) or set(entry) - _CLAIM_KEYS:
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(_CLAIM_KEYS))}")
    for key in ("statement", "source"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ConfigError(f"{where}.{key}: expected a non-empty string")
    compare = entry.get("compare")
    if not isinstance(compare, list) or not compare:
        raise ConfigError(f"{where}.compare: expected a non-empty list of {{method, than, metric, better}}")
    return Claim(entry["statement"], entry["source"], tuple(_comparison(c, f"{where}.compare[{j}]") for j, c in enumerate(compare)))


def _comparison(entry: Any, where: str) -> Comparison:
    if not isinstance(entry, dict) or set(entry) - _COMPARE_KEYS:
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(_COMPARE_KEYS))}")
    for key in ("method", "than", "metric"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}.{key}: expected a method or metric name")
    better = entry.get("better", "higher")
    if better not in DIRECTIONS:
        raise ConfigError(f"{where}.better: expected one of {', '.join(DIRECTIONS)}, got {better!r}")
    return Comparison(entry["method"], entry["than"], entry["metric"], better)


def comparison_verdict(comparison: Comparison, board: pd.DataFrame) -> tuple[str, str]:
    """(verdict, evidence) of one comparison on a leaderboard (``build_leaderboard``'s rows)."""
    rows = board.set_index("method")
    column = f"{comparison.metric}_mean"
    missing = [m for m in (comparison.method, comparison.than) if m not in rows.index]
    if missing or column not in rows.columns or rows.loc[[comparison.method, comparison.than], column].isna().any():
        what = f"no {', '.join(missing)} row" if missing else f"no {comparison.metric}"
        return NOT_RUN, what
    mine, theirs = float(rows.at[comparison.method, column]), float(rows.at[comparison.than, column])
    gain = (mine - theirs) * (1 if comparison.better == "higher" else -1)
    evidence = f"{comparison.method} {comparison.metric} {mine:.1f} vs {comparison.than} {theirs:.1f}"
    detectable = detectable_difference(board, comparison.metric)
    if detectable is None:
        return NOT_SHOWN, f"{evidence}; fewer than two seeds, no spread to test against"
    difference, n_seeds = detectable
    evidence += f" ({comparison.better} is better; detectable with {n_seeds} seeds: {difference:.1f})"
    if gain >= difference:
        return HOLDS, evidence
    return (FAILS, evidence) if gain <= -difference else (NOT_SHOWN, evidence)


def claim_verdict(verdicts: list[str]) -> str:
    """A claim fails when one comparison fails, is untested while one is not run, and holds only when all hold."""
    if FAILS in verdicts:
        return FAILS
    if NOT_RUN in verdicts:
        return NOT_RUN
    return HOLDS if all(v == HOLDS for v in verdicts) else NOT_SHOWN


def claims_table(claims: list[Claim], board: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: its statement, source, verdict and the evidence of each comparison."""
    rows = []
    for claim in claims:
        results = [comparison_verdict(comparison, board) for comparison in claim.compare]
        rows.append({"claim": claim.statement, "source": claim.source, "verdict": claim_verdict([v for v, _ in results]),
                     "evidence": "; ".join(f"{evidence}: {verdict}" for verdict, evidence in results)})
    return pd.DataFrame(rows, columns=["claim", "source", "verdict", "evidence"])
