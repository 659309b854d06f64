"""BranchLoRA as its paper counts it, its task selector on untrained features, and MoELoRA at seqlora's rank budget."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import question_removed
from cvit_bench.methods.branchlora import TaskSelector, mean_direction
from cvit_bench.methods.mixture import MixtureLoraLinear
from cvit_bench.models.backend import load_model
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.registry import ConfigError
from cvit_bench.runner import build_method
from cvit_bench.suites.schema import load_suite
from cvit_bench.training.loop import train_stage

from conftest import phrased

DEFAULT_SUITE = "cvit-v2"


@pytest.fixture(scope="module")
def smoke(smoke_setup):
    suite, model_dir, data = smoke_setup
    samples = phrased(suite, data, "train", lambda task: task.template.training_phrasings("single"))
    return suite, model_dir, samples, phrased(suite, data, "test", lambda task: task.template.heldout)


def fresh(smoke, method_name: str = "branchlora", **options):
    suite, model_dir, _, _ = smoke
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    method = build_method(method_name, options)
    return method.wrap_model(model, suite.task_names), method, Collator(processor)


def train(smoke, model, method, collator, task: str, stage: int, steps: int = 4):
    suite, _, samples, _ = smoke
    config = dataclasses.replace(suite.training, warmup_steps=1)
    method.before_stage(stage, (task,), model)
    train_stage(model, method, samples[task], collator, config, steps=steps, seed=f"test-{stage}")
    return method.after_stage(stage, model, samples[task], collator)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- adapted linears, ranks and parameter budget ---------------------------------------------
def test_branchlora_adapts_every_llm_linear_at_moeloras_expert_rank_and_trains_fewer_parameters_than_moelora():
    """On the default suite's model (hidden 160, FFN 448, 4 layers, vision 96), counted by hand:
    MoELoRA 8 experts x rank 1 on the 7 linears: 4 x (8 x 3104 + router 8 x 1408) + projector 41,280 = 185,664;
    BranchLoRA trunk 1408 + 8 branches x 1696 + one router set 8 x 1408 per layer: 4 x 26,240 + 41,280 = 146,240
    (its keys are fitted in closed form, not trained); seqlora r 8: 4 x 8 x 3104 + 41,280 = 140,608."""
    suite = load_suite(DEFAULT_SUITE)
    model_dir, _ = prepare_base(suite)
    counts, adapted = {}, {}
    for name in ("branchlora", "moelora", "seqlora"):
        torch.manual_seed(0)
        model, _ = load_model(model_dir)
        method = build_method(name, {}, suite.method_defaults.get(name))
        model = method.wrap_model(model, suite.task_names)
        method.before_stage(1, (suite.task_names[0],), model)
        counts[name] = trainable(model)
        adapted[name] = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
                         if isinstance(m, MixtureLoraLinear) or n.endswith(".lora_A")}
    assert counts == {"branchlora": 146_240, "moelora": 185_664, "seqlora": 140_608}
    assert counts["branchlora"] < counts["moelora"]
    layers = set(load_model(model_dir)[0].state_dict())  # every LLM linear, attention and feed-forward
    assert adapted["branchlora"] == adapted["moelora"] and len(adapted["moelora"]) == 4 * 7
    assert {n.removesuffix(".lora_A") for n in adapted["seqlora"]} == {n.removeprefix("base_model.model.") for n in adapted["moelora"]}
    assert all(f"{n}.weight" in layers for n in adapted["moelora"])


def test_moelora_splits_seqloras_rank_budget_and_branchlora_takes_its_expert_rank():
    suite = load_suite(DEFAULT_SUITE)
    configs = {name: build_method(name, {}, suite.method_defaults.get(name)).config for name in ("seqlora", "moelora", "branchlora")}
    seq, moe, branch = configs["seqlora"], configs["moelora"], configs["branchlora"]
    assert moe.experts * moe.expert_rank == seq.r
    assert moe.alpha / (moe.experts * moe.expert_rank) == seq.alpha / seq.r == branch.alpha / branch.rank
    assert branch.rank == moe.expert_rank and branch.branches == moe.experts


# --- routers ------------------------------------------------------------------------------------
def test_each_stage_trains_only_its_own_router_and_earlier_routers_stay_bit_identical(smoke):
    model, method, collator = fresh(smoke)
    train(smoke, model, method, collator, "mcq", 1)
    first = {n: layer.router.weights[0].detach().clone() for n, layer in method.layers.items()}
    second = {n: layer.router.weights[1].detach().clone() for n, layer in method.layers.items()}
    method.before_stage(2, ("ocr",), model)
    assert all([w.requires_grad for w in layer.router.weights] == [False, True, False, False, False, False] for layer in method.layers.values())
    train(smoke, model, method, collator, "ocr", 2)
    for name, layer in method.layers.items():
        assert torch.equal(layer.router.weights[0], first[name]), name
    assert any(not torch.equal(layer.router.weights[1], second[n]) for n, layer in method.layers.items()), "the stage's router trains"


def test_token_routing_gives_each_token_its_own_gates_and_first_token_routing_one_per_sample(smoke):
    _, _, samples, _ = smoke
    gates = {}
    for route_on in ("first", "token"):
        model, method, collator = fresh(smoke, route_on=route_on)
        batch = collator.train_batch(samples["mcq"][:2])
        layer = next(iter(method.layers.values()))
        captured = []
        handle = layer.router.register_forward_hook(lambda module, inputs, output: captured.append(output))
        method.before_stage(1, ("mcq",), model)
        with torch.no_grad(), method.batch_context(samples["mcq"][:2], batch):
            model(**batch)
        handle.remove()
        gates[route_on] = captured[0]
    assert gates["first"].shape[1] == 1  # one decision per sample, broadcast over its tokens
    per_token = gates["token"]
    assert per_token.shape[1] == batch["input_ids"].shape[1]
    assert ((per_token > 0).sum(-1) == 2).all(), "top-2 per token"
    assert not torch.equal(per_token[0, 0], per_token[0, -1])


# --- the task selector --------------------------------------------------------------------------
def test_vision_features_stay_put_while_the_projector_trains_and_projected_ones_drift(smoke):
    """The default image feature is the projector's input (the frozen tower's patches): a key fitted on it after task 1
    still matches task 1 exactly after task 2 trains the projector; a key on the projector's output does not."""
    cosines = {}
    for feature in ("vision", "projected"):
        model, method, collator = fresh(smoke, image_feature=feature, lr=5e-2)
        facts = train(smoke, model, method, collator, "mcq", 1)
        assert facts["key_cosine"]["image"]["mcq"] == pytest.approx(1.0, abs=1e-6)  # fitted in closed form on these features
        facts = train(smoke, model, method, collator, "ocr", 2, steps=8)
        cosines[feature] = facts["key_cosine"]["image"]["mcq"]
        assert facts["key_cosine"]["text"]["mcq"] == pytest.approx(1.0, abs=1e-6)  # input embeddings are frozen
    assert cosines["vision"] == pytest.approx(1.0, abs=1e-6)
    assert cosines["projected"] < 1 - 1e-4


