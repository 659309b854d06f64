"""The embedded base checkpoint is the same whoever builds it first."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.suites.schema import load_suite

from conftest import SMOKE


def test_base_weights_do_not_depend_on_the_callers_thread_count(tmp_path, monkeypatch):
    """A sweep child (1 thread) and a plain run (all cores) may build the same cached base."""
    suite = load_suite(SMOKE)
    weights = []
    try:
        for threads in (2, 1):
            monkeypatch.setenv("CVIT_BENCH_CACHE", str(tmp_path / f"threads{threads}"))
            torch.set_num_threads(threads)
            directory, _ = prepare_base(suite)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            weights.append(load_file(directory / "model.safetensors"))
    finally:
        torch.set_num_threads(2)
    assert weights[0].keys() == weights[1].keys()
    assert [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])] == []
