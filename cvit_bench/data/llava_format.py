"""Reader for LLaVA-format JSON (``id``, ``image``, ``conversations``) with safe image paths.

Synthetic and real suites go through this one reader, so the synthetic default
exercises the same code a LLaVA-1.5 data release does. Image paths come from
data files and are untrusted: absolute paths, ``..`` and symlinks that leave the
image root are rejected, except links into directories the user names in
``$CVIT_IMAGE_LINK_TARGETS``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
LINK_TARGETS_ENV = "CVIT_IMAGE_LINK_TARGETS"


class DataError(ValueError):
    """A data file or record is invalid; the message names the file, the record and the field."""


@dataclass(frozen=True)
class Record:
    """One LLaVA-format example, reduced to what training and scoring need."""

    id: str
    image: Path
    question: str
    answer: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    box: tuple[float, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def link_targets() -> list[Path]:
    """Directories that links under an image root may lead into (``$CVIT_IMAGE_LINK_TARGETS``, ``:``-separated).

    Clusters often link shared copies of COCO or GQA into a data folder. Such a link is the
    user's choice, not the data file's, so it may be followed -- but only into directories the
    user names; by default nothing leaves the image root.
    """
    return [Path(entry).resolve() for entry in os.environ.get(LINK_TARGETS_ENV, "").split(os.pathsep) if entry]


def safe_image_path(root: Path, relative: str, where: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse anything that escapes it (absolute, ``..``, links).

    The path text itself must stay under the root; a link under the root may lead only into a
    directory of :func:`link_targets`.
    """
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{where}.image: expected a relative path string, got {relative!r}")
    if Path(relative).is_absolute():
        raise DataError(f"{where}.image: absolute path {relative!r} is not allowed (paths are relative to {root})")
    if os.path.normpath(relative).split(os.sep)[0] == os.pardir:
        raise DataError(f"{where}.image: {relative!r} escapes the image root {root}")
    root_resolved = root.resolve()
    resolved = (root_resolved / relative).resolve()
    if not any(resolved.is_relative_to(allowed) for allowed in (root_resolved, *link_targets())):
        raise DataError(f"{where}.image: {relative!r} escapes the image root {root} through a link "
                        f"(to follow links into {resolved.parent}, list a directory above it in ${LINK_TARGETS_ENV})")
    if not resolved.is_file():
        raise DataError(f"{where}.image: file not found: {resolved}")
    return resolved


def _record_from_json(raw: Any, where: str, image_root: Path) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise DataError(f"{where}.conversations: expected a human turn and a gpt turn")
    human, gpt = conversations[0], conversations[1]
    if not isinstance(human, dict) or not isinstance(gpt, dict):
        raise DataError(f"{where}.conversations: turns must be objects with 'from' and 'value'")
    human_text, answer = human.get("value"), gpt.get("value")
    if not isinstance(human_text, str) or IMAGE_TOKEN not in human_text:
        raise DataError(f"{where}.conversations[0].value: the human turn must contain {IMAGE_TOKEN}")
    if not isinstance(answer, str):
        raise DataError(f"{where}.conversations[1].value: expected the answer text")
    question = raw.get("question", human_text.replace(IMAGE_TOKEN, "").strip())
    answers = raw.get("answers", [answer])
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}.answers: expected a non-empty list of strings")
    return Record(
        id=str(_field(raw, "id", where, (str, int), "a string or integer", where)),
        image=safe_image_path(image_root, raw.get("image"), where),
        question=_field(raw, "question", where, str, "a string", question),
        answer=_field(raw, "answer", where, str, "a string", answer),
        answers=tuple(answers),
        options=tuple(_field(raw, "options", where, list, "a list of strings", [], item=str)),
        box=_box(raw.get("box", []), where),
        meta=_field(raw, "meta", where, dict, "an object", {}),
    )


def _field(raw: dict, key: str, where: str, types: type | tuple[type, ...], expected: str, default: Any, item: type | None = None) -> Any:
    """``raw[key]`` (``default`` when absent) of the JSON type a record's field must have, else a DataError naming it."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, types) or (item is not None and not all(isinstance(v, item) for v in value)):
        raise DataError(f"{where}.{key}: expected {expected}, got {value!r}")
    return value


def _box(value: Any, where: str) -> tuple[float, ...]:
    """A box is absent (``[]``) or four finite numbers x1, y1, x2, y2 (the grounding scorers index all four)."""
    numbers = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numbers or len(value) not in (0, 4):
        raise DataError(f"{where}.box: expected four finite numbers [x1, y1, x2, y2] (or none), got {value!r}")
    return tuple(float(v) for v in value)


def read_llava_json(json_path: Path, image_root: Path | None = None) -> list[Record]:
    """Read and validate every record of a LLaVA-format JSON file (images relative to ``image_root``)."""
    json_path = Path(json_path)
    image_root = Path(image_root) if image_root is not None else json_path.parent
    try:
        raw_records = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{json_path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{json_path}: malformed JSON: {error}") from None
    if not isinstance(raw_records, list):
        raise DataError(f"{json_path}: expected a JSON list of records")
    if not raw_records:
        raise DataError(f"{json_path}: no records (empty task)")
    return [
        _record_from_json(raw, f"{json_path}: record {i} (id {raw.get('id') if isinstance(raw, dict) else '?'})", image_root)
        for i, raw in enumerate(raw_records)
    ]