def test_a_closed_form_key_minimises_the_alignment_loss():
    torch.manual_seed(0)
    selector = TaskSelector(n_tasks=2, image_dim=8, text_dim=5)
    image, text = torch.randn(40, 8) + 2, torch.randn(40, 5) - 1
    selector.fit(1, image, text)
    best = selector.alignment_loss(1, image, text)
    for _ in range(20):  # every nearby key does worse
        for keys in (selector.image_keys, selector.text_keys):
            saved = keys[1].detach().clone()
            with torch.no_grad():
                keys[1].add_(0.05 * torch.randn_like(saved))
            assert selector.alignment_loss(1, image, text) > best
            with torch.no_grad():
                keys[1].copy_(saved)
    torch.testing.assert_close(selector.image_keys[1].detach(), nn.functional.normalize(image, dim=-1).mean(0))
    assert torch.equal(mean_direction(image), selector.image_keys[1].detach())


def test_keys_learn_by_loss_at_their_own_lr_when_asked(smoke):
    model, method, collator = fresh(smoke, key_fit="loss", key_lr=0.5)
    method.before_stage(1, ("mcq",), model)
    groups = method.parameter_groups(model, 1e-3)
    keys = [g for g in groups if g["lr"] == 0.5]
    assert len(keys) == 1 and {id(p) for p in keys[0]["params"]} == {id(method.selector.image_keys[0]), id(method.selector.text_keys[0])}
    before = method.selector.image_keys[0].detach().clone()
    train(smoke, model, method, collator, "mcq", 1)
    assert not torch.equal(method.selector.image_keys[0], before)
    model, method, collator = fresh(smoke)  # key_fit "mean": keys are no optimizer's business
    method.before_stage(1, ("mcq",), model)
    assert not any(p.requires_grad for p in method.selector.parameters())


def test_selector_accuracy_is_split_into_training_and_heldout_phrasings(smoke):
    model, method, collator = fresh(smoke)
    _, _, samples, heldout = smoke
    train(smoke, model, method, collator, "mcq", 1)
    train(smoke, model, method, collator, "caption", 2)
    mcq_phrasing, caption_phrasing = samples["mcq"][0].phrasing_id, samples["caption"][0].phrasing_id
    records = [("mcq", mcq_phrasing, 1), ("mcq", mcq_phrasing, 0), ("caption", caption_phrasing, 1), ("caption", caption_phrasing, 1),
               ("mcq", heldout["mcq"][0].phrasing_id, 1), ("caption", heldout["caption"][0].phrasing_id, 0)]
    facts = method.evaluation_facts(records)
    assert facts["selector_accuracy_train"] == 75.0 and facts["selector_accuracy_heldout"] == 50.0
    assert facts["selector_accuracy_train_per_task"] == {"mcq": 50.0, "caption": 100.0}
    assert facts["selector_samples"] == 6
    with torch.no_grad():  # evaluation records carry the phrasing
        probe = samples["mcq"][:2] + heldout["caption"][:2]
        batch = collator.train_batch(probe)
        with method.batch_context(probe, batch):
            model(**batch)
    observed = method.evaluation_records()
    assert [(task, phrasing) for task, phrasing, _ in observed] == [(s.task, s.phrasing_id) for s in probe]


