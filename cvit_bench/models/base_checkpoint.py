"""Build the deterministic base checkpoint of the embedded default (``cvit-bench prepare``).

Like LLaVA-1.5 before CVIT, the tiny model first gets a generic image-text stage
(naming shapes, colours, counts, positions, places, reading glyphs) in plain
phrasing, so every continual task starts from a model that can see, but none of
the tasks' answer formats is taught. The result is cached by a hash of everything
that determines it; the hash is recorded in every result.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.methods.base import Method
from cvit_bench.models.vision_pretrain import pretrain_vision
from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer
from cvit_bench.paths import cache_dir, config_hash, tree_hash
from cvit_bench.suites import synthetic
from cvit_bench.suites.materialize import PRETRAIN_TASK, SuiteData, materialize_pretrain_corpus
from cvit_bench.suites.schema import TEMPLATES_DIR, Phrasing, Suite, SuiteError, TrainingConfig
from cvit_bench.training.loop import train_stage

PLAIN = Phrasing("pretrain/plain", "{question}", "sentence")
# CPU sums are split across threads, so the trained weights depend on the thread count, which the
# hash cannot see: the build always uses this many, whoever builds first (a sweep child at 1
# thread, a plain run, a test), so every run of a suite starts from the same weights. 2 is what
# the committed leaderboards' base was built with (and twice as fast as 1 on the tiny model).
BUILD_THREADS = 2


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 5e-4
    size: int = 4000
    vision_steps: int = 1500  # supervised tower stage first (CLIP's part); 0 skips it
    vision_batch_size: int = 64
    vision_lr: float = 4e-3
    vision_size: int = 20000  # scenes drawn for the tower stage, apart from the language corpus


class _TrainEverything(Method):
    """The base stage trains the whole model, vision tower included (it starts from random weights)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model


def _section(suite: Suite, key: str, cls):
    raw = suite.model.get(key) or {}
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SuiteError([f"{suite.path}: model.{key}: unknown key(s) {unknown} (allowed: {sorted(allowed)})"])
    return cls(**raw)


def tiny_configs(suite: Suite) -> tuple[TinyLlavaConfig, PretrainConfig]:
    tiny = _section(suite, "tiny", TinyLlavaConfig)
    if tiny.image_size != suite.image_size:
        raise SuiteError([f"{suite.path}: model.tiny.image_size ({tiny.image_size}) must equal data.image_size ({suite.image_size})"])
    return tiny, _section(suite, "pretrain", PretrainConfig)


def _tokenizer_texts(data: SuiteData) -> list[str]:
    """Pretraining corpus, every instruction phrasing, and every vocabulary item in each target form."""
    texts = [f"{r.question}\n{r.answer}" for r in data.records(PRETRAIN_TASK, "train")]
    texts += [path.read_text(encoding="utf-8") for path in sorted(TEMPLATES_DIR.glob("*.yaml"))]
    vocabulary = [*synthetic.words(), *synthetic.shape_names(), *synthetic.colour_names(), *synthetic.place_names()]
    for item in vocabulary + ["yes", "no", "unanswerable", *"ABCD", *map(str, range(10))]:
        texts += [item, item.upper(), json.dumps({"answer": item})]
    return texts


def base_checkpoint_hash(suite: Suite, data: SuiteData) -> str:
    """Hash of everything that determines the base checkpoint: architecture, stage config, corpus, phrasings."""
    tiny, pretrain = tiny_configs(suite)
    return config_hash(
        {
            "tiny": tiny.to_dict(),
            "pretrain": pretrain.__dict__,
            "corpus": tree_hash(data.root / PRETRAIN_TASK),
            "templates": tree_hash(TEMPLATES_DIR, recursive=False),  # the embedded suites' templates; real suites' live in subfolders
        }
    )


def _pretrain(suite: Suite, tiny: TinyLlavaConfig, pretrain: PretrainConfig, data: SuiteData, digest: str,
              report: Callable[[int, float, float], None] | None):
    tokenizer = train_tokenizer(_tokenizer_texts(data), tiny.vocab_size)
    processor = build_processor(tokenizer, tiny)
    model = build_model(tokenizer, tiny)
    samples = phrase_all(data.records(PRETRAIN_TASK, "train"), PRETRAIN_TASK, (PLAIN,))
    torch.manual_seed(tiny.init_seed)
    if pretrain.vision_steps:
        scenes = synthetic.vision_scenes(pretrain.vision_size, suite.seed)
        pretrain_vision(model.model.vision_tower, processor.image_processor, scenes, steps=pretrain.vision_steps,
                        batch_size=pretrain.vision_batch_size, lr=pretrain.vision_lr, seed=tiny.init_seed,
                        feature_layer=model.config.vision_feature_layer, report=report)
    config = TrainingConfig(steps_per_task=pretrain.steps, batch_size=pretrain.batch_size, lr=pretrain.lr, warmup_steps=50)
    train_stage(model, _TrainEverything(), samples, Collator(processor), config, steps=pretrain.steps, seed=f"pretrain-{digest}", report=report)
    return model, processor


def prepare_base(suite: Suite, report: Callable[[int, float, float], None] | None = None) -> tuple[Path, str]:
    """Directory of the base checkpoint for ``suite`` (built if absent) and its hash."""
    tiny, pretrain = tiny_configs(suite)
    data = materialize_pretrain_corpus(suite, pretrain.size)
    digest = base_checkpoint_hash(suite, data)
    target = cache_dir() / "models" / f"tiny-llava-{digest}"
    if (target / "config.json").is_file():
        return target, digest
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        model, processor = _pretrain(suite, tiny, pretrain, data, digest, report)
    finally:
        torch.set_num_threads(caller_threads)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save_tiny(model, processor, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same checkpoint first; it is identical and may be in use
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, digest
