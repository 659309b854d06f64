"""Real-data suites (CoIN, SMoLoRA's CVIT, UCIT) on small LLaVA-format fixtures: they validate, their
data is found in each task's declared folder (or reported missing with how to obtain it), and each
runs end to end on a tiny random LLaVA."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cvit_bench.data.llava_format import DataError
from cvit_bench.suites.availability import check_data, format_report, image_root, task_folder
from cvit_bench.suites.materialize import DATA_ROOT_ENV, evaluation_subset, materialize
from cvit_bench.suites.schema import RealSuite, RealTaskSpec, SuiteError, TaskSpec, load_suite

REAL_SUITES = ["coin", "smolora-cvit", "smolora-cvit-multi", "ucit", "mllm-dcl", "mllm-acl"]
CAPTIONS = ["a dog runs across the green grass.", "a brown dog is running on a lawn.", "the dog plays outside in the sun."]
LABELS = ["dog", "cat", "tree"]


def record_fields(task: RealTaskSpec, i: int) -> dict:
    """Answer shapes of the real task: letters, 10 annotator answers, boxes, several references."""
    if task.template.task_type == "llava/mcq":
        options = ["red", "blue", "green"]
        question = "Which colour is the square?\n" + "\n".join(f"{chr(65 + k)}. {o}" for k, o in enumerate(options))
        return {"question": question, "answer": "ABC"[i % 3], "options": options}
    if task.scorer in ("cider", "cider_single_ref", "caption_mean"):
        return {"question": "", "answer": CAPTIONS[i % 3], "answers": CAPTIONS[i % 3:] + CAPTIONS[: i % 3]}
    if task.scorer.startswith("grounding_iou"):
        box = [0.1, 0.2, 0.5, 0.6 + 0.1 * (i % 3)]
        return {"question": "the red square on the left", "answer": json.dumps(box).replace(",", ", "), "box": box}
    if task.scorer.startswith("vqa_accuracy"):
        return {"question": "How many dogs are there?", "answer": "2", "answers": ["2"] * 6 + ["two"] * 3 + ["3"]}
    if task.template.task_type.startswith(("llava/classify", "llava/scene")):
        return {"question": "", "answer": LABELS[i % 3]}
    return {"question": "What animal is this?", "answer": LABELS[i % 3]}


def write_task(root: Path, suite: RealSuite, task: RealTaskSpec, split: str, n: int) -> None:
    folder, images = task_folder(root, task), image_root(root, suite, task)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        relative = f"{task.name}/{split}/{i}.png"
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i % 256, 90, 160)).save(images / relative)
        fields = record_fields(task, i)
        human = "<image>\n" + (fields["question"] or "Describe.")
        records.append({"id": f"{task.name}-{split}-{i}", "image": relative,
                        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": fields["answer"]}], **fields})
    (folder / f"{split}.json").write_text(json.dumps(records))


def write_fixture(root: Path, suite: RealSuite, n: int = 3) -> Path:
    """Train and test files for every task the suite reads (few-shot tasks get enough examples)."""
    for task in suite.tasks:
        write_task(root, suite, task, "train", n)
        write_task(root, suite, task, "test", n)
    for task in suite.unseen:
        if max(task.shots) > 0:
            write_task(root, suite, task, "train", max(task.shots))
        write_task(root, suite, task, "test", n)
    return root


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    """One data root holding all real suites' fixtures (their folders do not overlap)."""
    root = tmp_path_factory.mktemp("real-data")
    for name in REAL_SUITES:
        write_fixture(root, load_suite(name))
    return root


@pytest.fixture
def coin_root(tmp_path) -> Path:
    return write_fixture(tmp_path / "data", load_suite("coin"))


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_SUITES)
def test_real_suites_validate_with_folders_and_obtain_hints(name):
    suite = load_suite(name)
    assert isinstance(suite, RealSuite) and suite.images
    assert all(isinstance(t, RealTaskSpec) and t.data and t.obtain for t in suite.tasks + suite.unseen)


