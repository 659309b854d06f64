"""``cvit-bench bench``: every method's training-step cost relative to ``seqlora``, its MFU, evaluation throughput and memory.

All methods run in one process on the same pre-collated batches of the suite's first
task (collation is excluded from the step time), after a few warm-up steps. Memory is
the peak of ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU it is the peak
growth of the process's resident set during that method's measurement, sampled every
5 ms (an upper bound that includes allocator caching).

MFU (model FLOPs utilisation) is a step's FLOPs over its time over the machine's fp32
matmul rate, measured once per bench rather than taken from a datasheet (on a CPU the
rate depends on the thread count and on what else runs). FLOPs are counted by torch's
``FlopCounterMode`` (matrix products, convolutions, attention; forward and backward) on
the timed batches again once the measurements are done, so the count neither slows the
timed steps nor misses the batches' differing padded lengths.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.evaluation.generate import generate
from cvit_bench.models.backend import load_model
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.models.clip_towers import ClipFeatures, prepare_clip
from cvit_bench.runner import build_method, declare_suite_tasks, seed_everything
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import Suite
from cvit_bench.training.batches import shuffled_batches
from cvit_bench.training.loop import make_optimizer, train_step

REFERENCE_METHOD = "seqlora"


@dataclass
class BenchRow:
    method: str
    step_ms: float | None  # None for methods that do not train
    relative_step: float | None
    eval_samples_per_s: float
    eval_tokens_per_s: float
    peak_memory_mb: float
    trainable_params: int
    gflop_per_step: float | None  # forward + backward FLOPs of a timed step (mean over the timed batches)
    mfu_percent: float | None  # step FLOPs / step time / the measured matmul peak


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or sampled RSS on a CPU."""

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, (self._process.memory_info().rss - self._start) / 2**20)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate in GFLOP/s: the best of ``repeats`` timed size x size products, current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # first call: thread pool start-up and allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def count_flops(work: Callable[[], Any]) -> int:
    """FLOPs of everything ``work`` runs, backward included, as ``FlopCounterMode`` counts them."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def mfu_percent(flops_per_step: float, step_seconds: float, peak_gflops: float) -> float:
    return 100 * flops_per_step / step_seconds / (peak_gflops * 1e9)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_method(suite: Suite, name: str, model_dir, base_hash: str, train_chunks, eval_samples, *, warmup: int, seed: int) -> dict:
    """Step time, FLOPs per step, eval throughput and peak memory of one method (absolute figures)."""
    seed_everything(seed)
    model, processor = load_model(model_dir)
    method = build_method(name, {}, suite.method_defaults.get(name))
    declare_suite_tasks(method, suite)
    if method.needs_clip():
        method.bind_clip(ClipFeatures(prepare_clip(suite, model_dir, base_hash)[0]))
    model = method.wrap_model(model, suite.task_names)
    method.bind_tokenizer(processor.tokenizer)
    collator = Collator(processor)
    task = suite.tasks[0].name
    collated = [(chunk, collator.train_batch(chunk)) for chunk in train_chunks]
    warm, timed = collated[:warmup], collated[warmup:]
    with PeakMemory() as memory:
        if method.trains():
            method.before_stage(1, (task,), model)
            model.train()
            optimizer, scheduler, trainable = make_optimizer(model, method, suite.training, len(train_chunks))

            def train_on(steps: list) -> None:
                for chunk, batch in steps:
                    train_step(model, method, [(chunk, batch)], optimizer, scheduler, trainable, suite.training.max_grad_norm)

            train_on(warm)
            _synchronize()
            start = time.perf_counter()
            train_on(timed)
            _synchronize()
            step_ms = 1000 * (time.perf_counter() - start) / len(timed)
        else:
            step_ms = None
        margin = suite.evaluation.max_new_tokens_margin
        start = time.perf_counter()
        _, tokens = generate(model, collator, eval_samples, batch_size=suite.evaluation.batch_size,
                             max_new_tokens=collator.target_length(eval_samples) + margin, batch_context=method.batch_context)
        _synchronize()
        eval_s = time.perf_counter() - start
    flops = None
    if step_ms is not None:  # counted after every measurement: the counter slows the steps it watches
        model.train()
        flops = count_flops(lambda: train_on(timed)) / len(timed)
    return {
        "step_ms": step_ms,
        "flops_per_step": flops,
        "eval_samples_per_s": len(eval_samples) / eval_s,
        "eval_tokens_per_s": tokens / eval_s,
        "peak_memory_mb": memory.peak_mb,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_benchmark(
    suite: Suite, methods: list[str], *, peak_gflops: float, steps: int = 20, warmup: int = 3, eval_samples: int = 64, seed: int = 0,
    report: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Measure ``methods`` (``seqlora`` is always included as the reference) on identical batches; MFU against ``peak_gflops``."""
    data = materialize(suite, seed)
    model_dir, base_hash = prepare_base(suite)
    first = suite.tasks[0]
    train_samples = phrase_all(data.records(first.name, "train"), first.name, first.template.training_phrasings(suite.instruction_setting))
    batches = shuffled_batches(train_samples, suite.training.batch_size, f"bench-{seed}")
    train_chunks = [next(batches) for _ in range(warmup + steps)]
    test_samples = phrase_all(data.records(first.name, "test"), first.name, first.template.training_phrasings(suite.instruction_setting))
    eval_samples = (test_samples * (eval_samples // len(test_samples) + 1))[:eval_samples]
    names = [REFERENCE_METHOD] + [m for m in methods if m != REFERENCE_METHOD]
    measured = {}
    for name in names:
        if report:
            report(name)
        measured[name] = bench_method(suite, name, model_dir, base_hash, train_chunks, eval_samples, warmup=warmup, seed=seed)
    reference = measured[REFERENCE_METHOD]["step_ms"]
    rows = []
    for name, m in measured.items():
        flops = m.pop("flops_per_step")
        trains = m["step_ms"] is not None
        rows.append(BenchRow(name, relative_step=m["step_ms"] / reference if trains else None, **m,
                             gflop_per_step=flops / 1e9 if trains else None,
                             mfu_percent=mfu_percent(flops, m["step_ms"] / 1000, peak_gflops) if trains else None))
    return rows


def rows_to_json(rows: list[BenchRow], suite: Suite, steps: int, warmup: int, peak_gflops: float) -> dict:
    from cvit_bench.runner import provenance

    return {"suite": suite.name, "reference": REFERENCE_METHOD, "steps": steps, "warmup": warmup,
            "batch_size": suite.training.batch_size, "matmul_peak_gflops": peak_gflops, **provenance(), "methods": [asdict(r) for r in rows]}
