"""`mllm-dcl` and `mllm-acl` on files shaped like the MLLM-CL release: convert, validate, phrase and score.

The release's layout and shapes, as the authors' README and scripts (github.com/bjzhb666/MLLM-CL) read them: each
task folder holds train.json (LLaVA conversations) and images/; MLLM-DCL keeps test.json beside them, MLLM-ACL in
<Task>_test/; test files are question files (``question_id``, ``image``, ``text``, ``answer``) whose image paths
are relative to their own folder, plus OCRBench's ``answer_type`` (OCR) and MathVista's ``question_type``,
``answer_type`` and ``choices`` (Math).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.data.samples import phrase_all
from cvit_bench.evaluation.scoring import score_task
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite

HANDWRITTEN = "Handwritten Mathematical Expression Recognition"
# suite -> task folder -> test rows (question_id and image added below) and, per row, a reply and its expected score.
RELEASE = {
    "mllm-dcl": {
        "RS": [({"text": "What lies along the field?", "answer": "Runway"}, "A long runway.", 1.0),
               ({"text": "What is this area?", "answer": "dense residential"}, "A residential area", 0.0)],
        "Med": [({"text": "Is there necrosis?", "answer": "yes"}, "Yes, there is.", 1.0),
                ({"text": "What organ is shown?", "answer": "liver"}, "Unanswerable", 0.0)],
        "AD": [({"text": "What is the ego car doing?", "answer": "going straight"}, "It is going straight ahead", 1.0),
               ({"text": "Is the light red?", "answer": "no"}, "The light is green", 0.0)],
        "Sci": [({"text": "Which label marks the leaf?\nA. x\nB. y", "answer": "B", "source": "AI2D"}, "B", 1.0),
                ({"text": "Which states have the highest value?", "answer": "Ohio, Texas", "source": "MapQA"}, "ohio", 0.5)],
        "Fin": [({"text": "Did revenue grow?", "answer": "Yes"}, "Yes.", 1.0),
                ({"text": "Which year was best?\nA. 2020\nB. 2021", "answer": "B"}, "A", 0.0)],
    },
    "mllm-acl": {
        "OCR": [({"text": "What is written?", "answer": ["STOP", "stop sign"], "answer_type": "Regular Text Recognition"},
                 "It says stop.", 1.0),
                ({"text": "Write the expression.", "answer": ["x^{2}+1"], "answer_type": HANDWRITTEN}, "X ^ { 2 } + 1", 0.0)],
        "Math": [({"text": "What fraction is blue?", "answer": "8/11", "question_type": "multi_choice", "answer_type": "text",
                   "choices": ["3/11", "8/11"]}, "(B) 8/11", 1.0),
                 ({"text": "How many sides?", "answer": "6", "question_type": "free_form", "answer_type": "integer"},
                  "There are 6 sides.", 0.0)],  # the rules cannot read it: the judge's part, 0 here
        "VP": [({"text": "Which is closer?\n(A) box\n(B) lamp", "answer": "(B)"}, "(B) lamp", 1.0),
               ({"text": "How many chairs?\n(A) 2\n(B) 3", "answer": "(A)"}, "(B)", 0.0)],
        "APP": [({"text": "Where do you tap to log in?", "answer": "the top button"}, "tap the top button", None)],
    },
}


def write_release(suite_name: str, root: Path) -> None:
    """Release-shaped train and test files for every task, with a tiny PNG for every image they name."""
    test_folder = "{}_test" if suite_name == "mllm-acl" else "{}"
    for task, rows in RELEASE[suite_name].items():
        for split, folder in (("train", task), ("test", test_folder.format(task))):
            records = []
            for i, (row, _, _) in enumerate(rows):
                fields = {key: value for key, value in row.items() if key != "source"}
                image = f"images/{row.get('source', task)}_{split}_{i}.png"
                (root / folder / image).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 90, 160)).save(root / folder / image)
                answer = fields["answer"][0] if isinstance(fields["answer"], list) else fields["answer"]
                if split == "train":
                    records.append({"id": f"{task}-train-{i}", "image": image,
                                    "conversations": [{"from": "human", "value": f"<image>\n{fields['text']}"},
                                                      {"from": "gpt", "value": answer}]})
                else:
                    records.append({"question_id": f"{task}-{i}", "image": image, **fields})
            (root / folder / f"{split}.json").write_text(json.dumps(records))


@pytest.fixture(scope="module", params=["mllm-dcl", "mllm-acl"])
def converted(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    write_release(request.param, root / "release")
    runner = CliRunner()
    outcome = runner.invoke(app, ["convert", request.param, str(root / "release"), str(root / "data")])
    assert outcome.exit_code == 0, outcome.output
    return request.param, root / "data"


def test_the_suites_have_the_published_orders_and_declare_what_they_do_not_score():
    assert load_suite("mllm-dcl").task_names == ["rs", "med", "ad", "sci", "fin"]
    acl = load_suite("mllm-acl")
    assert acl.task_names == ["ocr", "math", "vp", "app"]
    assert [item.name for item in acl.not_computed] == ["mathvista-llm-judge", "app-server-score"]
    assert {task.name: task.max_new_tokens for task in acl.tasks}["vp"] == 64


def test_converted_release_validates(converted):
    suite_name, data = converted
    outcome = CliRunner().invoke(app, ["validate", suite_name, "--data-root", str(data)])
    assert outcome.exit_code == 0 and "all data found" in outcome.output, outcome.output


def test_converted_release_phrases_and_scores_as_the_authors_do(converted):
    suite_name, data = converted
    suite = load_suite(suite_name)
    loaded = materialize(suite, 0, data)
    for task, rows in zip(suite.tasks, RELEASE[suite_name].values()):
        records = loaded.records(task.name, "test")
        assert all(record.image.is_relative_to((data / "release").resolve()) for record in records)  # the release's own images
        samples = phrase_all(records, task.name, task.template.train[:1])
        scores = score_task(task.scorer, [reply for _, reply, _ in rows], [s.scoring_fields for s in samples]).per_sample
        expected = [score for _, _, score in rows]
        if task.scorer == "not_computed":
            assert all(score != score for score in scores)  # NaN: the cell stays empty
        else:
            assert scores == pytest.approx(expected), task.name


def test_prompts_carry_the_authors_suffixes(converted):
    suite_name, data = converted
    suite = load_suite(suite_name)
    loaded = materialize(suite, 0, data)
    prompts = {task.name: [s.turns[-1].prompt for s in phrase_all(loaded.records(task.name, "test"), task.name, task.template.train[:1])]
               for task in suite.tasks}
    if suite_name == "mllm-dcl":
        assert prompts["med"][0] == "Is there necrosis? Answer the question with a single word (or phrase)."
        assert prompts["fin"] == ["Did revenue grow? Only answer with yes or no directly.",
                                  "Which year was best?\nA. 2020\nB. 2021 Answer the question with a single letter choice."]
        assert prompts["rs"][0] == "What lies along the field?"  # sent as released
    else:
        assert prompts["vp"][0] == "Which is closer?\n(A) box\n(B) lamp"
        math = loaded.records("math", "test")[0]
        assert math.options == ("3/11", "8/11") and math.meta == {"question_type": "multi_choice", "answer_type": "text"}


def test_a_tiny_model_run_leaves_app_empty_and_averages_the_rest(converted, tmp_path):
    """End to end on the fixture: the runner hands the records' meta to the scorers, and APP's column stays null."""
    import dataclasses

    from cvit_bench.io import read_json
    from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer
    from cvit_bench.runner import RunOptions, run

    suite_name, data = converted
    if suite_name != "mllm-acl":
        pytest.skip("one run covers both suites' path; mllm-acl is the one with a not-computed task")
    suite = load_suite(suite_name)
    texts = [p.read_text() for p in data.glob("*/*.json")]
    config = TinyLlavaConfig(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
                             text_layers=1, text_heads=2, text_intermediate=64, vocab_size=300, max_positions=1024)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    save_tiny(build_model(tokenizer, config), build_processor(tokenizer, config), tmp_path / "model")
    tasks = tuple(dataclasses.replace(task, max_new_tokens=4) for task in suite.tasks)  # replies' length is not under test
    suite = dataclasses.replace(suite, tasks=tasks, training=dataclasses.replace(suite.training, batch_size=2))
    run_dir = run(RunOptions(suite, "seqlora", 0, tmp_path / "results", model=str(tmp_path / "model"), data_root=data,
                             steps_per_task=1, threads=1))
    result = read_json(run_dir / "results.json")
    vu = result["matrices"]["seen"]["vu"]
    assert len(vu) == len(suite.tasks) + 1 and all(row[3] is None for row in vu)
    assert all(value is not None for row in vu for value in row[:3])
    assert result["metrics"]["AP"] == pytest.approx(sum(vu[-1][:3]) / 3)
