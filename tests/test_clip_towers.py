"""The CLIP that hide and modalprompt read: the tiny one shares the base's tower, is shipped and checked like the base; a
real suite names its checkpoint; only the methods that read it carry it in their setup."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel

from cvit_bench.models import clip_towers
from cvit_bench.models.base_checkpoint import prepare_base
from cvit_bench.models.clip_towers import ClipFeatures, alt_text, clip_source, compare_with_shipped_clip, prepare_clip, ship_clip
from cvit_bench.registry import ConfigError
from cvit_bench.runner import RunOptions, build_method, resolved_config
from cvit_bench.suites import synthetic
from cvit_bench.suites.materialize import SuiteData
from cvit_bench.suites.schema import SUITES_DIR, SuiteError, load_suite

from conftest import SMOKE


def test_alt_text_names_the_shapes_left_to_right_the_word_and_the_background():
    right = synthetic.Shape("ring", "blue", 50, 30, 12)
    left = synthetic.Shape("star", "red", 10, 30, 12)
    assert alt_text(synthetic.Scene("beach", shapes=(right, left))) == "a red star and a blue ring in a beach scene"
    assert alt_text(synthetic.Scene("white", word="owl")) == "the word owl on a white background"
    assert alt_text(synthetic.Scene("cream")) == "nothing on a cream background"


def test_the_tiny_clip_is_the_bases_tower_with_a_text_side_pooled_at_the_end_token(smoke_setup):
    suite, model_dir, data = smoke_setup
    source, digest = prepare_clip(suite, *prepare_base(suite))
    base = load_file(Path(model_dir) / "model.safetensors")
    clip = load_file(Path(source) / "model.safetensors")
    tower = {name.removeprefix("vision_tower."): tensor for name, tensor in base.items() if name.startswith("vision_tower.")}
    assert tower and all(torch.equal(clip[f"vision_model.{name}"], tensor) for name, tensor in tower.items() if "post_layernorm" not in name), \
        "every tower weight LLaVA reads is the base's, bit for bit"
    features = ClipFeatures(source)
    assert features.image_width == features.text_width == features.model.config.text_config.hidden_size

    texts = ["Read the text.", "What colour is the star in this picture?"]
    ids, mask = ClipFeatures.tokenize_with(features.tokenizer, texts, features.max_length)
    assert (ids[:, 0] == features.tokenizer.bos_token_id).all()
    ends = (ids == features.tokenizer.eos_token_id).int().argmax(-1)
    assert torch.equal(ends + 1, mask.sum(-1)), "each text ends with the end token, the pooled position"
    long_ids, long_mask = ClipFeatures.tokenize_with(features.tokenizer, [" ".join(["star"] * 200)], features.max_length)
    assert long_ids.shape[1] == features.max_length and long_ids[0, -1] == features.tokenizer.eos_token_id, "truncation keeps </s>"
    hidden = features.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(features.text(texts), hidden[torch.arange(2), ends], atol=1e-6)

    pixels = torch.randn(3, 3, suite.image_size, suite.image_size)
    single = features.image(pixels, [1, 1, 1])
    assert single.shape == (3, features.image_width)
    assert torch.allclose(features.image(pixels, [1, 2]), torch.stack([single[0], single[1:].mean(0)]), atol=1e-6), \
        "a few-shot sample's images are averaged"
    with pytest.raises(ConfigError, match="flattened patches"):  # what Qwen2-VL's processor gives
        features.image(torch.randn(64, 3 * 2 * 14 * 14), [1])


def _shipping_suite(tmp_path: Path, **clip) -> Path:
    raw = yaml.safe_load((SUITES_DIR / f"{SMOKE}.yaml").read_text())
    raw["name"] = "clip-smoke"
    raw["model"]["clip"] = {**raw["model"]["clip"], "shipped": "clip-test", **clip}
    path = tmp_path / "clip-smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_shipped_clip_is_checked_against_its_recipe_its_base_and_its_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_towers, "SHIPPED_DIR", tmp_path / "bases")
    suite = load_suite(str(_shipping_suite(tmp_path)))
    base_dir, base_hash = prepare_base(suite)
    with pytest.raises(SuiteError, match="clip.json is missing"):
        prepare_clip(suite, base_dir, base_hash)
    built, digest = prepare_clip(suite, base_dir, base_hash, rebuild=True)
    shipped = ship_clip(suite, built, digest, base_dir)
    assert prepare_clip(suite, base_dir, base_hash) == (str(shipped), digest)
    rebuilt, _ = prepare_clip(suite, base_dir, base_hash, rebuild=True)
    assert compare_with_shipped_clip(suite, rebuilt).startswith("bit-identical")

    (tmp_path / "other").mkdir()
    other = load_suite(str(_shipping_suite(tmp_path / "other", steps=7)))
    with pytest.raises(SuiteError, match="built from another recipe"):
        prepare_clip(other, base_dir, base_hash)
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    (other_base / "model.safetensors").write_bytes(b"not the base")
    with pytest.raises(SuiteError, match="base_weights_sha256"):
        prepare_clip(suite, other_base, base_hash)
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SuiteError, match="SHA-256 differs"):
        prepare_clip(suite, base_dir, base_hash)


def test_a_real_suite_names_its_clip_checkpoint_found_before_a_run_writes_anything(tmp_path, smoke_setup, monkeypatch):
    coin = load_suite("coin")
    assert clip_source(coin) == "openai/clip-vit-large-patch14-336"
    fetched = []
    monkeypatch.setattr(clip_towers, "AutoConfig", SimpleNamespace(from_pretrained=fetched.append))  # the hub, reachable
    assert prepare_clip(coin, tmp_path, "external:x") == ("openai/clip-vit-large-patch14-336", "external:openai/clip-vit-large-patch14-336")
    assert fetched == ["openai/clip-vit-large-patch14-336"]

    def unreachable(name):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(clip_towers, "AutoConfig", SimpleNamespace(from_pretrained=unreachable))
    with pytest.raises(SuiteError, match=r"coin.yaml: model.clip: 'openai/clip-vit-large-patch14-336' is neither a folder"):
        prepare_clip(coin, tmp_path, "external:x")

    raw = yaml.safe_load((SUITES_DIR / "coin.yaml").read_text())
    del raw["model"]
    path = tmp_path / "coin-no-clip.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SuiteError, match="model.clip: name the CLIP checkpoint"):
        prepare_clip(load_suite(str(path)), tmp_path, "external:x")
    raw["model"] = {"clip": {"steps": 3}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SuiteError, match="coin-no-clip.yaml: model.clip: expected the name or path"):
        load_suite(str(path))
    with pytest.raises(SuiteError, match=r"model.clip: unknown key\(s\) \['step'\]"):
        load_suite(str(_shipping_suite(tmp_path, step=3)))
    with pytest.raises(SuiteError, match=r"model.clip.steps: expected a positive value, got 0"):
        load_suite(str(_shipping_suite(tmp_path, steps=0)))

    suite, model_dir, _ = smoke_setup  # a checkpoint saved with save_pretrained, named by a path relative to the suite
    local, _ = prepare_clip(suite, *prepare_base(suite))
    (tmp_path / "my-clip").symlink_to(local)
    raw["model"] = {"clip": "my-clip"}
    path.write_text(yaml.safe_dump(raw))
    found, digest = prepare_clip(load_suite(str(path)), tmp_path, "external:x")
    assert (found, digest) == (str(tmp_path / "my-clip"), "external:my-clip")
    assert isinstance(ClipFeatures(found).model, CLIPModel)


def test_only_the_methods_that_read_clip_carry_it_in_their_setup():
    suite = load_suite("cvit-v2-check")
    data = SuiteData(Path("."), data_hash="d", recipe_hash="r")

    def config(method: str, clip=None) -> dict:
        options = RunOptions(suite, method, 0, Path("results"))
        return resolved_config(options, build_method(method, {}, suite.method_defaults.get(method)), data, "b", 15, clip)

    plain = config("seqlora")
    assert "clip" not in plain["suite"]["model"] and "clip_hash" not in plain
    hide = config("hide", ("somewhere", "c1"))
    assert hide["suite"]["model"]["clip"] == {"shipped": "cvit-v2-clip"} and hide["clip_hash"] == "c1"
    assert build_method("hide", {}).needs_clip() and build_method("modalprompt", {}).needs_clip()
    assert not build_method("hide", {"features": "llava"}).needs_clip() and not build_method("seqlora", {}).needs_clip()
