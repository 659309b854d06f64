"""Build, ship and load the deterministic base checkpoint of the embedded suites (``cvit-bench prepare``).

Like LLaVA-1.5 before CVIT, the tiny model first gets a generic image-text stage, so every
continual task starts from a model that can see. cvit-v1's stage answers in plain sentences
(``pretrain`` corpus); cvit-v2's answers every skill in every answer form the tasks use
(``pretrain-forms``, see ``suites/base_corpus.py``). A built base is cached by a hash of
everything that determines it; the hash is recorded in every result.

CPU kernels differ between machines, so a base rebuilt elsewhere is not the same weights, and
near-tied greedy replies of a small model amplify the difference. A suite may therefore name a
*shipped* base (``model.shipped``: a folder under ``cvit_bench/bases/``) that every user loads:
its manifest holds the recipe hash (checked against the suite, without generating anything)
and the SHA-256 of its weights. ``prepare --rebuild`` builds it from scratch and says whether
the rebuild is bit-identical.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from cvit_bench.data.collate import Collator
from cvit_bench.data.samples import phrase_all
from cvit_bench.methods.base import Method
from cvit_bench.models.vision_pretrain import pretrain_vision
from cvit_bench.models.tiny import TinyLlavaConfig, build_model, build_processor, save_tiny, train_tokenizer
from cvit_bench.io import atomic_write_json, publish_tree, read_json
from cvit_bench.paths import cache_dir, config_hash, tree_hash
from cvit_bench.resources import BASES, shipped
from cvit_bench.suites import synthetic
from cvit_bench.suites.materialize import PRETRAIN_TASK, SuiteData, materialize_pretrain_corpus, pretrain_corpus_recipe
from cvit_bench.suites.schema import TEMPLATES_DIR, Phrasing, Suite, SuiteError, TrainingConfig
from cvit_bench.training.loop import train_stage

PLAIN = Phrasing("pretrain/plain", "{question}", "sentence")
# CPU sums are split across threads, so the trained weights depend on the thread count, which the
# hash cannot see: the build always uses this many, whoever builds first (a sweep child at 1
# thread, a plain run, a test), so every run of a suite starts from the same weights. 2 is what
# the committed leaderboards' base was built with (and twice as fast as 1 on the tiny model).
BUILD_THREADS = 2
SHIPPED_DIR = shipped(BASES)
MANIFEST = "base.json"
WEIGHTS = "model.safetensors"
T = TypeVar("T")


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
    corpus: str = PRETRAIN_TASK  # generator kind of the language corpus: cvit-v1's plain sentences or cvit-v2's "pretrain-forms"
    warmup_steps: int = 50
    train_vision: bool = True  # whether the language stage also trains the tower (cvit-v1) or keeps it frozen (cvit-v2)

    def hashed(self) -> dict:
        """The fields that determine the base; fields added after cvit-v1 count only when changed, so its hash stays."""
        later = {"corpus": PRETRAIN_TASK, "warmup_steps": 50, "train_vision": True}
        return {key: value for key, value in self.__dict__.items() if key not in later or value != later[key]}


class _BaseStage(Method):
    """The language stage trains the whole model, or everything but the tower its own stage already trained.

    cvit-v1 trains the tower here too; cvit-v2 freezes it, as LLaVA freezes CLIP, so the features
    the tower stage taught are not washed out while the projector is still random.
    """

    def __init__(self, train_vision: bool) -> None:
        super().__init__()
        self.train_vision = train_vision

    def wrap_model(self, model: nn.Module, tasks: list[str]) -> nn.Module:
        return model if self.train_vision else super().wrap_model(model, tasks)


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


def _templates_dir(suite: Suite) -> Path:
    """The folder of the suite's instruction templates (cvit-v1's are the top level, cvit-v2's a subfolder)."""
    return suite.tasks[0].template.path.parent if suite.tasks else TEMPLATES_DIR


def _tokenizer_texts(suite: Suite, data: SuiteData) -> list[str]:
    """Pretraining corpus, every instruction phrasing, and every vocabulary item in each target form."""
    texts = [f"{r.question}\n{r.answer}" for r in data.records(PRETRAIN_TASK, "train")]
    texts += [path.read_text(encoding="utf-8") for path in sorted(_templates_dir(suite).glob("*.yaml"))]
    vocabulary = [*synthetic.words(), *synthetic.shape_names(), *synthetic.colour_names(), *synthetic.place_names()]
    for item in vocabulary + ["yes", "no", "unanswerable", *"ABCD", *map(str, range(10))]:
        texts += [item, item.upper(), json.dumps({"answer": item})]
    return texts


