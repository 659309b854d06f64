"""CLIP image and text features for the methods that read them (HiDe-LLaVA's anchors, ModalPrompt's selection).

The authors take both features from the CLIP checkpoint of the vision tower: CLIP's projected
image embedding and its text encoder's pooled, unprojected output. A real suite names that
checkpoint (``model.clip``: a hub name or a local path). The tiny base has no CLIP text side,
so one is built for it as the base is (and shipped beside it for cvit-v2): its vision tower
*is* the base's tower, frozen and bit-identical, as LLaVA's tower is CLIP's; a text encoder,
the two projections and the vision post-LayerNorm are trained with CLIP's contrastive loss on
drawn scenes and their alt texts (a locked image tower with a tuned text side, as in LiT).
Width: the projection is as wide as the text encoder, so the projected image embedding and the
unprojected text output share one width, as CLIP ViT-L/14's do (768), which ModalPrompt's
prototypes rely on.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, LlavaForConditionalGeneration
from tokenizers.processors import TemplateProcessing

from cvit_bench.models.base_checkpoint import (
    BUILD_THREADS, SHIPPED_DIR, at_build_threads, compare_weights, publish_build, publish_shipped, verify_shipped, weights_sha256,
)
from cvit_bench.paths import cache_dir, config_hash
from cvit_bench.registry import ConfigError
from cvit_bench.suites import synthetic
from cvit_bench.suites.schema import ClipRecipe, Suite, SuiteError, clip_setting

MANIFEST = "clip.json"
REPORT_EVERY = 50
HELD_OUT = 512  # scenes kept out of training to measure retrieval


def alt_text(scene: synthetic.Scene) -> str:
    """What a web image's alt text would say of a scene (the kind of pair CLIP learns from): its shapes from left to right,
    its text and its background, e.g. ``a red star and the word owl in a beach scene``. (Written here, not in the
    generator, whose source is part of every data recipe hash.)"""
    def a(phrase: str) -> str:
        return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"

    things = [a(f"{shape.colour} {shape.name}") for shape in sorted(scene.shapes, key=lambda s: (s.cx, s.cy))]
    if scene.word:
        things.append(f"the word {scene.word}")
    where = f"in {a(scene.background)} scene" if scene.background in synthetic.PLACES else f"on a {scene.background} background"
    return f"{' and '.join(things) or 'nothing'} {where}"


def clip_source(suite: Suite) -> str | ClipRecipe:
    """What ``model.clip`` names: a checkpoint (a hub name or a path; a real suite must name one) or the recipe of the tiny
    CLIP built on the run's own model (embedded suites; the default recipe when absent)."""
    source = clip_setting(str(suite.path), suite.model.get("clip"), real=suite.data_source == "llava")
    if source is None and suite.data_source == "llava":
        raise SuiteError([f"{suite.path}: model.clip: name the CLIP checkpoint of the model's vision tower (a hub name or a "
                          f"path, e.g. openai/clip-vit-large-patch14-336); this method reads CLIP features"])
    return source or ClipRecipe()


def tiny_clip_hash(recipe: ClipRecipe, base_hash: str) -> str:
    return config_hash({"base": base_hash, "clip": recipe.hashed()})


def prepare_clip(suite: Suite, base_dir: Path, base_hash: str, *,
                 report: Callable[[int, float, float], None] | None = None, rebuild: bool = False) -> tuple[str, str]:
    """Where the CLIP a method reads is (a folder, or a hub name) and its hash: the checkpoint ``model.clip`` names; else the
    tiny CLIP of the model in ``base_dir``: the shipped one (unless ``rebuild``; refused unless built on these very weights),
    or the cached build, built if absent."""
    source = clip_source(suite)
    if isinstance(source, str):
        return _resolve_checkpoint(suite, source), f"external:{source}"
    digest = tiny_clip_hash(source, base_hash)
    if source.shipped is not None and not rebuild:
        shipped = SHIPPED_DIR / source.shipped
        manifest = verify_shipped(shipped, MANIFEST, digest, f"cvit-bench prepare --suite {suite.name} --rebuild --ship",
                                  f"{suite.path}: model.clip.shipped")
        if manifest.get("base_weights_sha256") != weights_sha256(base_dir):
            raise SuiteError([f"{shipped / MANIFEST}: base_weights_sha256: the shipped CLIP was built on other base weights "
                              f"than {base_dir}'s"])
        return str(shipped), digest
    target = cache_dir() / "models" / f"tiny-clip-{digest}"
    if rebuild and target.exists():
        shutil.rmtree(target)
    if not (target / "config.json").is_file():
        _build(source, base_dir, target, report)
    return str(target), digest


