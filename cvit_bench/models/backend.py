"""Load any image-text-to-text checkpoint and say where its adaptable modules are.

Methods never hard-code module names: they ask the :class:`ModuleMap` of the model's
family for the LLM linears, the feed-forward linears, the projector and the vision
tower. Each pattern can be overridden per run (``--module-pattern llm_ffn=REGEX``) for
architectures or forks whose names differ.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from cvit_bench.registry import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PATTERNS_ATTRIBUTE = "cvit_module_patterns"  # set on a loaded model by `load_model`, read by `module_map_for`


@dataclass(frozen=True)
class ModuleMap:
    """Regular expressions (matched against full module names) per architecture family."""

    llm_linears: str
    llm_ffn: str
    projector: str
    vision: str

    def matching(self, model: nn.Module, pattern: str) -> list[str]:
        compiled = re.compile(pattern)
        return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and compiled.fullmatch(name)]


_LLM = r"(?:.*\.)?language_model\.(?:model\.)?layers\.\d+"
_LLM_LINEARS = _LLM + r"\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
_LLM_FFN = _LLM + r"\.mlp\.(?:gate|up|down)_proj"
FAMILIES: dict[str, ModuleMap] = {
    # LLaVA-1.5 / LLaVA-NeXT / OneVision: CLIP or SigLIP tower, 2-layer MLP projector, Llama/Vicuna/Mistral/Qwen2 LLM.
    "llava": ModuleMap(
        llm_linears=_LLM_LINEARS,
        llm_ffn=_LLM_FFN,
        projector=r"(?:.*\.)?multi_modal_projector\.linear_[12]",
        vision=r"(?:.*\.)?vision_tower(?:\..*)?",
    ),
    # Qwen2-VL / Qwen2.5-VL: the patch merger's MLP plays the projector's role.
    "qwen2_vl": ModuleMap(
        llm_linears=_LLM_LINEARS,
        llm_ffn=_LLM_FFN,
        projector=r"(?:.*\.)?visual\.merger\.mlp\.[02]",
        vision=r"(?:.*\.)?visual\.(?!merger)(?:.*)",
    ),
}
MODEL_TYPES = {"llava": "llava", "llava_next": "llava", "llava_onevision": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}
PATTERN_KEYS = tuple(f.name for f in dataclasses.fields(ModuleMap))


def parse_module_patterns(entries: list[str]) -> dict[str, str]:
    """``KEY=REGEX`` strings (from the command line) as a dict; keys are ModuleMap fields, regexes must compile."""
    patterns = {}
    for entry in entries:
        key, sep, pattern = entry.partition("=")
        if not sep or key not in PATTERN_KEYS:
            raise ConfigError(f"--module-pattern {entry!r}: expected KEY=REGEX with KEY one of {', '.join(PATTERN_KEYS)}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"--module-pattern {key}: invalid regular expression {pattern!r}: {error}") from None
        patterns[key] = pattern
    return patterns


def module_map_for(model: nn.Module) -> ModuleMap:
    """The family's patterns for this model, with the run's ``--module-pattern`` overrides applied."""
    overrides: dict[str, str] = getattr(model, _PATTERNS_ATTRIBUTE, None) or {}
    model_type = getattr(model.config, "model_type", "")
    family = MODEL_TYPES.get(model_type)
    if family is None:
        if set(overrides) == set(PATTERN_KEYS):
            return ModuleMap(**overrides)
        raise ConfigError(
            f"model type {model_type!r} has no built-in module map (known: {', '.join(sorted(MODEL_TYPES))}); "
            f"pass --module-pattern for each of {', '.join(PATTERN_KEYS)}"
        )
    return dataclasses.replace(FAMILIES[family], **overrides)


def packed_image_rows(config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Rows per image of a packed projector input (Qwen2-VL's merger sees every image's tokens in one matrix); None for LLaVA."""
    grid = batch.get("image_grid_thw")
    if grid is None:
        return None
    return grid.prod(-1) // config.vision_config.spatial_merge_size**2


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(reference: str | Path, dtype: torch.dtype = torch.float32, module_patterns: dict[str, str] | None = None,
               gradient_checkpointing: bool = False) -> tuple[nn.Module, Any]:
    """Model and processor from a local directory (or a hub id where the network allows it).

    The processor brings the checkpoint's own chat template; ``module_patterns`` override the
    family's adapted-module names for this model.
    """
    model = AutoModelForImageTextToText.from_pretrained(str(reference), dtype=dtype)
    setattr(model, _PATTERNS_ATTRIBUTE, dict(module_patterns or {}))
    module_map_for(model)  # an unknown architecture without patterns fails here, before any work
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings + adapters work.
        # transformers 5.23 renamed gradient_checkpointing_enable (a deprecated alias until v6); the floor is 5.13.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, load_processor(reference, model.config.model_type)


def load_processor(reference: str | Path, model_type: str) -> Any:
    """``AutoProcessor``, except that Qwen2-VL's video half (which needs torchvision) is left out when torchvision is absent."""
    try:
        return AutoProcessor.from_pretrained(str(reference))
    except ImportError as error:
        if MODEL_TYPES.get(model_type) != "qwen2_vl" or "torchvision" not in str(error).lower():
            raise
    from cvit_bench.models.qwen2_vl import ImageOnlyQwen2VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(reference))  # not AutoImageProcessor: in 5.5 it needs torchvision itself
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template or _chat_template(reference))


def _chat_template(reference: str | Path) -> str | None:
    path = Path(reference) / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the vision tower (frozen during continual tuning, as in LLaVA-style CVIT)."""
    pattern = re.compile(module_map_for(model).vision)
    return [p for name, p in model.named_parameters() if pattern.fullmatch(name.rsplit(".", 1)[0])]


def projector_parameters(model: nn.Module) -> list[nn.Parameter]:
    pattern = re.compile(module_map_for(model).projector)
    return [p for name, p in model.named_parameters() if pattern.fullmatch(name.rsplit(".", 1)[0])]