def base_checkpoint_hash(suite: Suite, data: SuiteData | None = None) -> str:
    """Hash of everything that determines the base checkpoint: architecture, stage config, corpus, phrasings.

    cvit-v1's corpus enters by the hash of its files (as recorded in its results); a shipped
    base's by its recipe, so the hash can be checked without generating the corpus.
    """
    tiny, pretrain = tiny_configs(suite)
    if pretrain.corpus == PRETRAIN_TASK:
        corpus = tree_hash((data or materialize_pretrain_corpus(suite, pretrain.size)).root / PRETRAIN_TASK)
    else:
        corpus = pretrain_corpus_recipe(suite, pretrain.size, pretrain.corpus)
    return config_hash(
        {
            "tiny": tiny.to_dict(),
            "pretrain": pretrain.hashed(),
            "corpus": corpus,
            "templates": tree_hash(_templates_dir(suite), recursive=False),
        }
    )


def _pretrain(suite: Suite, tiny: TinyLlavaConfig, pretrain: PretrainConfig, data: SuiteData, digest: str,
              report: Callable[[int, float, float], None] | None):
    tokenizer = train_tokenizer(_tokenizer_texts(suite, data), tiny.vocab_size)
    processor = build_processor(tokenizer, tiny)
    model = build_model(tokenizer, tiny)
    samples = phrase_all(data.records(PRETRAIN_TASK, "train"), PRETRAIN_TASK, (PLAIN,))
    torch.manual_seed(tiny.init_seed)
    if pretrain.vision_steps:
        scenes = synthetic.vision_scenes(pretrain.vision_size, suite.seed)
        pretrain_vision(model.model.vision_tower, processor.image_processor, scenes, steps=pretrain.vision_steps,
                        batch_size=pretrain.vision_batch_size, lr=pretrain.vision_lr, seed=tiny.init_seed,
                        feature_layer=model.config.vision_feature_layer, report=report)
    config = TrainingConfig(steps_per_task=pretrain.steps, batch_size=pretrain.batch_size, lr=pretrain.lr,
                            warmup_steps=pretrain.warmup_steps)
    stage = _BaseStage(pretrain.train_vision)
    train_stage(stage.wrap_model(model, []), stage, samples, Collator(processor), config, steps=pretrain.steps, seed=f"pretrain-{digest}", report=report)
    return model, processor


def shipped_base(suite: Suite) -> Path | None:
    """The folder of the base the suite ships (``model.shipped``), or None when it builds its own."""
    name = suite.model.get("shipped")
    if name is None:
        return None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise SuiteError([f"{suite.path}: model.shipped: expected the name of a folder under {SHIPPED_DIR}, got {name!r}"])
    return SHIPPED_DIR / name


def weights_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()


def _load_shipped(suite: Suite, directory: Path) -> tuple[Path, str]:
    """The shipped base, refused when its manifest is missing, its recipe is not this suite's, or its weights changed."""
    digest = base_checkpoint_hash(suite)
    verify_shipped(directory, MANIFEST, digest, f"cvit-bench prepare --suite {suite.name} --rebuild --ship", f"{suite.path}: model.shipped")
    return directory, digest


def verify_shipped(directory: Path, manifest_name: str, digest: str, rebuild_command: str, field: str) -> dict:
    """The manifest of a shipped artifact (the base, its CLIP), refused when missing, of another recipe than ``digest``,
    or when the weights' SHA-256 is not the one it records; ``field`` is the suite file and field that named it."""
    manifest_path = directory / manifest_name
    if not manifest_path.is_file():
        raise SuiteError([f"{field}: {manifest_path} is missing; build it with `{rebuild_command}`"])
    manifest = read_json(manifest_path)
    if manifest.get("hash") != digest:
        raise SuiteError([f"{manifest_path}: hash: the shipped files were built from another recipe ({manifest.get('hash')}; "
                          f"this tree's is {digest}); rebuild them with `{rebuild_command}`"])
    if weights_sha256(directory) != manifest.get("weights_sha256"):
        raise SuiteError([f"{directory / WEIGHTS}: its SHA-256 differs from {manifest_path}'s weights_sha256 (the file was changed)"])
    return manifest


