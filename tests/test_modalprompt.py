"""Mechanism tests of ModalPrompt (``modalprompt``): each fails if the method's defining mechanism is removed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cvit_bench.checkpoint import load_model_tensors, model_tensors
from cvit_bench.methods.modalprompt import (
    FEATURES_DEVIATION, alignment_loss, ascending_top, selection_scores, splice_after_bos, training_choice,
)
from cvit_bench.runner import trainable_names
from cvit_bench.training.loop import train_stage

from conftest import fresh_method


def fresh(smoke, **options):
    return fresh_method(smoke, "modalprompt", **options)


def train(smoke, model, method, collator, task: str, stage: int, steps: int = 2):
    suite, _, samples = smoke
    method.before_stage(stage, (task,), model)
    train_stage(model, method, samples[task], collator, dataclasses.replace(suite.training, warmup_steps=1), steps=steps, seed=f"t{stage}")
    return method.after_stage(stage, model, samples[task], collator)


def mixed(smoke, per_task: int = 2) -> list:
    """Samples of three tasks in one batch, so per-sample selection is exercised."""
    return [s for task in ("mcq", "ocr", "caption") for s in smoke[2][task][:per_task]]


# --- pure functions ------------------------------------------------------------------------
def test_splice_inserts_after_bos_with_attention_and_ignored_labels_keeping_padding_in_place():
    bos, pad = 1, 0
    batch = {"input_ids": torch.tensor([[bos, 7, 8, pad], [pad, bos, 9, 5], [6, 7, 8, 9]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, -100, 8, -100], [-100, -100, -100, 5], [-100, 7, 8, 9]])}
    spliced, inserted = splice_after_bos(batch, 2, bos, placeholder=3)
    # row 0: right padded, BOS first; row 1: left padded, BOS after the padding; row 2: no BOS, prompts go first
    assert spliced["input_ids"].tolist() == [[bos, 3, 3, 7, 8, pad], [pad, bos, 3, 3, 9, 5], [3, 3, 6, 7, 8, 9]]
    assert spliced["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert spliced["labels"].tolist() == [[-100, -100, -100, -100, 8, -100], [-100, -100, -100, -100, -100, 5],
                                          [-100, -100, -100, 7, 8, 9]]
    assert inserted.nonzero().tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 0], [2, 1]]
    assert "labels" not in splice_after_bos({k: v for k, v in batch.items() if k != "labels"}, 2, bos, 3)[0]


def test_selection_score_is_half_image_cosine_plus_half_text_cosine():
    torch.manual_seed(1)
    image, text, prototypes = torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 5)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    brute = [[0.5 * cos(image[i], prototypes[t]) + 0.5 * cos(text[i], prototypes[t]) for t in range(4)] for i in range(3)]
    assert torch.allclose(selection_scores(image, text, prototypes, 0.5), torch.tensor(brute), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_inference_takes_the_top_k_prompts_in_ascending_score_order(k):
    torch.manual_seed(2)
    scores = torch.randn(6, 5)
    brute = [sorted(sorted(range(5), key=lambda t: -row[t])[:k], key=lambda t: row[t]) for row in scores.tolist()]
    assert ascending_top(scores, k).tolist() == brute


def test_training_inserts_all_prompts_while_t_at_most_two_then_the_best_two_earlier_and_the_current():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 2.0], [0.8, 0.2, 0.7, 0.6, -1.0]])
    assert training_choice(scores, current=0).tolist() == [[0], [0]], "task 1: its own prompt"
    assert training_choice(scores, current=1).tolist() == [[0, 1], [0, 1]], "task 2: every prompt so far, in task order"
    assert training_choice(scores, current=2).tolist() == [[0, 1, 2], [1, 0, 2]], "task 3: the two earlier ones by ascending score"
    # task 5 (current=4): the two best of tasks 1-4 by score, lower first, then task 5; its own score plays no part
    assert training_choice(scores, current=4).tolist() == [[2, 1, 4], [2, 0, 4]]


def test_alignment_loss_is_one_minus_mean_image_cosine_plus_one_minus_mean_text_cosine():
    image, text, prototype = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [-3.0, 0.0]]), torch.tensor([1.0, 0.0])
    # image cosines 1 and 0; text cosines 1/sqrt(2) and -1
    golden = (1 - (1 + 0) / 2) + (1 - (2 ** -0.5 - 1) / 2)
    assert abs(alignment_loss(image, text, prototype).item() - golden) < 1e-6


# --- on the smoke model ----------------------------------------------------------------------
def test_model_sees_the_chosen_prompt_embeddings_first_with_labels_ignored(smoke):
    model, method, collator = fresh(smoke)
    chunk = smoke[2]["mcq"][:3]
    batch = collator.train_batch(chunk)
    method.before_stage(1, ("mcq",), model)
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with method.batch_context(chunk, batch):
        prompted = model(**batch)
    handle.remove()
    length = method.config.prompt_length
    embeds = seen["embeds"]
    assert embeds.shape[1] == batch["input_ids"].shape[1] + length
    # the tiny tokenizer adds no BOS, so the prompt comes first; the text follows unchanged
    assert torch.equal(embeds[:, :length], method.pool.prompts[0].detach().expand(3, -1, -1))
    text = (batch["input_ids"] != model.config.image_token_id) & batch["attention_mask"].bool()
    assert torch.equal(embeds[:, length:][text], model.get_input_embeddings()(batch["input_ids"])[text])
    # the loss is the cross-entropy of the original answer tokens, read after the prompt: prompt positions are ignored
    logits = prompted.logits[:, length:-1].flatten(0, 1)
    expected = nn.functional.cross_entropy(logits, batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(prompted.loss, expected, atol=1e-5)
    assert not torch.allclose(prompted.loss, model(**batch).loss), "the prompts change the forward"


def test_only_the_current_tasks_prompts_and_mlp_receive_gradients(smoke):
    model, method, collator = fresh(smoke)
    for stage, task in enumerate(("mcq", "ocr"), start=1):
        train(smoke, model, method, collator, task, stage)
    method.before_stage(3, ("caption",), model)
    assert trainable_names(model) == {"modal_prompt.prompts.2", *(f"modal_prompt.heads.2.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))}
    chunk = mixed(smoke)
    batch = collator.train_batch(chunk)
    with method.batch_context(chunk, batch):
        outputs = model(**batch)
        (outputs.loss + method.extra_loss(batch, outputs)).backward()
    pool = method.pool
    assert pool.prompts[2].grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in pool.heads[2].parameters())
    assert all(p.grad is None for t in (0, 1, 3) for p in (pool.prompts[t], *pool.heads[t].parameters()))
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("modal_prompt."))


@pytest.mark.parametrize("features", ["clip", "llava"])
def test_extra_loss_is_the_two_alignment_terms_of_the_current_prototype(smoke, features):
    model, method, collator = fresh(smoke, features=features)
    method.before_stage(1, ("mcq",), model)
    chunk = smoke[2]["mcq"][:4]
    batch = collator.train_batch(chunk)
    image, text = method.features(chunk, batch)
    prototype = method.pool.heads[0](method.pool.prompts[0]).mean(0)  # p_t = mean_i g_t(e_i), computed here directly
    with method.batch_context(chunk, batch):
        extra = method.extra_loss(batch, model(**batch))
    cos = nn.functional.cosine_similarity
    direct = (1 - cos(image, prototype[None]).mean()) + (1 - cos(text, prototype[None]).mean())
    assert torch.allclose(extra, direct, atol=1e-6)
    # CLIP's projected image embedding and unprojected text output share one width (the tiny CLIP's projection is as wide as its
    # text encoder, as ViT-L/14's 768); the LLaVA features are both d wide; the prototype ends in that width
    width = method.clip.image_width if features == "clip" else model.get_input_embeddings().embedding_dim
    assert image.shape == text.shape == (4, width) and prototype.shape == (width,)
    assert method.config.deviations() == ([] if features == "clip" else [FEATURES_DEVIATION])


def test_kv_cache_generation_matches_uncached_forwards_on_independently_built_inputs(smoke):
    model, method, collator = fresh(smoke)
    method.trained = 4  # four prototypes, untrained: selection still differs per sample
    chunk = mixed(smoke, per_task=1)
    batch = collator.generation_batch(chunk)
    image, text = method.features(chunk, batch)
    chosen = ascending_top(selection_scores(image, text, method.pool.prototypes(4), 0.5), 3)
    assert len({tuple(row) for row in chosen.tolist()}) > 1, "the batch's samples choose different prompts"
    steps = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: steps.append(output[:, -1].detach().clone()))
    with torch.no_grad(), method.batch_context(chunk, batch):
        output = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=True)
    handle.remove()
    assert torch.equal(output[:, : batch["input_ids"].shape[1]], batch["input_ids"]), "generate still returns the caller's input first"
    assert len(steps) == 3, "one prefill and two cached decoding steps"
    embed = model.get_input_embeddings()
    for row, sample in enumerate(chunk):
        single = collator.generation_batch([sample])
        prompts = torch.cat([method.pool.prompts[t].detach() for t in chosen[row].tolist()])
        embeds = torch.cat([prompts[None], embed(single["input_ids"]).detach()], dim=1)
        with torch.no_grad():
            for step, token in enumerate(output[row, batch["input_ids"].shape[1]:].tolist()):  # full forwards, no cache
                logits = model(inputs_embeds=embeds, pixel_values=single["pixel_values"], use_cache=False).logits[0, -1]
                assert torch.allclose(steps[step][row], logits, atol=1e-4), f"sample {row}, step {step}"
                embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            unprompted = model(input_ids=single["input_ids"], pixel_values=single["pixel_values"]).logits[0, -1]
        assert not torch.allclose(steps[0][row], unprompted, atol=1e-3), "the prompts change the prefill"


def test_state_round_trip_through_safetensors_restores_pool_and_selection(smoke, tmp_path):
    model, method, collator = fresh(smoke)
    trained = set()
    for stage, task in enumerate(("mcq", "ocr"), start=1):
        method.before_stage(stage, (task,), model)
        trained |= trainable_names(model)
        train(smoke, model, method, collator, task, stage)
    save_file(model_tensors(model, trained), tmp_path / "model.safetensors")
    save_file(method.state_dict(), tmp_path / "method.safetensors")

    restored_model, restored, _ = fresh(smoke)
    load_model_tensors(restored_model, load_file(tmp_path / "model.safetensors"), tmp_path)
    restored.load_state_dict(load_file(tmp_path / "method.safetensors"))
    assert restored.trained == 2
    for ours, theirs in zip(method.pool.parameters(), restored.pool.parameters()):
        assert torch.equal(ours, theirs)
    assert not torch.equal(method.pool.prompts[0], fresh(smoke)[1].pool.prompts[0]), "training moved the saved prompts"
    chunk = mixed(smoke)
    batch = collator.generation_batch(chunk)
    assert torch.equal(method.choose(*method.features(chunk, batch))[0], restored.choose(*restored.features(chunk, batch))[0])