def test_real_suites_have_the_published_orders_and_unseen_tasks():
    assert load_suite("coin").task_names == ["scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa"]
    assert load_suite("ucit").task_names == ["imagenet-r", "arxivqa", "vizwiz-caption", "iconqa", "clevr-math", "flickr30k"]
    for name in ("smolora-cvit", "smolora-cvit-multi"):
        suite = load_suite(name)
        assert suite.task_names == ["scienceqa", "textvqa", "flickr30k", "imagenet", "gqa", "vqav2"]
        assert [(t.name, t.shots) for t in suite.unseen] == [("vizwiz", (0,)), ("textcaps", (0,)), ("ocrvqa", (0,)), ("places365", (5, 10))]
    assert {t.name: t.scorer for t in load_suite("smolora-cvit").tasks}["vqav2"] == "upper_exact_match"
    assert len(load_suite("smolora-cvit-multi").tasks[1].template.training_phrasings("multi")) == 5


def test_llm_judge_scores_are_declared_not_computed():
    [general_knowledge] = load_suite("coin").not_computed
    assert general_knowledge.name == "general-knowledge" and "LLM judge" in general_knowledge.describe()
    assert [item.name for item in load_suite("ucit").not_computed] == ["llm-judge-similarity"]


def test_synthetic_suites_keep_their_recorded_setup():
    """Real-data fields live on the subclasses, so a synthetic suite's setup (and config hash) is as before."""
    setup = dataclasses.asdict(load_suite("cvit-v1"))
    assert not {"images", "not_computed"} & set(setup)
    assert set(setup["tasks"][0]) - set(TaskSpec.ADDED_LATER) == {"name", "kind", "template", "scorer", "train_size", "test_size", "shots", "data"}


def write_suite(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((Path(load_suite("coin").path)).read_text())
    edit(data)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_invalid_real_suite_fields_are_named(tmp_path):
    def edit(data):
        data["tasks"][0]["data"] = "../outside"
        data["tasks"][1]["train_size"] = 10
        data["tasks"][2]["obtain"] = ["not", "a", "string"]
        data["not_computed"] = [{"name": "judge"}, {"name": "x", "reason": "y", "colour": "red"}]
        data["data"]["images"] = "/abs"

    with pytest.raises(SuiteError) as error:
        load_suite(str(write_suite(tmp_path, edit)))
    text = str(error.value)
    for field in ("tasks[0].data: '../outside' must stay inside the data root", "tasks[1].train_size", "tasks[2].obtain",
                  "not_computed[0].reason", "not_computed[1]: unknown key 'colour'", "data.images: '/abs' must stay inside"):
        assert field in text
    assert "suite.yaml" in text


def test_synthetic_suites_refuse_real_data_fields(tmp_path):
    data = yaml.safe_load(Path(load_suite("cvit-v1-smoke").path).read_text())
    data["not_computed"] = [{"name": "x", "reason": "y"}]
    data["tasks"][0]["obtain"] = "somewhere"
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    assert "tasks[0].obtain: only real" in str(error.value) and "not_computed: only real" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_SUITES)
def test_complete_fixture_has_nothing_missing(fixture_root, name):
    suite = load_suite(name)
    assert check_data(suite, fixture_root) == []
    assert format_report(suite, fixture_root, []) == f"{name}: all data found under {fixture_root}"


def test_missing_json_is_named_with_the_obtain_hint(coin_root):
    suite = load_suite("coin")
    path = coin_root / "Instructions" / "GQA" / "test.json"
    path.unlink()
    [missing] = check_data(suite, coin_root)
    assert (missing.task, missing.split, missing.path, missing.problem) == ("gqa", "test", path, "file not found")
    assert missing.obtain == next(t.obtain for t in suite.tasks if t.name == "gqa")
    report = format_report(suite, coin_root, [missing])
    assert str(path) in report and "how to obtain: Instructions: huggingface.co/datasets/Zacks-Chen/CoIN, GQA/" in report


def test_missing_images_are_counted_with_examples_naming_record_and_field(coin_root):
    suite = load_suite("coin")
    for i in (0, 2):
        (coin_root / "cl_dataset" / "textvqa" / "train" / f"{i}.png").unlink()
    [missing] = check_data(suite, coin_root)
    assert (missing.task, missing.split, missing.missing) == ("textvqa", "train", 2)
    assert missing.problem.startswith("2 of 3 records name no usable image (field 'image'")
    assert missing.examples[0].startswith("record 0 (id textvqa-train-0).image: file not found:")
    assert check_data(suite, coin_root, images=False) == []  # the quick check only looks for the JSON files