def _build(suite: Suite, target: Path, digest: str, report: Callable[[int, float, float], None] | None) -> None:
    """Build the base whose hash is ``digest`` into ``target`` (written under a temporary name, then renamed)."""
    tiny, pretrain = tiny_configs(suite)
    data = materialize_pretrain_corpus(suite, pretrain.size, pretrain.corpus)
    model, processor = at_build_threads(lambda: _pretrain(suite, tiny, pretrain, data, digest, report))
    publish_build(target, lambda staging: save_tiny(model, processor, staging))


def at_build_threads(build: Callable[[], T]) -> T:
    """``build()`` at :data:`BUILD_THREADS` torch threads (the trained weights depend on the count), the caller's restored after."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return build()
    finally:
        torch.set_num_threads(caller_threads)


def publish_build(target: Path, save: Callable[[Path], None]) -> None:
    """A build saved by ``save`` into a temporary folder beside ``target``, given plain permissions, then renamed to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save(staging)
        publish_tree(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first; it is identical and may be in use
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_base(suite: Suite, report: Callable[[int, float, float], None] | None = None,
                 rebuild: bool = False) -> tuple[Path, str]:
    """Directory of the base checkpoint for ``suite`` and its hash: the shipped one when the suite names one
    (unless ``rebuild``), else the cached build, built if absent."""
    shipped = shipped_base(suite)
    if shipped is not None and not rebuild:
        return _load_shipped(suite, shipped)
    digest = base_checkpoint_hash(suite)
    target = cache_dir() / "models" / f"tiny-llava-{digest}"
    if rebuild and target.exists():
        shutil.rmtree(target)
    if not (target / "config.json").is_file():
        _build(suite, target, digest, report)
    return target, digest


def compare_with_shipped(suite: Suite, built: Path) -> str:
    """Whether a rebuilt base is bit-identical to the shipped one, tensor by tensor, in words."""
    return compare_weights(built, shipped_base(suite), "base")


def compare_weights(built: Path, shipped: Path | None, what: str) -> str:
    """Whether the weights in ``built`` are bit-identical to those in ``shipped``, tensor by tensor, in words."""
    from safetensors.torch import load_file

    if shipped is None or not (shipped / WEIGHTS).is_file():
        return f"the suite ships no {what} to compare with"
    ours, theirs = load_file(built / WEIGHTS), load_file(shipped / WEIGHTS)
    if ours.keys() != theirs.keys():
        return f"{what}: NOT identical: the tensor names differ ({sorted(ours.keys() ^ theirs.keys())[:3]} ...)"
    differing = {name: (ours[name].float() - theirs[name].float()).abs().max().item()
                 for name in ours if not torch.equal(ours[name], theirs[name])}
    if not differing:
        return f"bit-identical to the shipped {what}: all {len(ours)} tensors equal"
    worst = max(differing, key=differing.get)
    return (f"{what}: NOT bit-identical: {len(differing)} of {len(ours)} tensors differ (largest |difference| "
            f"{differing[worst]:.3g} in {worst}); CPU kernels and thread scheduling differ between machines")


def ship(suite: Suite, built: Path, digest: str) -> Path:
    """Copy a built base into the suite's shipped folder with its manifest (for maintainers; commit the folder)."""
    shipped = shipped_base(suite)
    if shipped is None:
        raise SuiteError([f"{suite.path}: model.shipped: the suite names no shipped base"])
    tiny, pretrain = tiny_configs(suite)
    return publish_shipped(built, shipped, MANIFEST, {
        "hash": digest, "suite": suite.name, "tiny": tiny.to_dict(), "pretrain": pretrain.__dict__, "build_threads": BUILD_THREADS,
    })


def publish_shipped(built: Path, shipped: Path, manifest_name: str, manifest: dict) -> Path:
    """Replace ``shipped`` by a copy of ``built`` with its manifest (``manifest`` plus the weights' SHA-256 and parameter count)."""
    shipped.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=shipped.parent, prefix=f".{shipped.name}-"))
    try:
        shutil.copytree(built, staging, dirs_exist_ok=True)
        atomic_write_json(staging / manifest_name, {**manifest, "weights_sha256": weights_sha256(staging),
                                                    "parameters": _parameter_count(staging)})
        shutil.rmtree(shipped, ignore_errors=True)
        staging.rename(shipped)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return shipped


def _parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    with safe_open(directory / WEIGHTS, "pt") as weights:
        return sum(torch.Size(weights.get_slice(name).get_shape()).numel() for name in weights.keys())
