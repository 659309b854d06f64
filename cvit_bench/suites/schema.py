"""Suite and instruction-template YAML: schema, loading and validation.

Suites and templates are data (``yaml.safe_load``, nothing executed). Validation
collects *every* problem with its file and field before failing, so a user fixes
a broken suite in one pass instead of one error at a time.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cvit_bench.paths import REPO_ROOT, name_problem
from cvit_bench.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, Range, range_problem
from cvit_bench.registry import ConfigError, unknown_name_message
from cvit_bench.resources import SUITES, TEMPLATES, shipped

SUITES_DIR = shipped(SUITES)
TEMPLATES_DIR = shipped(TEMPLATES)
INSTRUCTION_SETTINGS = ("single", "multi")
DATA_SOURCES = ("synthetic", "llava")
SIDE_SET_SCHEDULES = ("every_stage", "ends")
DEFAULT_CEILING = 100.0  # a perfect accuracy; CIDEr has no fixed maximum, so its tasks declare a ceiling


class SuiteError(ValueError):
    """A suite or template file is invalid; the message names every file and field at fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid suite:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Phrasing:
    """One instruction phrasing: a prompt with ``{question}`` and the format contract its answers obey."""

    id: str
    prompt: str
    contract: str


@dataclass(frozen=True)
class TemplateSet:
    """Phrasings for one task type: ``train[0]`` is the single-type setting, all of ``train`` the multi-type one."""

    task_type: str
    path: Path
    train: tuple[Phrasing, ...]
    heldout: tuple[Phrasing, ...]

    def training_phrasings(self, setting: str) -> tuple[Phrasing, ...]:
        return self.train[:1] if setting == "single" else self.train


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    template: TemplateSet
    scorer: str
    train_size: int = 0
    test_size: int = 0
    shots: tuple[int, ...] = (0,)
    data: str | None = None  # real suites: folder (relative to --data-root) holding train.json / test.json
    max_new_tokens: int | None = None  # generation length; None: the longest reference reply of the set + the margin
    # What an image-blind constant reply scores and the best attainable score, on the task's own scale; they map the
    # task onto 0..100 for nAP. Optional (None: not declared).
    chance: float | None = None
    ceiling: float | None = None

    ADDED_LATER = {"max_new_tokens": None, "chance": None, "ceiling": None}  # left out of a run's config at these values (cvit-v1's hash)

    @property
    def nap_ceiling(self) -> float:
        """The declared ceiling, else a perfect score (100); CIDEr tasks must declare theirs."""
        return DEFAULT_CEILING if self.ceiling is None else self.ceiling


@dataclass(frozen=True)
class RealTaskSpec(TaskSpec):
    """A task of a real (llava) suite.

    ``data`` is the folder (relative to the data root) holding ``train.json`` / ``test.json``.
    ``test_size`` caps evaluation: 0 evaluates every test record, n > 0 a fixed subset of n
    (see ``materialize.evaluation_subset``). ``obtain`` tells a user where the data comes from.
    """

    obtain: str = ""


