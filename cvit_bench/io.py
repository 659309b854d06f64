"""Atomic file writes and strict JSON, so a crash or a concurrent reader never sees half a file.

Results, leaderboards and heatmaps are read by other processes (the leaderboard rebuild,
`cvit-bench report`) while runs are still writing; every writer therefore goes through a
temporary file in the target directory and an `os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Read once: tempfile creates files 0600, and results shared on a cluster should get the
# permissions a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMPORARY_SUFFIX = ".tmp"  # atomic writes go through `.NAME.XXXX.tmp` next to their target


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give, for files made through tempfile (which uses 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable: without it an OS crash can keep a later change but lose the rename."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_tree(directory: str | os.PathLike) -> None:
    """Give a folder built under a temporary name (tempfile: 0700; safetensors: 0600) and everything in it the
    permissions plain open()/mkdir() would, before it is renamed into place: one policy for every file cvit-bench writes."""
    directory = Path(directory)
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(directory=path.is_dir()))


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed mid-way (``.NAME.*.tmp``, often zero bytes).

    Call only while no other process writes into ``directory`` (a run holds its directory's lock).
    """
    removed = []
    for path in Path(directory).glob(f".*{_TEMPORARY_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old content or all of `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX, delete=False)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, default_mode())
        os.replace(tmp.name, path)
        fsync_dir(path.parent)
    except OSError as error:  # disk full, permissions: say which file, keep the old one
        Path(tmp.name).unlink(missing_ok=True)
        raise OSError(error.errno, f"writing {path} failed ({error.strerror or error}); its previous content is unchanged") from error
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text through `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy values; NaN and infinities become None.

    Matrices use NaN for "not evaluated" and metrics can be undefined (FWT with one task);
    strict JSON has no NaN, and null is what readers of the schema expect.
    """
    if isinstance(obj, dict):
        return {key: to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (no NaN tokens) written atomically; serialized before the file is touched."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a syntax error names the file, which json's own message does not."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
