"""Shared fixtures: a private cache per test session, so tests start from nothing like CI."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cvit-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("CVIT_BENCH_CACHE", str(cache))
    torch.set_num_threads(2)
    yield cache
    patcher.undo()
