"""Files that ship inside the package: suites, instruction templates, check bands, claims and the shipped base.

They live under ``cvit_bench/`` and are found through :mod:`importlib.resources`, so an
installed wheel carries and finds them exactly as a source checkout does (the checkout's
top-level ``task_suites/``, ``instruction_templates/`` and ``checks/`` are links to them, for
paths typed by hand and in the README).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SUITES = "task_suites"
TEMPLATES = "instruction_templates"
CHECKS = "checks"
BASES = "bases"
CLAIMS = "claims"


def shipped(folder: str) -> Path:
    """The package folder ``folder`` as a real path (suites are globbed and hashed as files, so a zipped install cannot serve)."""
    location = files("cvit_bench") / folder
    if not isinstance(location, Path):
        raise RuntimeError(f"cvit_bench is installed as an archive ({location}); install it unpacked (pip installs wheels unpacked)")
    return location
