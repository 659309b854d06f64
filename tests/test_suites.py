"""Suite registry and validation: every shipped suite loads; bad suites fail naming file and field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cvit_bench.cli import app
from cvit_bench.registry import Registry, UnknownNameError
from cvit_bench.suites.schema import SUITES_DIR, TEMPLATES_DIR, SuiteError, heldout_repeats, load_suite, load_templates, suite_names

runner = CliRunner()


def write_suite(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((SUITES_DIR / "cvit-v1-smoke.yaml").read_text())
    data.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", suite_names())
def test_every_shipped_suite_validates(name):
    suite = load_suite(name)
    assert suite.tasks and all(t.template.train and t.template.heldout for t in suite.tasks)


def test_cvit_v1_has_the_published_task_order_and_unseen_tasks():
    suite = load_suite("cvit-v1")
    assert suite.task_names == ["mcq", "ocr", "caption", "classify", "relation", "vqa"]
    assert [t.name for t in suite.unseen] == ["unanswerable", "textcap", "scene"]
    assert next(t for t in suite.unseen if t.name == "scene").shots == (0, 5, 10)


def test_unknown_suite_name_suggests_the_closest():
    with pytest.raises(SuiteError, match=r"did you mean 'cvit-v2'"):
        load_suite("cvit-v2x")


def test_registry_suggests_closest_name():
    registry: Registry[int] = Registry("method")
    registry.add("branchlora", 1)
    with pytest.raises(UnknownNameError, match="did you mean 'branchlora'"):
        registry.get("brnachlora")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntasks: [\n")
    with pytest.raises(SuiteError, match=r"broken.yaml: malformed YAML"):
        load_suite(str(path))


def test_every_problem_is_reported_with_its_field(tmp_path):
    path = write_suite(
        tmp_path,
        colour="blue",
        tasks=[{"name": "mcq", "kind": "mcqq", "template": "mcq", "scorer": "option_leter", "train_size": 4, "test_size": 2}],
    )
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    text = str(error.value)
    assert "unknown key 'colour'" in text
    assert "tasks[0].kind" in text and "did you mean 'mcq'" in text
    assert "tasks[0].scorer" in text and "did you mean 'option_letter'" in text


def test_template_without_contract_is_rejected(tmp_path):
    (tmp_path / "mcq.yaml").write_text(
        "task_type: mcq\ntrain:\n  - prompt: '{question} letter?'\nheldout:\n  - prompt: '{question}'\n    contract: letter\n"
    )
    problems: list[str] = []
    assert load_templates("mcq", problems, tmp_path) is None or problems
    assert any("train[0].contract: missing" in p and "mcq.yaml" in p for p in problems)


def test_shipped_templates_have_train_and_heldout_phrasings():
    for path in TEMPLATES_DIR.glob("*.yaml"):
        problems: list[str] = []
        templates = load_templates(path.stem, problems)
        assert not problems, problems
        assert templates.train and templates.heldout


def test_validate_command_reports_problems_and_exit_code(tmp_path):
    path = write_suite(tmp_path, training={"steps_per_task": "many"})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "training.steps_per_task" in result.output
    assert runner.invoke(app, ["validate", "cvit-v2"]).exit_code == 0


def test_chance_and_ceiling_are_checked_with_their_field(tmp_path):
    tasks = yaml.safe_load((SUITES_DIR / "cvit-v1-smoke.yaml").read_text())["tasks"]
    by_name = {task["name"]: task for task in tasks}
    by_name["mcq"]["chance"] = 25
    by_name["ocr"]["chance"] = True
    by_name["caption"]["chance"] = 80.0  # a CIDEr task needs its ceiling
    by_name["classify"].update(chance=60.0, ceiling=50.0)
    with pytest.raises(SuiteError) as error:
        load_suite(str(write_suite(tmp_path, tasks=tasks)))
    text = str(error.value)
    assert "tasks[1].chance: expected a non-negative number, got True" in text
    assert "tasks[2].ceiling: a cider task that declares chance needs a ceiling" in text
    assert "tasks[3].chance: 60.0 must be below the ceiling (50.0)" in text
    assert "tasks[0]" not in text
    by_name["ocr"]["chance"], by_name["caption"]["ceiling"], by_name["classify"]["ceiling"] = 3, 400, 100
    suite = load_suite(str(write_suite(tmp_path, tasks=tasks)))
    assert [(t.chance, t.nap_ceiling) for t in suite.tasks[:4]] == [(25.0, 100.0), (3.0, 100.0), (80.0, 400.0), (60.0, 100.0)]


def test_validate_refuses_a_heldout_phrasing_that_a_task_trains_on():
    # cvit-v1 (frozen) has three: ocr and classify held-out[1] are relation's train[0], vqa held-out[1] is ocr's.
    result = runner.invoke(app, ["validate", "cvit-v1"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "3 problem(s)" in text
    assert "ocr.yaml: heldout[1].prompt: equals a training phrasing of task relation" in text and "relation.yaml: train[0]" in text
    assert "vqa.yaml: heldout[1].prompt: equals a training phrasing of task ocr" in text
    assert not heldout_repeats(load_suite("cvit-v2"))


def test_ls_lists_suites_methods_and_scorers():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0, result.output
    for name in ("cvit-v1", "seqlora", "joint", "zeroshot", "vqa_accuracy", "json_answer"):
        assert name in result.output