@dataclass(frozen=True)
class NotComputed:
    """A score the published benchmark reports that cvit-bench does not compute, and why."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} is not computed: {self.reason}"


def _setting(default: Any, allowed: Range) -> Any:
    """A numeric suite setting and the range ``validate`` and every run check it against."""
    return field(default=default, metadata={"allowed": allowed})


@dataclass(frozen=True)
class TrainingConfig:
    """The suite's recipe. ``batch_size`` is the batch of one optimizer step over all processes, whatever
    ``--grad-accum`` splits it into; ``epochs_per_task`` (the papers: 1) replaces ``steps_per_task`` when set."""

    steps_per_task: int = _setting(200, AT_LEAST_ONE)
    batch_size: int = _setting(16, AT_LEAST_ONE)
    lr: float = _setting(3e-4, POSITIVE)
    warmup_steps: int = _setting(10, NON_NEGATIVE)
    weight_decay: float = _setting(0.0, NON_NEGATIVE)
    max_grad_norm: float = _setting(1.0, POSITIVE)
    epochs_per_task: float | None = _setting(None, POSITIVE)

    ADDED_LATER = {"epochs_per_task": None}  # left out of a run's config at these values (cvit-v1's hash)


@dataclass(frozen=True)
class EvaluationConfig:
    """How and when sets are evaluated; the two schedule switches trade matrix cells no metric reads for time.

    ``future_tasks: false`` evaluates a training task after stage j only when it is among the
    first j + 1 tasks (row 0 stays whole: FWT reads R[0, i] and R[i-1, i]); ``side_sets: ends``
    evaluates unseen and held-out sets at stage 0 and after the last stage only (their metrics
    read the final row). Cells not evaluated stay null.
    """

    batch_size: int = _setting(48, AT_LEAST_ONE)
    max_new_tokens_margin: int = _setting(4, NON_NEGATIVE)
    future_tasks: bool = True
    side_sets: str = "every_stage"

    ADDED_LATER = {"future_tasks": True, "side_sets": "every_stage"}  # left out of a run's config at these values (cvit-v1's hash)


@dataclass(frozen=True)
class ClipRecipe:
    """How an embedded suite's tiny CLIP is built on the run's model (``model.clip`` as a mapping; every field optional;
    see ``models/clip_towers.py``)."""

    shipped: str | None = None  # a folder under cvit_bench/bases/ that holds the built CLIP
    text_layers: int = 2
    text_heads: int = 4
    max_positions: int = 77  # CLIP's context length
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    scenes: int = 16000  # 2000 steps on 16000 scenes: 74 % held-out top-1 of 512 (800 on 8000: 65 %)
    seed: int = 0

    def hashed(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "shipped"}


def clip_setting(where: str, raw: Any, real: bool) -> str | ClipRecipe | None:
    """``model.clip``: the name or path of a CLIP checkpoint, or (embedded suites) the tiny CLIP's recipe; None when absent.
    Raises :class:`SuiteError` naming the file and field."""
    if raw is None:
        return None
    if isinstance(raw, str) and raw:
        return raw
    if real:
        raise SuiteError([f"{where}: model.clip: expected the name or path of the CLIP checkpoint of the model's vision tower"])
    allowed = sorted(f.name for f in fields(ClipRecipe))
    if not isinstance(raw, dict):
        raise SuiteError([f"{where}: model.clip: expected a checkpoint's name or path, or a mapping of {allowed}; got {raw!r}"])
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SuiteError([f"{where}: model.clip: unknown key(s) {unknown} (allowed: {allowed})"])
    shipped_name = raw.get("shipped")
    if shipped_name is not None and (not isinstance(shipped_name, str) or not shipped_name or "/" in shipped_name
                                     or "\\" in shipped_name or shipped_name.startswith(".")):
        raise SuiteError([f"{where}: model.clip.shipped: expected the name of a folder under cvit_bench/bases/, got {shipped_name!r}"])
    problems = [problem for key, value in raw.items() if key != "shipped"
                if (problem := _clip_number_problem(f"{where}: model.clip.{key}", value, ClipRecipe.__dataclass_fields__[key].default))]
    if problems:
        raise SuiteError(problems)
    return ClipRecipe(**raw)


def _clip_number_problem(where: str, value: Any, default: int | float) -> str | None:
    integer = isinstance(default, int)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}"
    return None if value > 0 or where.endswith(".seed") and value == 0 else f"{where}: expected a positive value, got {value}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    data_source: str
    seed: int
    image_size: int
    instruction_setting: str
    tasks: tuple[TaskSpec, ...]
    unseen: tuple[TaskSpec, ...]
    training: TrainingConfig
    evaluation: EvaluationConfig
    model: dict[str, Any] = field(default_factory=dict)
    orders: dict[str, tuple[str, ...]] = field(default_factory=dict)  # named permutations of the tasks (see suites/orders.py)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> option defaults for this suite

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


@dataclass(frozen=True)
class RealSuite(Suite):
    """A suite over released LLaVA-format data (``data.source: llava``).

    A subclass rather than more fields on :class:`Suite`: a run's recorded setup is the whole
    suite as data, so new fields on the base class would change every synthetic run's config
    hash. ``images``: folder (relative to the data root) that image paths in every task's JSON
    are relative to; None means each task's own data folder. ``not_computed``: published scores
    deliberately left out (recorded in each run's config, so results say what they lack).
    """

    images: str | None = None
    not_computed: tuple[NotComputed, ...] = ()


_TOP_KEYS = {"name", "description", "data", "model", "instruction_setting", "training", "evaluation", "tasks", "unseen", "not_computed", "orders",
             "method_defaults"}
ORDER_NAME = re.compile(r"[a-z0-9_-]+")
DEFAULT_ORDER = "default"  # the listed order's name in leaderboards; a suite may declare it only as the listed order
_TASK_KEYS = {"name", "kind", "template", "scorer", "train_size", "test_size", "shots", "data", "obtain", "max_new_tokens", "chance", "ceiling"}
_NOT_COMPUTED_KEYS = {"name", "reason"}
_TEMPLATE_KEYS = {"task_type", "train", "heldout"}
_PHRASING_KEYS = {"prompt", "contract"}


def _read_yaml(path: Path, problems: list[str]) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
    except yaml.YAMLError as error:
        problems.append(f"{path}: malformed YAML: {error}".replace("\n", " "))
    return None


def _unknown_keys(where: str, mapping: dict, allowed: set[str], problems: list[str]) -> None:
    for key in sorted(set(mapping) - allowed):
        problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def load_templates(task_type: str, problems: list[str], templates_dir: Path | None = None) -> TemplateSet | None:
    """Read ``instruction_templates/<task_type>.yaml``; every phrasing needs a prompt with {question} and a known contract."""
    from cvit_bench.evaluation.contracts import CONTRACTS

    if Path(task_type).is_absolute() or any(name_problem(part) for part in task_type.split("/")):
        problems.append(f"template {task_type!r}: must be a name under instruction_templates/ (relative, '/'-separated safe names)")
        return None
    path = (templates_dir or TEMPLATES_DIR) / f"{task_type}.yaml"
    data = _read_yaml(path, problems)
    if data is None:
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping at the top level")
        return None
    _unknown_keys(str(path), data, _TEMPLATE_KEYS, problems)
    groups: dict[str, list[Phrasing]] = {}
    for group in ("train", "heldout"):
        entries = data.get(group)
        if not isinstance(entries, list) or not entries:
            problems.append(f"{path}: {group}: expected a non-empty list of phrasings")
            continue
        groups[group] = []
        for i, entry in enumerate(entries):
            where = f"{path}: {group}[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{where}: expected a mapping with 'prompt' and 'contract'")
                continue
            _unknown_keys(where, entry, _PHRASING_KEYS, problems)
            prompt, contract = entry.get("prompt"), entry.get("contract")
            if not isinstance(prompt, str) or "{question}" not in prompt:
                problems.append(f"{where}.prompt: must be a string containing '{{question}}'")
            else:
                problems += _placeholder_problems(f"{where}.prompt", prompt)
            if contract is None:
                problems.append(f"{where}.contract: missing (every phrasing needs a format contract)")
            elif contract not in CONTRACTS:
                problems.append(f"{where}.contract: {unknown_name_message('contract', str(contract), list(CONTRACTS))}")
            groups[group].append(Phrasing(f"{task_type}/{group}/{i}", str(prompt), str(contract)))
    if set(groups) != {"train", "heldout"}:
        return None
    return TemplateSet(task_type, path, tuple(groups["train"]), tuple(groups["heldout"]))


def _placeholder_problems(where: str, prompt: str) -> list[str]:
    """A prompt is filled with ``str.format(question=...)``: any other field, or a lone brace, would fail mid-run."""
    try:
        prompt.format(question="")
    except (KeyError, IndexError, AttributeError, ValueError) as error:
        return [f"{where}: {prompt!r} cannot be filled ({type(error).__name__}: {error}); the only placeholder is "
                "{question}, and a literal brace is written {{ or }}"]
    return []


def _positive_int(where: str, value: Any, problems: list[str], allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        problems.append(f"{where}: expected a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
        return 0
    return value


def _seed(where: str, value: Any, problems: list[str]) -> int:
    problem = range_problem(where, value, SEED, integer=True)
    if problem:
        problems.append(problem)
        return 0
    return value


def _dataclass_from(cls, where: str, mapping: Any, problems: list[str]):
    if mapping is None:
        return cls()
    if not isinstance(mapping, dict):
        problems.append(f"{where}: expected a mapping")
        return cls()
    allowed_fields = {f.name: f for f in fields(cls)}
    _unknown_keys(where, mapping, set(allowed_fields), problems)
    values = {}
    hints = typing.get_type_hints(cls)
    for key, value in mapping.items():
        if key not in allowed_fields:
            continue
        expected = tuple(t for t in typing.get_args(hints[key]) or (hints[key],) if t is not type(None))[0]
        if value is None and type(None) in typing.get_args(hints[key]):
            values[key] = None
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            problems.append(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
            continue
        allowed = allowed_fields[key].metadata.get("allowed")
        problem = allowed and range_problem(f"{where}.{key}", value, allowed, integer=expected is int)
        if problem:
            problems.append(problem)
            continue
        values[key] = value
    return cls(**values)


def _relative_folder(where: str, value: Any, problems: list[str]) -> str | None:
    """A folder below the data root: relative, without ``..``, so a suite cannot read outside the root it is given."""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: expected a folder relative to the data root, got {value!r}")
        return None
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        problems.append(f"{where}: {value!r} must stay inside the data root (relative, no '..')")
        return None
    return value


def _number_or_none(where: str, value: Any, problems: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        problems.append(f"{where}: expected a non-negative number, got {value!r}")
        return None
    return float(value)


def _chance_and_ceiling(where: str, entry: dict, scorer: Any, problems: list[str]) -> dict[str, float | None]:
    """The optional ``chance`` and ``ceiling`` of a task; a CIDEr task that declares chance must declare its ceiling."""
    from cvit_bench.evaluation.scoring import CORPUS_SCORERS

    chance = _number_or_none(f"{where}.chance", entry.get("chance"), problems)
    ceiling = _number_or_none(f"{where}.ceiling", entry.get("ceiling"), problems)
    if chance is not None and ceiling is None and scorer in CORPUS_SCORERS:
        problems.append(f"{where}.ceiling: a {scorer} task that declares chance needs a ceiling (CIDEr has no fixed maximum)")
    if chance is not None and chance >= (DEFAULT_CEILING if ceiling is None else ceiling):
        problems.append(f"{where}.chance: {chance} must be below the ceiling ({DEFAULT_CEILING if ceiling is None else ceiling})")
    return {"chance": chance, "ceiling": ceiling}


def _load_task(where: str, entry: Any, data_source: str, problems: list[str], templates_dir: Path | None) -> TaskSpec | None:
    from cvit_bench.evaluation.scoring import CORPUS_SCORERS, SAMPLE_SCORERS

    if not isinstance(entry, dict):
        problems.append(f"{where}: expected a mapping")
        return None
    _unknown_keys(where, entry, _TASK_KEYS, problems)
    name, kind = entry.get("name"), entry.get("kind", entry.get("name"))
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.name: missing")
        return None
    if name_problem(name):  # a task's data folder, images and single-task run directory are named after it
        problems.append(f"{where}.name: {name_problem(name)}")
        return None
    real = data_source == "llava"
    if not real:
        from cvit_bench.suites.tasks_v2 import TASK_KINDS

        if kind not in TASK_KINDS:
            problems.append(f"{where}.kind: {unknown_name_message('task kind', str(kind), list(TASK_KINDS))}")
        if "obtain" in entry:
            problems.append(f"{where}.obtain: only real (llava) suites say where their data comes from")
    scorer = entry.get("scorer")
    valid_scorers = [*SAMPLE_SCORERS, *CORPUS_SCORERS]
    if scorer not in valid_scorers:
        problems.append(f"{where}.scorer: {unknown_name_message('scorer', str(scorer), valid_scorers)}")
    template_name = entry.get("template")
    template = None
    if not isinstance(template_name, str):
        problems.append(f"{where}.template: missing (name of a file in instruction_templates/)")
    else:
        template = load_templates(template_name, problems, templates_dir)
    shots = entry.get("shots", [0])
    if not isinstance(shots, list) or not all(isinstance(s, int) and s >= 0 for s in shots):
        problems.append(f"{where}.shots: expected a list of non-negative integers")
        shots = [0]
    bounds = _chance_and_ceiling(where, entry, scorer, problems)
    # Real test sets are evaluated whole unless capped; generated ones need a size.
    test_size = _positive_int(f"{where}.test_size", entry.get("test_size", 0 if real else 1), problems, allow_zero=real)
    max_new_tokens = None if entry.get("max_new_tokens") is None else _positive_int(f"{where}.max_new_tokens", entry["max_new_tokens"], problems)
    if not real:
        train_size = _positive_int(f"{where}.train_size", entry.get("train_size", 0), problems, allow_zero=True)
        if template is None:
            return None
        return TaskSpec(name, str(kind), template, str(scorer), train_size, test_size, tuple(shots), entry.get("data"), max_new_tokens, **bounds)
    if "train_size" in entry:
        problems.append(f"{where}.train_size: real (llava) suites train on all of train.json; remove it")
    folder = _relative_folder(f"{where}.data", entry.get("data"), problems)
    obtain = entry.get("obtain", "")
    if not isinstance(obtain, str):
        problems.append(f"{where}.obtain: expected a string saying how to get the data, got {obtain!r}")
    if template is None or folder is None:
        return None
    return RealTaskSpec(name, str(kind), template, str(scorer), 0, test_size, tuple(shots), folder, max_new_tokens, **bounds, obtain=str(obtain))


def _load_not_computed(where: str, raw: Any, problems: list[str]) -> tuple[NotComputed, ...]:
    if not isinstance(raw, list):
        problems.append(f"{where}: expected a list of {{name, reason}} mappings")
        return ()
    entries = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            problems.append(f"{where}[{i}]: expected a mapping with 'name' and 'reason'")
            continue
        _unknown_keys(f"{where}[{i}]", entry, _NOT_COMPUTED_KEYS, problems)
        bad = [key for key in ("name", "reason") if not isinstance(entry.get(key), str) or not entry[key].strip()]
        for key in bad:
            problems.append(f"{where}[{i}].{key}: expected a non-empty string, got {entry.get(key)!r}")
        if not bad:
            entries.append(NotComputed(entry["name"], entry["reason"]))
    return tuple(entries)


def _load_orders(where: str, raw: Any, task_names: list[str], problems: list[str]) -> dict[str, tuple[str, ...]]:
    """Named permutations of the training tasks: each must list every task exactly once."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of order names to lists of the training tasks")
        return {}
    orders = {}
    for name, tasks in raw.items():
        field_name = f"{where}.{name}"
        if not isinstance(name, str) or not ORDER_NAME.fullmatch(name):
            problems.append(f"{field_name}: an order name may use only a-z, 0-9, '_' and '-'")
            continue
        if not isinstance(tasks, list) or not all(isinstance(task, str) for task in tasks):
            problems.append(f"{field_name}: expected a list of task names")
            continue
        mismatch = permutation_problems(tasks, task_names)
        if mismatch:
            problems.append(f"{field_name}: must list every training task exactly once ({mismatch})")
        elif name == DEFAULT_ORDER and tasks != task_names:
            problems.append(f"{field_name}: {DEFAULT_ORDER!r} names the tasks' listed order ({', '.join(task_names)}); choose another name")
        else:
            orders[name] = tuple(tasks)
    return orders


