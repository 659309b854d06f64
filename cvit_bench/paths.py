"""Where cached data and base checkpoints live (``CVIT_BENCH_CACHE`` overrides)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cvit_bench.suites.schema import REPO_ROOT


def cache_dir() -> Path:
    return Path(os.environ.get("CVIT_BENCH_CACHE", REPO_ROOT / ".cache"))


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
