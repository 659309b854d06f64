"""cvit-v2's own task kinds: mcq-listed keeps one option order per question type, so its letter follows from the image."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from cvit_bench.suites import synthetic, tasks_v2
from cvit_bench.suites.materialize import _generator_fingerprint
from cvit_bench.suites.tasks_v2 import COLOUR_OPTIONS, KIND_MCQ, SHAPE_OPTIONS, _build_mcq_listed


def test_mcq_listed_letter_names_the_asked_shapes_attribute() -> None:
    rng = random.Random(3)
    for index in range(200):
        sample = _build_mcq_listed(rng, index)
        options = sample.extra["options"]
        assert tuple(options) == (COLOUR_OPTIONS if index % 2 == 0 else SHAPE_OPTIONS)
        correct = options["ABCD".index(sample.answer)]
        if index % 2 == 0:
            name = sample.question.split("of the ")[1].split("?")[0]
            assert [s.colour for s in sample.scene.shapes if s.name == name] == [correct]
        else:
            colour = sample.question.split("is ")[1].split("?")[0]
            assert [s.name for s in sample.scene.shapes if s.colour == colour] == [correct]


def test_mcq_listed_letters_are_balanced_so_a_constant_letter_stays_near_a_quarter() -> None:
    rng = random.Random(5)
    letters = Counter(_build_mcq_listed(rng, index).answer for index in range(2000))
    assert set(letters) == set("ABCD")
    assert max(letters.values()) / 2000 < 0.3


def test_mcq_listed_files_are_reproducible_and_the_kind_enters_the_generator_hash(tmp_path: Path) -> None:
    first = synthetic.generate_task(KIND_MCQ, {"train": 6, "test": 4}, seed=1, out_dir=tmp_path / "a")
    second = synthetic.generate_task(KIND_MCQ, {"train": 6, "test": 4}, seed=1, out_dir=tmp_path / "b")
    assert first["test"].read_bytes() == second["test"].read_bytes()
    record = json.loads(first["test"].read_text())[0]
    assert record["options"] and record["answer"] in "ABCD"
    assert _generator_fingerprint({KIND_MCQ}) != _generator_fingerprint({"mcq"})
    assert _generator_fingerprint({"mcq"}) == _generator_fingerprint({"ocr"})  # cvit-v1's recipe reads synthetic.py alone
    assert KIND_MCQ in tasks_v2.TASK_KINDS