def test_the_oracle_selector_routes_each_seen_task_by_its_identity(smoke):
    model, method, collator = fresh(smoke, selector="oracle")
    _, _, samples, _ = smoke
    for stage, task in enumerate(("mcq", "ocr", "caption"), start=1):
        train(smoke, model, method, collator, task, stage, steps=1)
    with torch.no_grad():  # random keys would pick badly; the oracle ignores them for seen tasks
        for key in method.selector.image_keys:
            key.normal_()
    probe = samples["mcq"][:3] + samples["ocr"][:3] + samples["caption"][:3]
    batch = collator.train_batch(probe)
    with torch.no_grad(), method.batch_context(probe, batch):
        model(**batch)
    assert all(hit == 1 for _, _, hit in method.evaluation_records())


def test_instruction_text_keys_read_the_phrasing_without_its_question_and_select_its_task(smoke):
    """Under text_feature=instruction two samples of one phrasing share a text feature whatever their questions, that
    feature is the mean embedding of the instruction's tokens, and keys fitted on it pick each training phrasing's task."""
    suite, model_dir, samples, _ = smoke
    model, method, collator = fresh(smoke, text_feature="instruction")
    method.bind_tokenizer(collator.tokenizer)
    for stage, task in enumerate(("mcq", "ocr", "caption"), start=1):
        train(smoke, model, method, collator, task, stage, steps=1)
    first = samples["mcq"][0]
    second = next(s for s in samples["mcq"] if s.phrasing_id == first.phrasing_id and s.turns[-1].prompt != first.turns[-1].prompt)
    features = method._text_features(collator.train_batch([first, second]), [first, second])
    assert torch.equal(features[0], features[1])
    ids = collator.tokenizer(question_removed(first.instruction), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert torch.allclose(features[0], model.get_input_embeddings()(ids).mean(0))
    probe = samples["mcq"][:4] + samples["ocr"][:4] + samples["caption"][:4]
    with torch.no_grad():  # the image keys carry no task information here, so the text key alone must decide
        for key in method.selector.image_keys:
            key.zero_()
        batch = collator.train_batch(probe)
        with method.batch_context(probe, batch):
            model(**batch)
    assert [hit for _, _, hit in method.evaluation_records()] == [1] * len(probe)


def test_without_an_image_key_the_text_key_alone_selects_and_no_image_feature_is_read(smoke):
    """image_feature=none: no image keys, no hook on the projector, keys fitted on text alone pick each training phrasing's task."""
    _, _, samples, _ = smoke
    model, method, collator = fresh(smoke, image_feature="none")
    for stage, task in enumerate(("mcq", "ocr", "caption"), start=1):
        facts = train(smoke, model, method, collator, task, stage, steps=1)
    assert len(method.selector.image_keys) == 0 and len(method.selector.text_keys) == len(smoke[0].task_names)
    assert set(facts["key_cosine"]) == {"text"} and method.image_features is None
    assert facts["deviations"] == ["image_feature=none: the paper's selector sums an image and a text key; this one matches the other key alone"]
    probe = samples["mcq"][:4] + samples["ocr"][:4] + samples["caption"][:4]
    with torch.no_grad():
        batch = collator.train_batch(probe)
        with method.batch_context(probe, batch):
            model(**batch)
    assert method.image_features is None
    assert [hit for _, _, hit in method.evaluation_records()] == [1] * len(probe)
    with pytest.raises(ConfigError, match="both 'none'"):
        build_method("branchlora", {"image_feature": "none", "text_feature": "none"})


# --- options ----------------------------------------------------------------------------------
def test_text_options_refuse_values_outside_their_choices_and_name_them():
    with pytest.raises(ConfigError, match=r"option route_on: expected one of first, token, mean, got 'last'"):
        build_method("branchlora", {"route_on": "last"})
    with pytest.raises(ConfigError, match=r"option image_feature: expected one of vision, projected, none"):
        build_method("branchlora", {"image_feature": "clip"})
    assert build_method("branchlora", {"selector": "oracle", "text_feature": "none"}).config.selector == "oracle"
    with pytest.raises(ConfigError, match=r"option text_feature: expected one of embedding, instruction, none"):
        build_method("branchlora", {"text_feature": "prompt"})


def test_state_round_trip_restores_keys_probes_and_phrasings(smoke):
    model, method, collator = fresh(smoke)
    train(smoke, model, method, collator, "mcq", 1)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    _, restored, _ = fresh(smoke)
    restored.load_state_dict(state)
    assert restored.trained == 1 and restored.phrasings == method.phrasings
    assert [s.id for s in restored.probes["mcq"]] == [s.id for s in method.probes["mcq"]]
    assert torch.equal(restored.selector.image_keys[0], method.selector.image_keys[0])
    assert torch.equal(restored.selector.text_keys[0], method.selector.text_keys[0])
