import json
import math
import os

import numpy as np
import pytest

from cvit_bench.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, to_jsonable


def test_atomic_write_creates_parent_dirs_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    assert os.listdir(path.parent) == ["out.txt"]


def _fail(*args):
    raise OSError("disk vanished")


def test_failed_replace_leaves_neither_target_nor_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_content(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"version": 1})
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_json(path, {"version": 2})
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_unserializable_object_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "out.json", {"ok": 1, "bad": object()})
    assert os.listdir(tmp_path) == []


def test_to_jsonable_turns_numpy_and_non_finite_values_into_json_types():
    converted = to_jsonable({
        "matrix": np.array([[1.0, np.nan], [np.inf, 2.5]]),
        "scalar": np.float32(0.5),
        "count": np.int64(3),
        "nested": [(float("-inf"), np.bool_(True))],
        "zero_d": np.array(7),
    })
    assert converted == {
        "matrix": [[1.0, None], [None, 2.5]],
        "scalar": 0.5,
        "count": 3,
        "nested": [[None, True]],
        "zero_d": 7,
    }
    assert type(converted["count"]) is int and type(converted["nested"][0][1]) is bool


def test_nan_round_trips_as_null(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"vu": np.array([[50.0, np.nan]]), "FWT": float("nan")})
    text = path.read_text()
    assert "NaN" not in text and "null" in text
    loaded = read_json(path)
    assert loaded == {"vu": [[50.0, None]], "FWT": None}
    restored = np.array(loaded["vu"], dtype=float)
    assert restored[0, 0] == 50.0 and math.isnan(restored[0, 1])


def test_json_keeps_key_order_and_indentation(tmp_path):
    path = tmp_path / "o.json"
    atomic_write_json(path, {"z": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"z": 1, "a": [1, 2]}, indent=2) + "\n"


def test_read_json_error_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,')
    with pytest.raises(ValueError, match="broken.json.*line 1"):
        read_json(path)
