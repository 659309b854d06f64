"""`cvit-bench convert` on files shaped like CoIN's release (tests/fixtures/coin-release), then validate and a run on them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.data.convert import convert_suite, split_instruction
from cvit_bench.data.llava_format import DataError, read_llava_json
from cvit_bench.suites.schema import load_suite

from conftest import tiny_run_on_converted

RELEASE = Path(__file__).parent / "fixtures" / "coin-release"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The fixture's annotation files, with a tiny image for every path they name (under CoIN's cl_dataset/)."""
    root = tmp_path_factory.mktemp("coin-release")
    shutil.copytree(RELEASE, root, dirs_exist_ok=True)
    for path in root.rglob("*.json"):
        text = path.read_text()
        rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
        for i, row in enumerate(rows):
            image = root / "cl_dataset" / row["image"]
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 90, 160)).save(image, format="PNG")
    return root


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("coin-converted")
    convert_suite(load_suite("coin"), release, dst)
    return dst


def read(converted: Path, task: str, split: str):
    return {r.id: r for r in read_llava_json(converted / "Instructions" / task / f"{split}.json", converted / "cl_dataset")}


def test_question_files_become_records_without_the_instruction(converted):
    science = read(converted, "ScienceQA", "test")["1000"]
    assert science.question == "Which animal is a mammal?\nA. frog\nB. dog\nC. snake"
    assert science.answer == "B" and science.options == ("frog", "dog", "snake")
    short = read(converted, "GQA", "test")["1001"]
    assert short.question == "What is on the table?" and short.answers == ("cup",)
    assert read(converted, "ImageNet", "train")["imagenet-train-2"].question == ""  # the whole prompt is the instruction
    assert read(converted, "VizWiz", "test")["1001"].question == "What colour is the shirt?"


def test_boxes_are_kept_and_the_grounding_phrase_is_the_question(converted):
    ground = read(converted, "Grounding", "test")["1001"]
    assert ground.question == "red car" and ground.box == (0.5, 0.5, 0.9, 0.8)
    assert read(converted, "Grounding", "train")["grounding-train-0"].box == (0.1, 0.2, 0.4, 0.9)


def test_the_prompt_carries_the_instruction_once(converted):
    from cvit_bench.data.samples import phrase

    task = load_suite("coin").tasks[0]
    record = read(converted, "ScienceQA", "train")["scienceqa-train-0"]
    prompt = phrase(record, task.name, task.template.train[0]).turns[-1].prompt
    assert prompt.count("Answer with the option's letter") == 1


def test_unframed_text_is_kept_whole_and_counted(release, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(release, src, symlinks=True)
    path = src / "Instructions" / "GQA" / "test.json"
    rows = json.loads(path.read_text())
    rows[0]["text"] = "Tell me: is the sky blue?"
    path.write_text(json.dumps(rows))
    reports = convert_suite(load_suite("coin"), src, tmp_path / "dst")
    gqa = next(r for r in reports if r.source == path)
    assert (gqa.unframed, gqa.first_unframed) == (1, "1000")
    assert "repeats an instruction" in gqa.describe()
    assert split_instruction("<image>\nTell me: is the sky blue?", load_suite("coin").tasks[3].template.train) == ("Tell me: is the sky blue?", None)


def test_a_question_file_without_answers_is_refused_naming_file_and_field(release, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(release, src, symlinks=True)
    path = src / "Instructions" / "VQAv2" / "test.json"
    rows = json.loads(path.read_text())
    del rows[1]["answer"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"VQAv2/test.json: record 1.answer: missing"):
        convert_suite(load_suite("coin"), src, tmp_path / "dst")
    result = CliRunner().invoke(app, ["convert", "coin", str(src), str(tmp_path / "dst2")])
    assert result.exit_code == 2 and "record 1.answer" in result.output


def test_convert_then_validate_then_a_tiny_model_run(release, tmp_path, monkeypatch):
    dst = tmp_path / "data"
    runner = CliRunner()
    converted = runner.invoke(app, ["convert", "coin", str(release), str(dst)])
    assert converted.exit_code == 0, converted.output
    assert "converted 48 records" in converted.output and "matched no phrasing" not in converted.output
    checked = runner.invoke(app, ["validate", "coin", "--data-root", str(dst)])
    assert checked.exit_code == 0 and "all data found" in checked.output, checked.output

    suite = load_suite("coin")
    result = tiny_run_on_converted(suite, dst, tmp_path)
    assert len(result["matrices"]["seen"]["vu"]) == len(suite.tasks) + 1


def test_soft_vqa_tasks_need_every_annotators_answer(release, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(release, src, symlinks=True)
    path = src / "Instructions" / "TextVQA" / "test.json"
    rows = json.loads(path.read_text())
    del rows[2]["answers"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"TextVQA/test.json: record 2.answers: vqa_accuracy .*TextVQA_0.5.1_val.json"):
        convert_suite(load_suite("coin"), src, tmp_path / "dst")
