"""Shared fixtures: a private cache per test session, so tests start from nothing like CI."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pytest
import torch

# SMoLoRA needs its extra (`pip install 'cvit-bench[smolora]'`), which the floors venv (.ci/test-floors) leaves out.
needs_smolora = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None, reason="sentence-transformers (cvit-bench[smolora]) is not installed"
)

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


@pytest.fixture(scope="session")
def short_suite(tmp_path_factory) -> tuple[Path, Path]:
    """A suite of two smoke tasks (four training samples, two test items, two steps a stage) and the smoke base:
    seconds per method run, every hook still runs."""
    import yaml

    from cvit_bench.models.base_checkpoint import prepare_base
    from cvit_bench.suites.schema import SUITES_DIR, load_suite

    directory = tmp_path_factory.mktemp("short")
    data = yaml.safe_load((SUITES_DIR / f"{SMOKE}.yaml").read_text())
    data.update(name="short", training={"steps_per_task": 2, "batch_size": 2, "lr": 0.0003, "warmup_steps": 1}, evaluation={"batch_size": 4},
                tasks=[{"name": n, "kind": n, "template": n, "scorer": s, "train_size": 4, "test_size": 2}
                       for n, s in (("mcq", "option_letter"), ("vqa", "vqa_accuracy"))], unseen=[])
    path = directory / "short.yaml"
    path.write_text(yaml.safe_dump(data))
    model_dir, _ = prepare_base(load_suite(SMOKE))
    return path, model_dir


@pytest.fixture(scope="session")
def smoke_setup():
    """cvit-v1-smoke, its base checkpoint and its seed-0 data: what the methods' mechanism tests train on."""
    from cvit_bench.models.base_checkpoint import prepare_base
    from cvit_bench.suites.materialize import materialize
    from cvit_bench.suites.schema import load_suite

    suite = load_suite(SMOKE)
    model_dir, _ = prepare_base(suite)
    return suite, model_dir, materialize(suite, 0)


def phrased(suite, data, split: str, phrasings: Callable) -> dict:
    """Every task's ``split`` records phrased with ``phrasings(task)``, by task name."""
    from cvit_bench.data.samples import phrase_all

    return {task.name: phrase_all(data.records(task.name, split), task.name, phrasings(task)) for task in suite.tasks}


@pytest.fixture(scope="module")
def smoke(smoke_setup):
    """The smoke setup with every task's training records in the single phrasing: (suite, base checkpoint, samples by task)."""
    suite, model_dir, data = smoke_setup
    return suite, model_dir, phrased(suite, data, "train", lambda task: task.template.training_phrasings("single"))


def fresh_method(smoke, method_name: str, **options):
    """The smoke base, freshly loaded under seed 0 and wrapped by ``method_name``: (model, method, collator)."""
    import torch

    from cvit_bench.data.collate import Collator
    from cvit_bench.models.backend import load_model
    from cvit_bench.runner import build_method

    suite, model_dir, _ = smoke
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    method = with_clip(build_method(method_name, options), suite)
    return method.wrap_model(model, suite.task_names), method, Collator(processor)


def with_clip(method, suite):
    """``method`` with the suite's tiny CLIP bound when it reads CLIP features (as the runner binds it before wrap_model)."""
    from cvit_bench.models.base_checkpoint import prepare_base
    from cvit_bench.models.clip_towers import ClipFeatures, prepare_clip

    if method.needs_clip():
        method.bind_clip(ClipFeatures(prepare_clip(suite, *prepare_base(suite))[0]))
    return method


def tiny_run_on_converted(suite, data_root: Path, tmp_path: Path) -> dict:
    """One seqlora step per task of a real-format suite on converted files, with a tiny model whose tokenizer is trained on
    those files and the suite's phrasings; the run's results.json."""
    import dataclasses

    from cvit_bench.io import read_json
    from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer
    from cvit_bench.runner import RunOptions, run

    texts = [p.read_text() for p in data_root.rglob("*.json")] + [p.prompt for t in suite.tasks + suite.unseen for p in t.template.train]
    config = TinyLlavaConfig(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
                             text_layers=1, text_heads=2, text_intermediate=64, vocab_size=300, max_positions=1024)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    save_tiny(build_model(tokenizer, config), build_processor(tokenizer, config), tmp_path / "model")
    suite = dataclasses.replace(suite, training=dataclasses.replace(suite.training, batch_size=2))
    run_dir = run(RunOptions(suite, "seqlora", 0, tmp_path / "results", model=str(tmp_path / "model"), data_root=data_root,
                             steps_per_task=1, threads=1))
    return read_json(run_dir / "results.json")