def test_image_paths_escaping_the_root_are_reported_and_refused(coin_root):
    suite = load_suite("coin")
    path = coin_root / "Instructions" / "ImageNet" / "test.json"
    records = json.loads(path.read_text())
    records[1]["image"] = "../../outside.png"
    path.write_text(json.dumps(records))
    (coin_root.parent / "outside.png").write_bytes(b"x")
    [missing] = check_data(suite, coin_root)
    assert "record 1 (id imagenet-test-1).image: '../../outside.png' escapes the image root" in missing.examples[0]
    with pytest.raises(DataError, match="escapes the image root"):
        materialize(suite, 0, coin_root).records("imagenet", "test")


# ---------------------------------------------------------------------------------------------
# Locating real data
# ---------------------------------------------------------------------------------------------


def test_records_come_from_the_tasks_declared_folder(fixture_root):
    data = materialize(load_suite("coin"), 0, fixture_root)
    records = data.records("grounding", "test")
    assert [r.id for r in records] == [f"grounding-test-{i}" for i in range(3)]
    assert records[0].image == (fixture_root / "cl_dataset" / "grounding" / "test" / "0.png").resolve()
    assert records[0].box == (0.1, 0.2, 0.5, 0.6)
    assert not (fixture_root / "grounding").exists()  # not root/<task name>, as synthetic suites read


def test_data_root_comes_from_the_environment_when_not_passed(fixture_root, monkeypatch, tmp_path):
    suite = load_suite("ucit")
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match=f"pass --data-root or set {DATA_ROOT_ENV}"):
        materialize(suite, 0)
    monkeypatch.setenv(DATA_ROOT_ENV, str(fixture_root))
    assert materialize(suite, 0).root == fixture_root
    with pytest.raises(DataError, match=f"data missing under {tmp_path}"):  # an explicit root wins
        materialize(suite, 0, tmp_path)


def test_missing_annotation_file_stops_a_run_before_it_starts(coin_root):
    (coin_root / "Instructions" / "OCRVQA" / "train.json").unlink()
    with pytest.raises(DataError, match=r"(?s)ocrvqa:.*train.json: file not found.*how to obtain: .*test_1.json saved as test.json"):
        materialize(load_suite("coin"), 0, coin_root)


def test_data_hash_covers_annotation_files_not_images(coin_root):
    suite = load_suite("coin")
    before = materialize(suite, 0, coin_root).data_hash
    Image.new("RGB", (16, 16)).save(coin_root / "cl_dataset" / "gqa" / "test" / "0.png")
    assert materialize(suite, 0, coin_root).data_hash == before
    path = coin_root / "Instructions" / "GQA" / "test.json"
    path.write_text(path.read_text().replace('"dog"', '"cat"', 1))
    assert materialize(suite, 0, coin_root).data_hash != before


def test_test_size_caps_evaluation_to_a_fixed_subset(tmp_path):
    suite = load_suite("coin")
    capped = dataclasses.replace(suite, tasks=(dataclasses.replace(suite.tasks[0], test_size=3), *suite.tasks[1:]))
    root = write_fixture(tmp_path / "data", suite, n=8)
    data = materialize(capped, 0, root)
    chosen = [r.id for r in data.records("scienceqa", "test")]
    assert len(chosen) == 3 and chosen == [r.id for r in materialize(capped, 1, root).records("scienceqa", "test")]
    assert len(data.records("scienceqa", "train")) == 8 and len(data.records("textvqa", "test")) == 8
    path = task_folder(root, suite.tasks[0]) / "test.json"
    shuffled = json.loads(path.read_text())
    random.Random(0).shuffle(shuffled)
    path.write_text(json.dumps(shuffled))
    assert sorted(r.id for r in materialize(capped, 0, root).records("scienceqa", "test")) == sorted(chosen)
    everything = data.records("textvqa", "test")
    assert evaluation_subset(everything, 20) == everything


# ---------------------------------------------------------------------------------------------
# End to end on a tiny random LLaVA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, fixture_root) -> Path:
    """A very small random LLaVA whose tokenizer knows the fixtures' words and the suites' phrasings."""
    from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer

    texts = [json.dumps(json.loads(p.read_text())) for p in fixture_root.rglob("*.json")]
    texts += [p.prompt for name in REAL_SUITES for t in load_suite(name).tasks + load_suite(name).unseen
              for p in t.template.train + t.template.heldout]
    config = TinyLlavaConfig(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
                             text_layers=1, text_heads=2, text_intermediate=64, vocab_size=400, max_positions=2048)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    directory = tmp_path_factory.mktemp("tiny-llava")
    save_tiny(build_model(tokenizer, config), build_processor(tokenizer, config), directory)
    return directory


