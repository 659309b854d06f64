"""Is a real suite's data in place? Lists missing annotation files and images, and how to obtain them.

Real benchmarks are assembled by hand from a dozen releases, so a run should fail before any
training, naming each missing file and where to get it, not hours in at the first unreadable
image. Every image is checked, but the report gives counts and a few examples per file: a
missing image folder would otherwise print a line per image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cvit_bench.data.llava_format import DataError, safe_image_path
from cvit_bench.suites.schema import RealSuite, RealTaskSpec

EXAMPLES = 3  # offending records quoted per file


@dataclass(frozen=True)
class MissingData:
    """One annotation file of one task that a run cannot use yet.

    ``problem`` says what is wrong in words; ``missing`` counts the images at fault (0 when the
    file itself is missing or unreadable); ``examples`` quotes the first offending records with
    the field at fault; ``obtain`` is the task's hint on where the data comes from.
    """

    task: str
    split: str
    path: Path
    problem: str
    missing: int = 0
    examples: tuple[str, ...] = ()
    obtain: str = ""


def task_folder(data_root: Path, task: RealTaskSpec) -> Path:
    return Path(data_root) / task.data


def image_root(data_root: Path, suite: RealSuite, task: RealTaskSpec) -> Path:
    """Where the task's image paths start: the suite's shared image folder, else the task's own folder."""
    return Path(data_root) / suite.images if suite.images else task_folder(data_root, task)


def required_files(suite: RealSuite) -> list[tuple[RealTaskSpec, str]]:
    """(task, split) pairs a run reads: train and test of training tasks; test of unseen tasks, and
    train too when they are evaluated few-shot (the examples come from it)."""
    needed = [(task, split) for task in suite.tasks for split in ("train", "test")]
    for task in suite.unseen:
        needed += [(task, "train"), (task, "test")] if max(task.shots) > 0 else [(task, "test")]
    return needed


def _image_problems(records: list, root: Path) -> tuple[int, list[str]]:
    """How many records name no usable image, and the first few reasons (file, record and field)."""
    count, examples = 0, []
    for i, raw in enumerate(records):
        where = f"record {i} (id {raw.get('id') if isinstance(raw, dict) else '?'})"
        try:
            if not isinstance(raw, dict):
                raise DataError(f"{where}: expected a JSON object")
            safe_image_path(root, raw.get("image"), where)
        except DataError as error:
            count += 1
            if len(examples) < EXAMPLES:
                examples.append(str(error))
    return count, examples


def _check_file(task: RealTaskSpec, split: str, path: Path, root: Path | None) -> MissingData | None:
    def missing(problem: str, count: int = 0, examples: tuple[str, ...] = ()) -> MissingData:
        return MissingData(task.name, split, path, problem, count, examples, task.obtain)

    if not path.is_file():
        return missing("file not found")
    if root is None:
        return None
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return missing(f"unreadable: {error}")
    if not isinstance(records, list) or not records:
        return missing("expected a non-empty JSON list of records")
    count, examples = _image_problems(records, root)
    if not count:
        return None
    folder = "" if root.is_dir() else " (that folder does not exist)"
    return missing(f"{count} of {len(records)} records name no usable image (field 'image', relative to {root}{folder})",
                   count, tuple(examples))


def check_data(suite: RealSuite, data_root: Path, *, images: bool = True) -> list[MissingData]:
    """Every annotation file a run of ``suite`` reads under ``data_root`` that is missing or, with
    ``images``, unreadable or naming images that are missing or outside the image root.

    Empty when all is in place. ``images=False`` only checks that the files exist (fast: a run
    parses them anyway).
    """
    data_root = Path(data_root)
    found = []
    for task, split in required_files(suite):
        path = task_folder(data_root, task) / f"{split}.json"
        problem = _check_file(task, split, path, image_root(data_root, suite, task) if images else None)
        if problem is not None:
            found.append(problem)
    return found


def format_report(suite: RealSuite, data_root: Path, missing: list[MissingData]) -> str:
    """The check's outcome for people: per task, each file's problem with examples, then how to obtain the data."""
    if not missing:
        return f"{suite.name}: all data found under {data_root}"
    tasks = list(dict.fromkeys(item.task for item in missing))
    lines = [f"{suite.name}: data missing under {data_root} ({len(missing)} file(s) in {len(tasks)} task(s))"]
    for task in tasks:
        items = [item for item in missing if item.task == task]
        lines.append(f"  {task}:")
        for item in items:
            lines.append(f"    {item.path}: {item.problem}")
            lines += [f"      e.g. {example}" for example in item.examples]
        lines.append(f"    how to obtain: {items[0].obtain or '(no hint in the suite; see its YAML comments)'}")
    return "\n".join(lines)
