"""``cvit-bench check``: re-run a fixed set of methods and seeds and compare every metric with its recorded band.

Bands come from the seed spread: ``check --record`` runs each method with several seeds and
stores, per metric, mean ± max(k · std, floor) in ``checks/<suite>.yaml``. A check then re-runs
the file's methods with its check seeds and fails, with a readable table of what left its
band, when any value falls outside. Besides the leaderboard metrics it checks the mean final
training loss of the stages, which moves whenever training breaks even where accuracies
cannot (a small suite's accuracies are coarse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvit_bench.io import atomic_write_text
from cvit_bench.registry import ConfigError
from cvit_bench.suites.orders import TaskOrder
from cvit_bench.resources import CHECKS, shipped

CHECKS_DIR = shipped(CHECKS)
CHECK_METRICS = ("AP", "MAP", "MFT", "BWT", "MIF", "IF-AP", "unseen_AP", "heldout_AP", "final_loss")
# The narrowest band half-width per metric: points for scores, nats for the loss. Keeps a metric
# that happens to agree across the recorded seeds from failing on an unrelated machine's rounding.
FLOORS = {metric: 1.0 for metric in CHECK_METRICS} | {"final_loss": 0.02}


@dataclass(frozen=True)
class Band:
    low: float
    high: float

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Bands:
    suite: str
    check_seeds: tuple[int, ...]
    bands: dict[str, dict[str, Band]]  # method -> metric -> band
    path: Path
    recorded_seeds: tuple[int, ...] = ()
    k: float | None = None


@dataclass(frozen=True)
class Violation:
    method: str
    seed: int
    metric: str
    value: float | None
    band: Band


def check_values(result: dict[str, Any]) -> dict[str, float | None]:
    """The checked numbers of one results.json: its metrics and the mean final loss over training stages."""
    values = {metric: result["metrics"].get(metric) for metric in CHECK_METRICS if metric != "final_loss"}
    losses = [stage["final_loss"] for stage in result["stages"] if "final_loss" in stage]
    values["final_loss"] = float(np.mean(losses)) if losses else None
    return values


def derive_bands(results: dict[str, list[dict[str, Any]]], k: float) -> dict[str, dict[str, Band]]:
    """Per method and metric: mean ± max(k · sample std, floor) over the recorded seeds."""
    bands: dict[str, dict[str, Band]] = {}
    for method, runs in sorted(results.items()):
        if len(runs) < 2:
            raise ConfigError(f"check --record: {method} needs at least two seeds to measure a spread, got {len(runs)}")
        bands[method] = {}
        for metric in CHECK_METRICS:
            values = [check_values(run)[metric] for run in runs]
            if any(v is None for v in values):
                continue  # undefined on this suite (e.g. no unseen tasks)
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
            half = max(k * std, FLOORS[metric])
            bands[method][metric] = Band(round(mean - half, 4), round(mean + half, 4))
    return bands


def compare(results: dict[str, list[dict[str, Any]]], bands: Bands) -> list[Violation]:
    """Every checked value outside its band (a missing or undefined value counts as outside)."""
    violations = []
    for method, runs in sorted(results.items()):
        for run in runs:
            values = check_values(run)
            for metric, band in bands.bands[method].items():
                value = values.get(metric)
                if value is None or (isinstance(value, float) and math.isnan(value)) or not band.holds(value):
                    violations.append(Violation(method, run["run_info"]["seed"], metric, value, band))
    return violations


def bands_path(suite: str, order: TaskOrder | None = None) -> Path:
    """``checks/<suite>.yaml``; a non-default task order has its own bands, ``checks/<suite>-order-<name>.yaml``."""
    return CHECKS_DIR / (f"{suite}.yaml" if order is None else f"{suite}-order-{order.name}.yaml")


def kept_bands(path: Path, methods: list[str], seeds: list[int], k: float) -> dict[str, dict[str, Band]]:
    """The bands of an existing file that a partial ``--record`` keeps: those of the methods not re-recorded.

    Every method's band in one file must come from the same seeds and k, so re-recording a subset
    with different ones is refused (before anything runs) instead of silently mixing spreads.
    """
    if not path.is_file():
        return {}
    existing = load_bands(path)
    others = {name: per for name, per in existing.bands.items() if name not in methods}
    if others and (existing.recorded_seeds != tuple(seeds) or existing.k != k):
        raise ConfigError(
            f"{path}: recorded_seeds {list(existing.recorded_seeds)} and k {existing.k} differ from --seeds {seeds} and --k {k}; "
            f"record with the file's seeds and k, or re-record all its methods ({', '.join(sorted(existing.bands))}) together")
    return others


def write_bands(path: Path, suite: str, seeds: list[int], check_seeds: list[int], k: float, bands: dict[str, dict[str, Band]],
                order: TaskOrder | None = None) -> None:
    document = {
        "suite": suite,
        **({"order": order.spec} if order else {}),
        "recorded_seeds": seeds,
        "check_seeds": check_seeds,
        "k": k,
        "floors": FLOORS,
        "methods": {m: {metric: [b.low, b.high] for metric, b in per.items()} for m, per in sorted(bands.items())},
    }
    command = f"cvit-bench check --suite {suite}" + (f" --order {order.spec}" if order else "")
    header = (f"# Regression bands for `{command}`: per method and metric [low, high] =\n"
              f"# mean +- max(k * std, floor) over the recorded seeds. Rewrite with `{command} --record`.\n")
    atomic_write_text(path, header + yaml.safe_dump(document, sort_keys=False))


def load_bands(path: Path) -> Bands:
    """Read a bands file; a malformed one fails naming the file and field."""
    if not path.is_file():
        raise ConfigError(f"{path}: no bands recorded for this suite (run `cvit-bench check --suite SUITE --record`)")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML ({error})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping")
    for key in ("suite", "check_seeds", "methods"):
        if key not in document:
            raise ConfigError(f"{path}: {key}: missing")
    bands: dict[str, dict[str, Band]] = {}
    for method, per in (document["methods"] or {}).items():
        bands[method] = {}
        for metric, pair in (per or {}).items():
            if metric not in CHECK_METRICS:
                raise ConfigError(f"{path}: methods.{method}.{metric}: unknown metric (known: {', '.join(CHECK_METRICS)})")
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair) and pair[0] <= pair[1]):
                raise ConfigError(f"{path}: methods.{method}.{metric}: expected [low, high] with low <= high, got {pair!r}")
            bands[method][metric] = Band(float(pair[0]), float(pair[1]))
    k = document.get("k")
    return Bands(str(document["suite"]), tuple(int(s) for s in document["check_seeds"]), bands, path,
                 tuple(int(s) for s in document.get("recorded_seeds") or ()), None if k is None else float(k))