@pytest.fixture
def one_thread():
    """A model this small runs several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["coin", "smolora-cvit", "ucit"])
def test_real_suite_runs_end_to_end(name, fixture_root, tiny_model, tmp_path, one_thread):
    from cvit_bench.io import read_json
    from cvit_bench.runner import RunOptions, run

    suite = load_suite(name)
    suite = dataclasses.replace(suite, training=dataclasses.replace(suite.training, batch_size=2))
    run_dir = run(RunOptions(suite, "seqlora", 0, tmp_path, model=str(tiny_model), data_root=fixture_root, steps_per_task=1,
                             threads=one_thread))
    result = read_json(run_dir / "results.json")
    info = result["run_info"]
    assert info["task_order"] == suite.task_names
    assert len(result["matrices"]["seen"]["vu"]) == len(suite.tasks) + 1
    assert info["config"]["suite"]["not_computed"] == [dataclasses.asdict(item) for item in suite.not_computed]
    if name == "smolora-cvit":
        assert info["unseen_tasks"] == ["vizwiz", "textcaps", "ocrvqa", "places365-5shot", "places365-10shot"]
    recipe = suite.method_defaults["seqlora"]
    assert {key: info["method_config"][key] for key in recipe} == recipe and info["config"]["method_config"] == info["method_config"]


@pytest.mark.parametrize("name", REAL_SUITES)
def test_real_suites_carry_a_recipe_for_every_method_that_trains(name):
    from cvit_bench.methods import METHODS
    from cvit_bench.runner import build_method

    suite = load_suite(name)
    for method in METHODS.names():
        if build_method(method, {}).trains():
            assert method in suite.method_defaults, f"{name}: no recipe for {method}"
            config = build_method(method, {}, suite.method_defaults[method]).config
            assert config.lr <= 2e-4 and config.lr == suite.method_defaults[method]["lr"], f"{name}: {method} keeps a tiny-model lr"
    assert suite.training.epochs_per_task == 1


def test_a_real_suite_without_a_methods_recipe_refuses_to_run_it(tmp_path):
    from cvit_bench.registry import ConfigError
    from cvit_bench.runner import RunOptions, run

    path = write_suite(tmp_path, lambda data: data["method_defaults"].pop("moelora"))
    with pytest.raises(ConfigError, match=r"method_defaults\.moelora: missing; a real suite carries its paper's recipe"):
        run(RunOptions(load_suite(str(path)), "moelora", 0, tmp_path, model="unused", data_root=tmp_path))


def test_validate_command_checks_the_data_and_names_what_is_missing(coin_root, monkeypatch):
    from typer.testing import CliRunner

    from cvit_bench.cli import app

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    runner = CliRunner()
    complete = runner.invoke(app, ["validate", "coin", "--data-root", str(coin_root)])
    assert complete.exit_code == 0, complete.output
    assert "all data found" in complete.output and "general-knowledge is not computed" in complete.output
    (task_folder(coin_root, load_suite("coin").tasks[1]) / "test.json").unlink()
    monkeypatch.setenv(DATA_ROOT_ENV, str(coin_root))
    missing = runner.invoke(app, ["validate", "coin"])
    assert missing.exit_code == 1
    assert "test.json" in missing.output and "how to obtain" in missing.output


def test_real_suite_needs_a_model_and_templates_stay_under_their_folder(coin_root, tmp_path):
    from cvit_bench.registry import ConfigError
    from cvit_bench.runner import RunOptions, run

    with pytest.raises(ConfigError, match="pass --model"):
        run(RunOptions(load_suite("coin"), "seqlora", 0, tmp_path, data_root=coin_root))
    suite = yaml.safe_load(load_suite("coin").path.read_text())
    suite["tasks"][0]["template"] = "../task_suites/coin"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(suite))
    with pytest.raises(SuiteError, match=r"relative, '/'-separated safe names"):
        load_suite(str(bad))
