"""constraints/floors.txt pins exactly the lower bounds pyproject.toml declares, so `make test-floors` tests those."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, Version]:
    """Each [project] dependency's `>=` bound, by canonical name."""
    floors = {}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        (bound,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        floors[canonicalize_name(requirement.name)] = Version(bound)
    return floors


def pinned_floors() -> dict[str, Version]:
    """Each `name==version` line of constraints/floors.txt, by canonical name."""
    pins = {}
    for line in (REPO / "constraints" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (pin,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            pins[canonicalize_name(requirement.name)] = Version(pin)
    return pins


def test_the_floor_constraints_equal_pyprojects_lower_bounds():
    assert pinned_floors() == declared_floors()
