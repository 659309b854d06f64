"""Load any image-text-to-text checkpoint and say where its adaptable modules are.

Methods never hard-code module names: they ask the :class:`ModuleMap` of the model's
family for the LLM linears, the feed-forward linears and the projector.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor


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
FAMILIES: dict[str, ModuleMap] = {
    "llava": ModuleMap(
        llm_linears=_LLM + r"\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)",
        llm_ffn=_LLM + r"\.mlp\.(?:gate|up|down)_proj",
        projector=r"(?:.*\.)?multi_modal_projector\.linear_[12]",
        vision=r"(?:.*\.)?vision_tower(?:\..*)?",
    ),
    "qwen2_vl": ModuleMap(
        llm_linears=_LLM + r"\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)",
        llm_ffn=_LLM + r"\.mlp\.(?:gate|up|down)_proj",
        projector=r"(?:.*\.)?visual\.merger\.mlp\.[02]",
        vision=r"(?:.*\.)?visual\.(?!merger)(?:.*)",
    ),
}


def module_map_for(model: nn.Module) -> ModuleMap:
    model_type = getattr(model.config, "model_type", "")
    family = "qwen2_vl" if model_type.startswith("qwen2") else "llava"
    return FAMILIES[family]


def load_model(reference: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Model and processor from a local directory (or a hub id where the network allows it)."""
    model = AutoModelForImageTextToText.from_pretrained(str(reference), dtype=dtype)
    processor = AutoProcessor.from_pretrained(str(reference))
    return model, processor


def vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the vision tower (frozen during continual tuning, as in LLaVA-style CVIT)."""
    pattern = re.compile(module_map_for(model).vision)
    return [p for name, p in model.named_parameters() if pattern.fullmatch(name.rsplit(".", 1)[0])]


def projector_parameters(model: nn.Module) -> list[nn.Parameter]:
    pattern = re.compile(module_map_for(model).projector)
    return [p for name, p in model.named_parameters() if pattern.fullmatch(name.rsplit(".", 1)[0])]