def _resolve_checkpoint(suite: Suite, source: str) -> str:
    """A CLIP checkpoint named by the suite, found (a relative path from the suite's folder, else a hub name whose
    config is fetched now) before a run writes anything."""
    local = suite.path.parent / source
    if local.is_dir():
        return str(local)
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise SuiteError([f"{suite.path}: model.clip: {source!r} is neither a folder next to the suite nor a reachable "
                          f"checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})"]) from None
    return source


def _build(recipe: ClipRecipe, base_dir: Path, target: Path, report: Callable[[int, float, float], None] | None) -> None:
    model, tokenizer, retrieval = at_build_threads(lambda: build_tiny_clip(recipe, base_dir, report))

    def save(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "retrieval.txt").write_text(f"{retrieval:.4f}\n")

    publish_build(target, save)


def build_tiny_clip(recipe: ClipRecipe, base_dir: Path,
                    report: Callable[[int, float, float], None] | None = None) -> tuple[CLIPModel, object, float]:
    """The tiny CLIP of the base in ``base_dir`` and its held-out image→text retrieval accuracy (top-1 among 512)."""
    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    tower = base.model.vision_tower
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(  # CLIP's text input: <s> text </s>, pooled at </s>
        single=f"{tokenizer.bos_token} $A {tokenizer.eos_token}",
        special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id), (tokenizer.eos_token, tokenizer.eos_token_id)])
    width = tower.config.hidden_size
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=recipe.text_layers,
                          num_attention_heads=recipe.text_heads, max_position_embeddings=recipe.max_positions,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          projection_dim=width)
    torch.manual_seed(recipe.seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=tower.config.to_dict(), projection_dim=width))
    model.vision_model.load_state_dict(tower.state_dict())
    model.requires_grad_(False)
    trained = [model.text_model, model.text_projection, model.visual_projection, model.vision_model.post_layernorm]
    for module in trained:
        module.requires_grad_(True)
    model.logit_scale.requires_grad_(True)

    scenes = synthetic.vision_scenes(recipe.scenes + HELD_OUT, recipe.seed + 1)
    processor = AutoProcessor.from_pretrained(base_dir).image_processor
    with torch.no_grad():  # the tower is locked: its class token's last hidden state is computed once
        cls = torch.cat([_class_token(model, processor(images=[synthetic.render(s, tower.config.image_size) for s in scenes[i:i + 256]],
                                                                return_tensors="pt")["pixel_values"])
                         for i in range(0, len(scenes), 256)])
    captions = [alt_text(s) for s in scenes]
    ids, mask = ClipFeatures.tokenize_with(tokenizer, captions, recipe.max_positions)
    train, held = slice(0, recipe.scenes), slice(recipe.scenes, None)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    order = random.Random(recipe.seed)
    window = time.perf_counter()
    model.train()
    for step in range(1, recipe.steps + 1):
        index = torch.tensor(order.sample(range(recipe.scenes), recipe.batch_size))
        image = F.normalize(_project_class_token(model, cls[train][index]), dim=-1)
        text = F.normalize(model.text_projection(_pooled_text(model, ids[train][index], mask[train][index], tokenizer.eos_token_id)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(index))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's clamp at a temperature of 1/100
        if report is not None and step % REPORT_EVERY == 0:
            now = time.perf_counter()
            report(step, loss.item(), REPORT_EVERY * recipe.batch_size / (now - window))
            window = now
    model.eval()
    model.requires_grad_(False)
    with torch.no_grad():
        image = F.normalize(_project_class_token(model, cls[held]), dim=-1)
        text = F.normalize(model.text_projection(_pooled_text(model, ids[held], mask[held], tokenizer.eos_token_id)), dim=-1)
        held_captions = captions[held]
        hits = [held_captions[j] == held_captions[i] for i, j in enumerate((image @ text.T).argmax(-1).tolist())]
    return model, tokenizer, sum(hits) / len(hits)


def _class_token(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.vision_model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _project_class_token(model: CLIPModel, cls: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model.post_layernorm(cls))


def _pooled_text(model: CLIPModel, ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The text encoder's output at the first real end-of-text token (CLIP's pooled output; padding, which may be the
    end token itself, is skipped), computed here because transformers reads the legacy argmax-of-ids position when the
    end token's id is 2, as the tiny tokenizer's is."""
    hidden = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(ids)), ((ids == eos_token_id) & mask.bool()).int().argmax(-1)]


class ClipFeatures:
    """A frozen CLIP on the run's device: the projected image embedding and the pooled text output, fp32, per sample."""

    def __init__(self, source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.source = source
        self.model = CLIPModel.from_pretrained(source, dtype=dtype).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @property
    def image_width(self) -> int:
        return self.model.config.projection_dim

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @staticmethod
    def tokenize_with(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids = encoded["input_ids"]
        if not bool((ids == tokenizer.eos_token_id).any(-1).all()):
            raise ConfigError(f"{tokenizer.name_or_path}: the CLIP tokenizer must end every text with its end token "
                              f"({tokenizer.eos_token!r}, the pooled position)")
        return ids, encoded["attention_mask"]

    @torch.no_grad()
    def image(self, pixel_values: torch.Tensor, per_sample: list[int]) -> torch.Tensor:
        """(samples, projection width): each sample's images embedded, averaged over a sample's few-shot images."""
        side = self.model.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (side, side):
            raise ConfigError(f"{self.source}: CLIP features need the images as (n, channels, {side}, {side}) pixels, as a LLaVA processor for this CLIP "
                              f"gives them; this model's processor gives shape {tuple(pixel_values.shape)} (Qwen2-VL's flattened patches "
                              f"cannot be read by a CLIP tower)")
        parameter = next(self.model.parameters())
        pooled = self.model.vision_model(pixel_values=pixel_values.to(parameter.device, parameter.dtype)).pooler_output
        embedded = self.model.visual_projection(pooled).float().cpu()
        if len(embedded) == len(per_sample):
            return embedded
        return torch.stack([chunk.mean(0) for chunk in embedded.split(per_sample)])

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        """(samples, text width): the text encoder's pooled output, unprojected, as both authors' codes read it."""
        ids, mask = self.tokenize_with(self.tokenizer, texts, self.max_length)
        device = next(self.model.parameters()).device
        return _pooled_text(self.model, ids.to(device), mask.to(device), self.tokenizer.eos_token_id).float().cpu()


def compare_with_shipped_clip(suite: Suite, built: str) -> str:
    source = clip_source(suite)
    return compare_weights(Path(built), SHIPPED_DIR / source.shipped if source.shipped else None, "CLIP")


def ship_clip(suite: Suite, built: str, digest: str, base_dir: Path) -> Path:
    """Copy a built tiny CLIP into the suite's shipped folder with its manifest (maintainers; commit the folder)."""
    source = clip_source(suite)
    if not isinstance(source, ClipRecipe) or source.shipped is None:
        raise SuiteError([f"{suite.path}: model.clip.shipped: the suite names no shipped CLIP"])
    retrieval = float((Path(built) / "retrieval.txt").read_text())
    return publish_shipped(Path(built), SHIPPED_DIR / source.shipped, MANIFEST, {
        "hash": digest, "suite": suite.name, "recipe": source.hashed(), "build_threads": BUILD_THREADS,
        "base_weights_sha256": weights_sha256(base_dir), "heldout_retrieval_top1_of_512": retrieval,
    })