def permutation_problems(given: list[str], task_names: list[str]) -> str:
    """What keeps ``given`` from being a permutation of ``task_names`` ('' when it is one)."""
    missing = [name for name in task_names if name not in given]
    unknown = sorted({name for name in given if name not in task_names})
    repeated = sorted({name for name in given if given.count(name) > 1})
    parts = [f"{label}: {', '.join(names)}" for label, names in (("missing", missing), ("unknown", unknown), ("repeated", repeated)) if names]
    return "; ".join(parts)


def _load_method_defaults(where: str, raw: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """Per-method option defaults of a suite (a tiny model wants other learning rates than a 7B one), typed and
    range-checked against each method's config as ``--option`` values are."""
    from cvit_bench.methods import METHODS
    from cvit_bench.methods.base import build_config

    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of method names to option mappings")
        return {}
    defaults = {}
    for method, options in raw.items():
        if method not in METHODS.names():
            problems.append(f"{where}.{method}: {unknown_name_message('method', str(method), list(METHODS.names()))}")
        elif not isinstance(options, dict):
            problems.append(f"{where}.{method}: expected a mapping of option names to values")
        else:
            try:
                build_config(method, METHODS.get(method).config_class, options)
            except ConfigError as error:
                problems.append(f"{where}.{method}: {error}")
            defaults[method] = dict(options)
    return defaults


def heldout_repeats(suite: Suite) -> list[str]:
    """Held-out phrasings of the suite's training tasks that equal a phrasing the suite trains (any task), as problems.

    A held-out phrasing measures robustness to instructions the model has not seen; one that another
    task trains on measures nothing of the kind (cvit-v1 has three). Prompts compare with runs of
    whitespace collapsed. ``validate`` refuses such a suite; loading it still works, so published
    suites stay runnable.
    """
    trained: dict[str, str] = {}
    for task in suite.tasks:
        for i, phrasing in enumerate(task.template.training_phrasings(suite.instruction_setting)):
            trained.setdefault(" ".join(phrasing.prompt.split()), f"task {task.name} ({task.template.path}: train[{i}])")
    problems = []
    for task in suite.tasks:
        for i, phrasing in enumerate(task.template.heldout):
            source = trained.get(" ".join(phrasing.prompt.split()))
            if source is not None:
                problems.append(f"{task.template.path}: heldout[{i}].prompt: equals a training phrasing of {source}; "
                                "a held-out phrasing must be one no task trains on")
    return problems


def resolve_suite_path(name_or_path: str) -> Path:
    """A registered suite name (``cvit-v1``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise SuiteError([f"{candidate}: file not found"])
        return candidate
    path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SuiteError([unknown_name_message("suite", name_or_path, suite_names())])
    return path


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str, templates_dir: Path | None = None) -> Suite:
    """Load and validate a suite; raises :class:`SuiteError` listing every problem found."""
    path = resolve_suite_path(name_or_path)
    problems: list[str] = []
    data = _read_yaml(path, problems)
    if data is not None and not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping at the top level")
    if problems:
        raise SuiteError(problems)
    where = str(path)
    _unknown_keys(where, data, _TOP_KEYS, problems)
    data_section = data.get("data") or {}
    if not isinstance(data_section, dict):
        problems.append(f"{where}: data: expected a mapping")
        data_section = {}
    _unknown_keys(f"{where}: data", data_section, {"source", "seed", "image_size", "images"}, problems)
    source = data_section.get("source", "synthetic")
    if source not in DATA_SOURCES:
        problems.append(f"{where}: data.source: expected one of {DATA_SOURCES}, got {source!r}")
    if source != "llava" and "images" in data_section:
        problems.append(f"{where}: data.images: only real (llava) suites read images from a data root")
    if source != "llava" and "not_computed" in data:
        problems.append(f"{where}: not_computed: only real (llava) suites reproduce published scores")
    setting = data.get("instruction_setting", "single")
    if setting not in INSTRUCTION_SETTINGS:
        problems.append(f"{where}: instruction_setting: expected one of {INSTRUCTION_SETTINGS}, got {setting!r}")
    tasks_raw, unseen_raw = data.get("tasks"), data.get("unseen") or []
    if not isinstance(tasks_raw, list) or not tasks_raw:
        problems.append(f"{where}: tasks: expected a non-empty list of tasks")
        tasks_raw = []
    if not isinstance(unseen_raw, list):
        problems.append(f"{where}: unseen: expected a list of tasks")
        unseen_raw = []
    tasks = [_load_task(f"{where}: tasks[{i}]", t, source, problems, templates_dir) for i, t in enumerate(tasks_raw)]
    unseen = [_load_task(f"{where}: unseen[{i}]", t, source, problems, templates_dir) for i, t in enumerate(unseen_raw)]
    for i, task in enumerate(tasks):
        if task is not None and source == "synthetic" and task.train_size == 0:
            problems.append(f"{where}: tasks[{i}].train_size: a training task needs train_size > 0")
    names = [t.name for t in tasks + unseen if t is not None]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: task name {duplicate!r} is used twice")
    # Names of tasks that failed to load count too, so a broken task is not also reported as missing from every order.
    listed = [entry["name"] for entry in tasks_raw if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
    orders = _load_orders(f"{where}: orders", data["orders"], listed, problems) if "orders" in data else {}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        problems.append(f"{where}: model: expected a mapping")
        model = {}
    try:
        clip_setting(where, model.get("clip"), real=source == "llava")
    except SuiteError as error:
        problems.extend(error.problems)
    name = data.get("name", path.stem)
    if name_problem(name):  # results, cache and leaderboard paths are named after the suite
        problems.append(f"{where}: name: {name_problem(name)}")
    common = dict(
        name=str(name),
        path=path,
        description=str(data.get("description", "")),
        data_source=str(source),
        seed=_seed(f"{where}: data.seed", data_section.get("seed", 0), problems),
        image_size=_positive_int(f"{where}: data.image_size", data_section.get("image_size", 64), problems),
        instruction_setting=str(setting),
        tasks=tuple(t for t in tasks if t is not None),
        unseen=tuple(t for t in unseen if t is not None),
        training=_dataclass_from(TrainingConfig, f"{where}: training", data.get("training"), problems),
        evaluation=_dataclass_from(EvaluationConfig, f"{where}: evaluation", data.get("evaluation"), problems),
        model=model,
        orders=orders,
        method_defaults=_load_method_defaults(f"{where}: method_defaults", data.get("method_defaults") or {}, problems),
    )
    epochs = common["training"].epochs_per_task
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        problems.append(f"{where}: training.epochs_per_task: expected a positive number, got {epochs!r}")
    if common["evaluation"].side_sets not in SIDE_SET_SCHEDULES:
        problems.append(f"{where}: evaluation.side_sets: expected one of {SIDE_SET_SCHEDULES}, got {common['evaluation'].side_sets!r}")
    if source == "llava":
        images = data_section.get("images")
        suite: Suite = RealSuite(
            **common,
            images=None if images is None else _relative_folder(f"{where}: data.images", images, problems),
            not_computed=_load_not_computed(f"{where}: not_computed", data.get("not_computed", []), problems),
        )
    else:
        suite = Suite(**common)
    if problems:
        raise SuiteError(problems)
    return suite
