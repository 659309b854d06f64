"""Where cached data and base checkpoints live: the user's cache directory unless ``CVIT_BENCH_CACHE`` names one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_ENV = "CVIT_BENCH_CACHE"


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
