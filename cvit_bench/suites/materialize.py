"""Materialize a suite's data: generate the synthetic suite into the cache, or locate a real one.

Generated data is keyed by the suite's data settings, task sizes and the
generator's source, written to a temporary folder and renamed, so a killed
generation never leaves a folder that looks finished.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cvit_bench.data.llava_format import DataError, Record, read_llava_json
from cvit_bench.paths import cache_dir, config_hash, tree_hash
from cvit_bench.suites import synthetic
from cvit_bench.suites.schema import Suite, TaskSpec

PRETRAIN_TASK = "pretrain"


@dataclass(frozen=True)
class SuiteData:
    """Where each task's LLaVA-format files are, the hash of all of them, and the hash of how they were made.

    Generated data differs per run seed by design, so runs of different seeds share a
    ``recipe_hash`` (generator, sizes, suite seed) but not a ``data_hash``; for real data the
    two are the same content hash.
    """

    root: Path
    data_hash: str
    recipe_hash: str

    def records(self, task: str, split: str) -> list[Record]:
        folder = self.root / task
        return read_llava_json(folder / f"{split}.json", folder)


def _generator_fingerprint() -> str:
    return hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:16]


def _task_sizes(task: TaskSpec) -> dict[str, int]:
    sizes = {"train": task.train_size} if task.train_size else {}
    if max(task.shots) > 0:
        sizes["train"] = max(sizes.get("train", 0), 4 * max(task.shots))
    sizes["test"] = task.test_size
    return sizes


def _generate(name: str, plan: dict[str, tuple[str, dict[str, int]]], seed: int, image_size: int, recipe_seed: int) -> SuiteData:
    """Generate ``plan`` (task -> kind, sizes) once into the cache; a staging folder is renamed when complete."""
    recipe = {"image_size": image_size, "plan": plan, "generator": _generator_fingerprint()}
    key = config_hash({"seed": seed, **recipe})
    root = cache_dir() / "data" / f"{name}-{key}"
    if not (root / "DATA_HASH").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
        try:
            for task, (kind, sizes) in sorted(plan.items()):
                task_seed = int(config_hash({"seed": seed, "task": task}, 8), 16)
                synthetic.generate_task(kind, sizes, task_seed, staging / task, image_size=image_size)
            (staging / "DATA_HASH").write_text(tree_hash(staging))
            try:
                staging.rename(root)
            except OSError:  # another process finished the same data first; theirs is identical and may be in use
                if not (root / "DATA_HASH").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return SuiteData(root, (root / "DATA_HASH").read_text().strip(), config_hash({"suite_seed": recipe_seed, **recipe}))


def materialize(suite: Suite, seed: int, data_root: Path | None = None) -> SuiteData:
    """The suite's task data: generated from (suite seed, run seed) for synthetic suites, else read from ``data_root``."""
    if suite.data_source == "llava":
        if data_root is None:
            raise DataError(f"{suite.path}: suite {suite.name!r} reads real data: pass --data-root")
        digest = tree_hash(Path(data_root))
        return SuiteData(Path(data_root), digest, digest)
    plan = {task.name: (task.kind, _task_sizes(task)) for task in suite.tasks + suite.unseen}
    return _generate(suite.name, plan, suite.seed * 1_000_003 + seed, suite.image_size, suite.seed)


def materialize_pretrain_corpus(suite: Suite, size: int) -> SuiteData:
    """The base-stage corpus depends on the suite seed only, so every run seed shares one base checkpoint."""
    return _generate(f"{suite.name}-{PRETRAIN_TASK}", {PRETRAIN_TASK: (PRETRAIN_TASK, {"train": size})}, suite.seed, suite.image_size, suite.seed)
