"""Stage checkpoints: everything a killed run needs to continue after its last finished stage.

Layout inside a run directory::

    checkpoint.json            pointer to the newest complete checkpoint (written last, atomically)
    checkpoint-stage3/
        state.json             progress (matrices, facts, timings), config, RNG states
        predictions.jsonl      per-sample predictions so far
        model.safetensors      every parameter that has been trainable, and every buffer
        method.safetensors     the method's own state (routers' bookkeeping, bases, embeddings)
        rng.safetensors        torch (and CUDA) generator states

A checkpoint folder is built under a temporary name and renamed; only then does the pointer
move to it, so a kill at any moment leaves either the previous checkpoint or the new one, never
half of one. Parameters that were never trainable are not stored: a resumed run rebuilds the
model from the same base checkpoint and seed, which reproduces them exactly.

The optimizer and LR schedule are rebuilt at the start of every stage (per-task fine-tuning, as
the papers do), so a stage boundary carries no optimizer state; a killed stage re-runs from its
first step.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cvit_bench.io import atomic_write_json, fsync_dir, publish_tree, read_json, to_jsonable
from cvit_bench.registry import ConfigError

POINTER = "checkpoint.json"
_PREFIX = "checkpoint-stage"
ADAPTERS_DIR = "adapters"  # --save-adapters: RUN_DIR/adapters/stage<K>/, kept after the run
OTHER_TENSORS = "trained.safetensors"  # trained tensors outside a peft adapter (projector, mixtures, routers) and buffers
METHOD_TENSORS = "method.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the JSON state and the three tensor files."""

    stage: int
    state: dict[str, Any]
    predictions: list[dict]
    model: dict[str, torch.Tensor]
    method: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def model_tensors(model: nn.Module, trained: set[str]) -> dict[str, torch.Tensor]:
    """Parameters in ``trained`` and all buffers (adapter gates, fixed routers), contiguous and unshared for safetensors."""
    tensors = {name: p for name, p in model.named_parameters() if name in trained}
    tensors.update(model.named_buffers())
    return {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}


@torch.no_grad()
def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy checkpoint tensors into a freshly wrapped model; a name or shape the model lacks is an error naming ``source``."""
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        target = targets.get(name)
        if target is None or target.shape != tensor.shape:
            found = "missing" if target is None else f"shape {tuple(target.shape)}"
            raise ConfigError(f"{source}: tensor {name!r} {tuple(tensor.shape)} does not fit the model ({found})")
        target.copy_(tensor)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and NumPy generator states (JSON) and torch's (tensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    return {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}, tensors


def restore_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: Path,
    stage: int,
    state: dict[str, Any],
    predictions: list[dict],
    model: dict[str, torch.Tensor],
    method: dict[str, torch.Tensor],
) -> None:
    """Write the checkpoint of ``stage`` and point ``checkpoint.json`` at it; older checkpoints are removed afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng_json, rng_tensors = rng_state()
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{_PREFIX}{stage}-"))
    try:
        (staging / "state.json").write_text(json.dumps(to_jsonable({**state, "stage": stage, "rng": rng_json}), allow_nan=False))
        (staging / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in to_jsonable(predictions)))
        save_file(model, staging / "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in method.items()}, staging / "method.safetensors")
        save_file(rng_tensors, staging / "rng.safetensors")
        for path in staging.iterdir():
            _fsync_file(path)
        final = run_dir / f"{_PREFIX}{stage}"
        if final.exists():  # left by a run killed after the rename but before the pointer moved: never pointed to
            shutil.rmtree(final)
        publish_tree(staging)
        staging.rename(final)
        fsync_dir(run_dir)  # the folder is on disk before the pointer names it
    except (OSError, SafetensorError) as error:  # disk full, permissions: say which checkpoint, keep the previous one
        shutil.rmtree(staging, ignore_errors=True)
        message = f"writing the stage {stage} checkpoint in {run_dir} failed ({error}); the previous checkpoint is kept and a re-run continues from it"
        raise OSError(message) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_json(run_dir / POINTER, {"stage": stage, "directory": final.name})
    _remove_stale(run_dir, keep=final.name)


def _remove_stale(run_dir: Path, keep: str | None) -> None:
    for path in run_dir.iterdir():
        if path.is_dir() and path.name != keep and path.name.lstrip(".").startswith(_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


def remove_unfinished(run_dir: Path) -> None:
    """Staging folders of checkpoint writes that a kill interrupted (never pointed to); run while holding the run's lock."""
    for path in run_dir.iterdir():
        if path.is_dir() and path.name.startswith(f".{_PREFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint ``checkpoint.json`` points to, or None when the run has none."""
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        entry = read_json(pointer)
        folder = run_dir / str(entry["directory"])
        if folder.parent != run_dir or not folder.name.startswith(_PREFIX):
            raise ValueError(f"directory {entry['directory']!r} is not a checkpoint of this run")
        state = read_json(folder / "state.json")
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        return Checkpoint(
            stage=int(entry["stage"]), state=state, predictions=predictions,
            model=load_file(folder / "model.safetensors"), method=load_file(folder / "method.safetensors"),
            rng=load_file(folder / "rng.safetensors"),
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ConfigError(f"{pointer}: unreadable checkpoint ({error}); pass --fresh to start the run over") from error


def remove_checkpoints(run_dir: Path) -> None:
    """Drop the pointer first, so a kill halfway never leaves a pointer to a deleted folder."""
    (run_dir / POINTER).unlink(missing_ok=True)
    if run_dir.is_dir():
        _remove_stale(run_dir, keep=None)


def _peft_adapter_names(model: nn.Module) -> set[str]:
    """Names of the parameters a peft ``save_pretrained`` writes (its LoRA factors); empty for a model peft did not wrap."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return set()
    return {name for name, _ in model.named_parameters() if ".lora_" in name}


def export_stage_weights(directory: Path, model: nn.Module, trained: set[str], method_state: dict[str, torch.Tensor]) -> None:
    """One stage's trained weights, to share or re-evaluate (``cvit-bench eval RUN_DIR --stage K``).

    A peft-wrapped model's adapter goes through peft's ``save_pretrained`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` on the base); every other
    trained tensor and every buffer into ``trained.safetensors``; the method's own state into
    ``method.safetensors``. Written under a temporary name and renamed, so a folder is whole or absent.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        adapter = _peft_adapter_names(model)
        if adapter:
            model.save_pretrained(staging)
        save_file({name: t for name, t in model_tensors(model, trained).items() if name not in adapter}, staging / OTHER_TENSORS)
        save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, staging / METHOD_TENSORS)
        if directory.exists():
            shutil.rmtree(directory)
        publish_tree(staging)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_stage_weights(directory: Path, model: nn.Module, method) -> None:
    """Restore what :func:`export_stage_weights` wrote into a freshly wrapped model and its method."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not (directory / OTHER_TENSORS).is_file():
        raise ConfigError(f"{directory}: no exported stage weights (was the run started with --save-adapters?)")
    try:
        if _peft_adapter_names(model):
            result = set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"))
            if result.unexpected_keys:
                raise ConfigError(f"{directory}: adapter tensors {result.unexpected_keys[:3]} do not fit the model")
        load_model_tensors(model, load_file(directory / OTHER_TENSORS), directory / OTHER_TENSORS)
        method.load_state_dict(load_file(directory / METHOD_TENSORS))
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"{directory}: unreadable stage weights ({error})") from error
