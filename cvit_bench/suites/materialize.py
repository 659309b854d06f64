"""Materialize a suite's data: generate the synthetic suite into the cache, or locate a real one.

Generated data is keyed by the suite's data settings, task sizes and the
generator's source, written to a temporary folder and renamed, so a killed
generation never leaves a folder that looks finished. Real data is found under
a data root (``--data-root``, else ``$CVIT_DATA_ROOT``), each task in its own folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cvit_bench.data.llava_format import DataError, Record, read_llava_json
from cvit_bench.data.samples import check_image
from cvit_bench.evaluation.scoring import sample_problem
from cvit_bench.io import publish_tree
from cvit_bench.paths import cache_dir, config_hash, tree_hash
from cvit_bench.suites import base_corpus, synthetic, tasks_v2
from cvit_bench.suites.availability import check_data, format_report, image_root, required_files, task_folder
from cvit_bench.suites.schema import RealSuite, Suite, TaskSpec

PRETRAIN_TASK = "pretrain"
DATA_ROOT_ENV = "CVIT_DATA_ROOT"


@dataclass(frozen=True)
class SuiteData:
    """Where each task's LLaVA-format files are, the hash of all of them, and the hash of how they were made.

    Generated data differs per run seed by design, so runs of different seeds share a
    ``recipe_hash`` (generator, sizes, suite seed) but not a ``data_hash``; for real data both
    are the hash of the annotation files read. Real tasks name their own folder, image root and
    evaluation cap; synthetic ones live in ``root/<task>`` with their images.
    """

    root: Path
    data_hash: str
    recipe_hash: str
    folders: Mapping[str, Path] = field(default_factory=dict)  # real data: task -> its folder (default root/<task>)
    image_roots: Mapping[str, Path] = field(default_factory=dict)  # real data: task -> image root (default its folder)
    test_sizes: Mapping[str, int] = field(default_factory=dict)  # real data: task -> evaluation cap (0: all)

    def file(self, task: str, split: str) -> Path:
        return self.folders.get(task, self.root / task) / f"{split}.json"

    def records(self, task: str, split: str) -> list[Record]:
        path = self.file(task, split)
        records = read_llava_json(path, self.image_roots.get(task, path.parent))
        cap = self.test_sizes.get(task, 0) if split == "test" else 0
        return evaluation_subset(records, cap) if cap else records


SHOWN_PROBLEMS = 20  # problems quoted by a failed data check; the rest are counted


def check_records(suite: Suite, data: SuiteData) -> list[str]:
    """Every problem that would stop a run of ``suite`` part-way, found before it loads a model or writes a file.

    Each file the run reads goes through the run's own reader (``SuiteData.records``: the first
    malformed record of a file is reported), each image a record names is opened and verified
    (corrupt files and decompression bombs), each evaluated record is checked for the fields its
    task's scorer reads, and few-shot tasks for enough training records. Pixels are decoded only when
    the run uses them; a file that verifies but fails to decode then fails naming its path.
    """
    problems: list[str] = []
    checked: set[Path] = set()
    for task, split in required_files(suite):
        path = data.file(task.name, split)
        try:
            records = data.records(task.name, split)
        except DataError as error:
            problems.append(str(error))
            continue
        if split == "train" and len(records) < max(task.shots):
            problems.append(f"{path}: {max(task.shots)}-shot evaluation of {task.name!r} needs at least {max(task.shots)} records, found {len(records)}")
        for record in records:
            fields = {"answer": record.answer, "answers": list(record.answers), "options": list(record.options), "box": list(record.box),
                      "meta": dict(record.meta)}
            problem = sample_problem(task.scorer, fields) if split != "train" else None  # only evaluated records are scored
            if problem:
                problems.append(f"{path}: record {record.id}: {problem}")
            if record.image not in checked:
                checked.add(record.image)
                try:
                    check_image(record.image)
                except DataError as error:
                    problems.append(f"{path}: record {record.id}.image: {error}")
    return problems


def require_valid_records(suite: Suite, data: SuiteData) -> None:
    """:func:`check_records`, raising one DataError that lists the first problems and counts the rest."""
    problems = check_records(suite, data)
    if problems:
        shown = problems[:SHOWN_PROBLEMS]
        more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        raise DataError(f"{suite.name}: {len(problems)} problem(s) in the data (nothing was run or written):\n  " + "\n  ".join(shown + more))


def evaluation_subset(records: list[Record], size: int) -> list[Record]:
    """The ``size`` records whose SHA-256 of the id is smallest, in file order.

    Real test sets are large; a capped evaluation must be the same subset for every run,
    method and seed, and must not depend on how the file happens to be ordered. Ties (repeated
    ids) fall back to the position in the file.
    """
    ranked = sorted(range(len(records)), key=lambda i: (hashlib.sha256(records[i].id.encode()).hexdigest(), i))
    return [records[i] for i in sorted(ranked[:size])]


def resolve_data_root(data_root: Path | None) -> Path | None:
    """``--data-root`` when given, else ``$CVIT_DATA_ROOT`` (unset or empty: None)."""
    if data_root is not None:
        return Path(data_root)
    from_env = os.environ.get(DATA_ROOT_ENV, "").strip()
    return Path(from_env) if from_env else None


def _generator_fingerprint(kinds: set[str]) -> str:
    """Hash of the generator source a plan uses: ``synthetic.py`` alone (cvit-v1's recipe, unchanged) plus
    ``base_corpus.py`` for plans that draw the cvit-v2 base corpus and ``tasks_v2.py`` for cvit-v2's own kinds."""
    sources = [synthetic.__file__] + ([base_corpus.__file__] if base_corpus.KIND in kinds else [])
    sources += [tasks_v2.__file__] if tasks_v2.KIND_MCQ in kinds else []
    return hashlib.sha256(b"".join(Path(source).read_bytes() for source in sources)).hexdigest()[:16]


def _task_sizes(task: TaskSpec) -> dict[str, int]:
    sizes = {"train": task.train_size} if task.train_size else {}
    if max(task.shots) > 0:
        sizes["train"] = max(sizes.get("train", 0), 4 * max(task.shots))
    sizes["test"] = task.test_size
    return sizes


def _recipe(plan: dict[str, tuple[str, dict[str, int]]], image_size: int) -> dict:
    return {"image_size": image_size, "plan": plan, "generator": _generator_fingerprint({kind for kind, _ in plan.values()})}


def _generate(name: str, plan: dict[str, tuple[str, dict[str, int]]], seed: int, image_size: int, recipe_seed: int) -> SuiteData:
    """Generate ``plan`` (task -> kind, sizes) once into the cache; a staging folder is renamed when complete."""
    recipe = _recipe(plan, image_size)
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
            publish_tree(staging)
            try:
                staging.rename(root)
            except OSError:  # another process finished the same data first; theirs is identical and may be in use
                if not (root / "DATA_HASH").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return SuiteData(root, (root / "DATA_HASH").read_text().strip(), config_hash({"suite_seed": recipe_seed, **recipe}))


def materialize(suite: Suite, seed: int, data_root: Path | None = None) -> SuiteData:
    """The suite's task data: generated from (suite seed, run seed) for synthetic suites, else found under the data root."""
    if isinstance(suite, RealSuite):
        return _locate(suite, resolve_data_root(data_root))
    plan = {task.name: (task.kind, _task_sizes(task)) for task in suite.tasks + suite.unseen}
    return _generate(suite.name, plan, suite.seed * 1_000_003 + seed, suite.image_size, suite.seed)


def _locate(suite: RealSuite, root: Path | None) -> SuiteData:
    """Real data as it lies: every annotation file the run reads must exist (images are checked as records load).

    Its hash covers those JSON files (path and bytes), not the images: hashing a data root
    would read hundreds of gigabytes, and the JSON names every image a run uses.
    """
    if root is None:
        raise DataError(f"{suite.path}: suite {suite.name!r} reads real data: pass --data-root or set {DATA_ROOT_ENV}")
    missing = check_data(suite, root, images=False)
    if missing:
        raise DataError(format_report(suite, root, missing))
    digest = hashlib.sha256()
    for task, split in required_files(suite):
        path = task_folder(root, task) / f"{split}.json"
        digest.update(f"{task.name}/{split}: {path.relative_to(root)}".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"images: {suite.images}".encode())
    data_hash = digest.hexdigest()[:16]
    tasks = suite.tasks + suite.unseen
    return SuiteData(
        root, data_hash, data_hash,
        folders={t.name: task_folder(root, t) for t in tasks},
        image_roots={t.name: image_root(root, suite, t) for t in tasks},
        test_sizes={t.name: t.test_size for t in tasks},
    )


def _pretrain_plan(size: int, kind: str) -> dict[str, tuple[str, dict[str, int]]]:
    return {PRETRAIN_TASK: (kind, {"train": size})}


def materialize_pretrain_corpus(suite: Suite, size: int, kind: str = PRETRAIN_TASK) -> SuiteData:
    """The base-stage corpus depends on the suite seed only, so every run seed shares one base checkpoint."""
    return _generate(f"{suite.name}-{PRETRAIN_TASK}", _pretrain_plan(size, kind), suite.seed, suite.image_size, suite.seed)


def pretrain_corpus_recipe(suite: Suite, size: int, kind: str) -> str:
    """The corpus's recipe hash without generating it (a shipped base is checked against it)."""
    return config_hash({"suite_seed": suite.seed, **_recipe(_pretrain_plan(size, kind), suite.image_size)})
