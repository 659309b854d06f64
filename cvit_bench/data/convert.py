"""``cvit-bench convert SUITE SRC DST``: released CoIN / SMoLoRA / UCIT files -> the harness's records.

The releases hold two shapes (see the suites' headers): training files are LLaVA conversations
whose human turn already carries the instruction sentence, and test files are LLaVA question
files (``question_id``, ``image``, ``text`` with the instruction inside, ``answer`` or
``answer_bbox``). The harness phrases every record itself from the task's template, so the
instruction is cut out of the released text: the phrasing of the task's template whose text
around ``{question}`` frames the released text gives the bare ``question``. A record no phrasing
frames keeps its whole text and is counted in the report (its prompt would repeat an
instruction). Answers, all reference answers, options and boxes are kept.

Images are not copied: ``DST/<images>`` links to ``SRC/<images>`` when the suite has one image
folder, so ``--data-root DST`` finds both. A release that keeps each task's images beside its files
(MLLM-CL: ``RS/images``, ``OCR_test/images``) has no such folder; its suite names ``images: release``,
``DST/release`` links to ``SRC`` itself and every image path gains the folder of the file that names it.

Question-file fields beyond the question, image and answers are kept in the record's ``meta`` (the
scorers of MLLM-CL's OCR and Math read its category and answer type there); a ``choices`` list
becomes the record's ``options``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvit_bench.data.llava_format import IMAGE_TOKEN, DataError
from cvit_bench.io import atomic_write_json
from cvit_bench.suites.availability import required_files
from cvit_bench.suites.schema import Phrasing, RealSuite, RealTaskSpec

# The file names the releases use for a split, in the order tried (the suites' headers name them):
# CoIN's OCR-VQA evaluates test_1.json, SMoLoRA several val.json, UCIT test_3000.json and Flickr30k's train_brief_4w.json.
RELEASED_NAMES = {"train": ("train.json", "train_brief_4w.json"), "test": ("test.json", "test_1.json", "val.json", "test_3000.json")}
# Folders a split may sit in besides the task's own, as a suffix of its name: MLLM-ACL keeps each test set in <Task>_test.
RELEASED_FOLDERS = {"train": ("",), "test": ("", "_test")}
WHOLE_RELEASE = "release"  # a suite's `images` that means "the release's root, images beside each task's files"
QUESTION_FILE_KEYS = {"question_id", "image", "text", "answer", "answers", "answer_bbox", "choices"}
FIN_YES_NO, FIN_LETTER = " Only answer with yes or no directly.", " Answer the question with a single letter choice."


def finance_question(question: str, answer: str) -> str:
    """A Fin question with the suffix model_fin.py appends: yes/no for a "Yes"/"No" answer, else a letter choice."""
    suffix = FIN_YES_NO if answer in ("Yes", "No") else FIN_LETTER
    return question if question.endswith(suffix.strip()) else question + suffix


# Instructions a release adds per item at inference rather than per task (template name -> (question, answer) -> question):
# MLLM-CL's Fin (model_fin.py) appends one by answer type, so cvit-bench keeps it in the item's question.
ITEM_INSTRUCTIONS = {"mllm/fin": finance_question}
OPTION_LINE = re.compile(r"^\(?([A-Z])[.)]\s*(.+)$")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MANY_ANSWERS = ("vqa_accuracy", "vqa_accuracy_vqaeval")  # scorers that need several reference answers per test record


@dataclass
class FileReport:
    """What one converted file holds, and how many records kept their whole text as the question."""

    source: Path
    target: Path
    records: int = 0
    unframed: int = 0
    first_unframed: str | None = None
    phrasings: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        used = ", ".join(f"{name} x{n}" for name, n in sorted(self.phrasings.items()))
        line = f"{self.source} -> {self.target}: {self.records} records (instruction cut by {used or 'none'})"
        if self.unframed:
            line += (f"; {self.unframed} matched no phrasing of the task's template and keep their whole text as the "
                     f"question, so their prompt repeats an instruction if that text carries one (MLLM-CL's Med texts "
                     f"carry none: its script adds it) (first: id {self.first_unframed})")
        return line


def split_instruction(text: str, phrasings: tuple[Phrasing, ...]) -> tuple[str, Phrasing | None]:
    """The bare question inside ``text`` and the phrasing that frames it (the most specific one); None when none does."""
    text = text.replace(IMAGE_TOKEN, "").strip()
    best: tuple[int, str, Phrasing] | None = None
    for phrasing in phrasings:
        prefix, _, suffix = phrasing.prompt.partition("{question}")
        prefix, suffix = prefix.strip(), suffix.strip()
        framed = len(prefix) + len(suffix)
        if framed <= len(text) and text.startswith(prefix) and text.endswith(suffix) and (best is None or framed > best[0]):
            best = (framed, text[len(prefix): len(text) - len(suffix)].strip(), phrasing)
    return (text, None) if best is None else (best[1], best[2])


def parse_options(question: str) -> list[str]:
    """Option texts of lines ``A. text`` / ``(A) text``, in letter order from A (LLaVA's ScienceQA layout)."""
    options = []
    for line in question.splitlines():
        match = OPTION_LINE.match(line.strip())
        if match and ord(match.group(1)) - ord("A") == len(options):
            options.append(match.group(2).strip())
    return options


def parse_box(value: Any, where: str) -> list[float]:
    """Four coordinates from a list or from text like ``[0.1, 0.2, 0.5, 0.6]``."""
    numbers = [float(v) for v in value] if isinstance(value, list) else [float(n) for n in NUMBER.findall(str(value))]
    if len(numbers) != 4:
        raise DataError(f"{where}: expected a box of four numbers, got {value!r}")
    return numbers


def _read_released(path: Path) -> list[dict]:
    """A JSON list, or one JSON object per line (LLaVA question files are often .jsonl written as .json)."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: neither a JSON list nor JSON lines: {error}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of JSON objects")
    return records


def _record(raw: dict, where: str, task: RealTaskSpec, report: FileReport, *, ground: bool, scored: bool,
            image_prefix: str = "") -> list[dict]:
    """One released record (conversations or a question-file row) as harness records (one per question-answer turn)."""
    meta: dict[str, Any] = {}
    options_field = raw.get("choices")
    if "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
            raise DataError(f"{where}.conversations: expected human/gpt turn pairs")
        pairs = [(turns[i].get("value"), turns[i + 1].get("value")) for i in range(0, len(turns), 2)]
        base_id = str(raw.get("id", raw.get("question_id", where)))
        answers_field = raw.get("answers")
    else:
        for key in ("question_id", "image", "text"):
            if key not in raw:
                raise DataError(f"{where}.{key}: missing (a question-file record needs question_id, image, text and an answer)")
        answer = raw.get("answer", raw.get("answer_bbox") if ground else None)
        if answer is None:
            raise DataError(f"{where}.answer: missing (the release's test file must carry the answers)")
        answers_field = raw.get("answers", answer if isinstance(answer, list) else None)
        pairs = [(raw["text"], answer[0] if isinstance(answer, list) else answer)]
        base_id = str(raw["question_id"])
        meta = {key: value for key, value in raw.items() if key not in QUESTION_FILE_KEYS}
    records = []
    for k, (human, answer) in enumerate(pairs):
        if not isinstance(human, str) or not isinstance(answer, (str, int, float, list)):
            raise DataError(f"{where}: turn {k}: expected the question text and its answer")
        if ground:
            box = parse_box(answer, f"{where}.answer")
            answer = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        question, phrasing = split_instruction(human, task.template.train + task.template.heldout)
        if task.template.task_type in ITEM_INSTRUCTIONS:
            question = ITEM_INSTRUCTIONS[task.template.task_type](question, str(answer))
        report.records += 1
        if phrasing is None:
            report.unframed += 1
            report.first_unframed = report.first_unframed or base_id
        else:
            report.phrasings[phrasing.id] = report.phrasings.get(phrasing.id, 0) + 1
        image = raw.get("image")
        record: dict[str, Any] = {
            "id": base_id if len(pairs) == 1 else f"{base_id}-{k}",
            "image": f"{image_prefix}/{image}" if image_prefix and isinstance(image, str) else image,
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{human.replace(IMAGE_TOKEN, '').strip()}"},
                              {"from": "gpt", "value": str(answer)}],
            "question": question,
        }
        if answers_field is not None and k == 0:
            if not isinstance(answers_field, list) or not all(isinstance(a, str) for a in answers_field):
                raise DataError(f"{where}.answers: expected a list of strings")
            record["answers"] = answers_field
        if scored and task.scorer in MANY_ANSWERS and len(record.get("answers", ())) < 2:
            raise DataError(f"{where}.answers: {task.scorer} scores against every annotator's answer; give the record an "
                            f"`answers` list (TextVQA's ten from TextVQA_0.5.1_val.json, by question_id)")
        if options_field is not None:
            if not isinstance(options_field, list) or not all(isinstance(o, (str, int, float)) for o in options_field):
                raise DataError(f"{where}.choices: expected a list of option texts")
            record["options"] = [str(o) for o in options_field]
        elif task.template.train[0].contract == "letter":
            options = parse_options(question)
            if options:
                record["options"] = options
        if ground:
            record["box"] = box
        if meta:
            record["meta"] = meta
        records.append(record)
    return records


def released_file(src_folder: Path, split: str) -> Path:
    """The release's file for ``split`` of a task folder (the first of its known names present, in the folder itself or,
    for a test set, in ``<folder>_test``)."""
    for suffix in RELEASED_FOLDERS[split]:
        folder = src_folder.with_name(src_folder.name + suffix)
        for name in RELEASED_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    folders = " or ".join(f"{src_folder.name}{suffix}" for suffix in RELEASED_FOLDERS[split])
    raise DataError(f"{src_folder.parent}: no {split} file in {folders} (looked for {', '.join(RELEASED_NAMES[split])})")


def convert_suite(suite: RealSuite, src: Path, dst: Path) -> list[FileReport]:
    """Convert every file the suite reads from the release under ``src`` into ``dst``; one report per file."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: the destination must differ from the source (the released files are read, not rewritten)")
    whole_release = suite.images == WHOLE_RELEASE
    reports = []
    for task, split in required_files(suite):
        source = released_file(src / task.data, split)
        report = FileReport(source, dst / task.data / f"{split}.json")
        ground = task.template.train[0].contract == "bbox"
        prefix = source.parent.relative_to(src).as_posix() if whole_release else ""
        converted = [record for i, raw in enumerate(_read_released(source))
                     for record in _record(raw, f"{source}: record {i}", task, report, ground=ground, scored=split == "test",
                                           image_prefix=prefix)]
        report.target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(report.target, converted)
        reports.append(report)
    images = src if whole_release else src / suite.images if suite.images else None
    if images is not None and images.is_dir() and not (dst / suite.images).exists():
        (dst / suite.images).symlink_to(images.resolve(), target_is_directory=True)
    return reports
