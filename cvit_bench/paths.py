"""Where cached data and base checkpoints live (the user's cache directory unless ``CVIT_BENCH_CACHE`` names one), and which names may become paths.

Suite, task and run names come from YAML files and the command line and end up as folder and
file names under a results directory, a cache or a leaderboard folder. They are limited to
:data:`SAFE_NAME`, and a path built from them is checked with :func:`inside` before anything is
written or deleted there, so no name can lead a write (or a ``--fresh`` clean-up) out of its root.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

CACHE_ENV = "CVIT_BENCH_CACHE"
from cvit_bench.registry import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SAFE_NAME_RULE = "1-128 characters of A-Z a-z 0-9 . _ -, not starting with '.' or '-'"


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a folder or file name (None when it can): no separators, no '..', no hidden or option-like names."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        return f"{name!r} is not a safe name ({SAFE_NAME_RULE})"
    return None


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refused (ConfigError naming both) when it would resolve outside ``root``."""
    root = Path(root)
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{path}: leaves {root}; refusing to write there")
    return path


def cache_dir() -> Path:
    """``$CVIT_BENCH_CACHE``, else the platform's user cache folder (``~/.cache/cvit-bench`` on Linux).

    Never a folder next to the code: an installed package's folder is site-packages. The
    Makefile sets ``CVIT_BENCH_CACHE`` to the checkout's ``.cache/`` (what ``make clean`` removes).
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    import platformdirs  # only needed without the override (tests and make targets always set it)

    return Path(platformdirs.user_cache_dir("cvit-bench", appauthor=False))


def config_hash(obj: object, length: int = 16) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (for error messages)."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def tree_hash(root: Path, recursive: bool = True) -> str:
    """Hash of every file's relative path and bytes under ``root`` (the data hash recorded in results); only its top level if not ``recursive``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (root.rglob("*") if recursive else root.glob("*")) if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
