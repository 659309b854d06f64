"""`cvit-bench convert smolora-cvit | ucit` on files shaped like their releases, then validate and a tiny-model run on them.

Shapes, as the authors' code reads them (the data files themselves are on the Hugging Face hub):
* training files: LLaVA conversations (``id``, ``image``, ``conversations`` with the instruction inside the human turn);
* SMoLoRA's test files (github.com/Minato-Zackie/SMoLoRA, llava/eval/SMoLoRA/MET/model_*.py and Eval/*.py): a JSON
  list of ``question_id``, ``image``, ``text`` (instruction inside) and ``answer``, which for Flickr30k's val.json is the
  list of reference captions (eval_flickr30k_cider.py scores against ``item['answer']`` as a list); named test.json
  (ScienceQA, ImageNet, GQA, OCR-VQA) or val.json (the others);
* UCIT's (github.com/Ghy0501/HiDe-LLaVA, scripts/HiDe/Eval_UCIT/*.sh): question files test_3000.json, the same
  four fields, and Flickr30k-cap's training file train_brief_4w.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.data.llava_format import read_llava_json
from cvit_bench.suites.availability import required_files
from cvit_bench.suites.schema import load_suite

from conftest import tiny_run_on_converted

# The released file name of each (suite, task folder, split) where it is not train.json / test.json.
RELEASED = {
    "smolora-cvit": {("Instructions_Single/" + task, "test"): "val.json"
                     for task in ("TextVQA", "Flickr30k", "VQAv2", "VizWiz", "TextCaps", "Places365")},
    "ucit": {**{(task, "test"): "test_3000.json" for task in ("ImageNet-R", "ArxivQA", "VizWiz-caption", "IconQA", "CLEVR-Math",
                                                              "Flickr30k-cap")},
             ("Flickr30k-cap", "train"): "train_brief_4w.json"},
}
MCQ = ("Which object is red?\nA. sky\nB. apple\nC. grass", "B")
SHORT = ("What colour is the square?", "red")


def _question_and_answer(task) -> tuple[str, str]:
    """A question and its answer of the task's kind; none for a task whose whole prompt is the instruction (captions,
    classification: their phrasing continues ``{question}`` without a line break)."""
    phrasing = task.template.train[0]
    if phrasing.contract == "letter":
        return MCQ
    return SHORT if "{question}\n" in phrasing.prompt else ("", "red square")


def write_release(suite_name: str, root: Path) -> int:
    """Release-shaped files for every file a run of the suite reads, and an image for each record; returns the record count."""
    suite = load_suite(suite_name)
    count = 0
    for task, split in required_files(suite):
        phrasing = task.template.train[0]
        question, answer = _question_and_answer(task)
        text = phrasing.prompt.replace("{question}", question).strip()
        rows = []
        for i in range(max(3, *task.shots)):  # a few-shot unseen task draws its examples from train
            image = f"{task.name}/{split}-{i}.png"
            if split == "train":
                rows.append({"id": f"{task.name}-train-{i}", "image": image,
                             "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]})
            else:
                row = {"question_id": f"{task.name}-{i}", "image": image, "text": text, "answer": answer}
                if task.scorer in ("vqa_accuracy", "vqa_accuracy_vqaeval"):
                    row["answers"] = [answer] * 10
                if suite_name == "smolora-cvit" and task.data.endswith("Flickr30k"):
                    row["answer"] = [answer, "a red square", "red block", "a square", "the red square"]
                rows.append(row)
            path = root / suite.images / image
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (60 * i, 90, 160)).save(path, format="PNG")
        name = RELEASED[suite_name].get((task.data, split), f"{split}.json")
        (root / task.data).mkdir(parents=True, exist_ok=True)
        (root / task.data / name).write_text(json.dumps(rows))
        count += len(rows)
    return count


@pytest.mark.parametrize("suite_name", ["smolora-cvit", "ucit"])
def test_convert_then_validate_then_a_tiny_model_run(suite_name, tmp_path):
    release, dst = tmp_path / "release", tmp_path / "data"
    records = write_release(suite_name, release)
    runner = CliRunner()
    converted = runner.invoke(app, ["convert", suite_name, str(release), str(dst)])
    assert converted.exit_code == 0, converted.output
    assert f"converted {records} records" in converted.output and "matched no phrasing" not in converted.output
    checked = runner.invoke(app, ["validate", suite_name, "--data-root", str(dst)])
    assert checked.exit_code == 0 and "all data found" in checked.output, checked.output

    suite = load_suite(suite_name)
    images = dst / suite.images
    for task, split in required_files(suite):
        question, answer = _question_and_answer(task)
        for record in read_llava_json(dst / task.data / f"{split}.json", images):
            assert record.question == question  # the instruction was cut out
            if task.template.train[0].contract == "letter":
                assert record.options == ("sky", "apple", "grass")
    result = tiny_run_on_converted(suite, dst, tmp_path)
    assert len(result["matrices"]["seen"]["vu"]) == len(suite.tasks) + 1
