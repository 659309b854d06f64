"""Shared fixtures: a private cache per test session, so tests start from nothing like CI."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

SMOKE = "cvit-v1-smoke"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cvit-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("CVIT_BENCH_CACHE", str(cache))
    torch.set_num_threads(2)
    yield cache
    patcher.undo()


@pytest.fixture(scope="session")
def uninterrupted_smoke(tmp_path_factory) -> Callable[[str], tuple[dict, Path]]:
    """Uninterrupted seed-0 cvit-v1-smoke runs, one per method, shared by every test that compares against one."""
    from cvit_bench.io import read_json
    from cvit_bench.runner import RunOptions, run
    from cvit_bench.suites.schema import load_suite

    runs: dict[str, tuple[dict, Path]] = {}

    def get(method: str) -> tuple[dict, Path]:
        if method not in runs:
            run_dir = run(RunOptions(load_suite(SMOKE), method, 0, tmp_path_factory.mktemp(f"smoke-{method}")))
            runs[method] = read_json(run_dir / "results.json"), run_dir
        return runs[method]

    return get
