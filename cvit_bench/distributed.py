"""The processes of one run: one by default, several under ``accelerate launch`` (DDP, optionally FSDP).

    accelerate launch --num_processes 8 -m cvit_bench run --suite coin --method seqlora --model DIR --data-root DATA
    accelerate launch --use_fsdp --num_processes 8 -m cvit_bench run ...   # frozen weights sharded

Training: every process draws the same global batch from the same seeded stream and trains on
its contiguous share; the gradients are averaged across processes after backward (data
parallelism, as DDP does). Each share's loss is weighted by its fraction of
the batch's answer tokens, so the step is the single-process step (mean over all answer tokens)
up to floating-point summation order. Evaluation: each process generates for its contiguous
block of an evaluation set and the replies are gathered in sample order. Only the main process
scores, checkpoints and writes results.

FSDP (``--use_fsdp`` or an accelerate config with ``distributed_type: FSDP``) shards the weights that
no stage trains -- for the adapter methods, the whole base model -- with FSDP2's ``fully_shard``: one
unit per transformer block and per leaf module outside them, then the root over what remains. Trained
tensors stay whole on every process and are averaged as above, so every method's gradient hooks
(freezers, projections, LLaCA's β) keep reading whole tensors. Training gathers one unit at a time;
evaluation gathers every unit once (see :func:`gathered`), so generating needs no collective.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, str_to_bool
from torch import nn

from cvit_bench.registry import ConfigError


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    device: torch.device = torch.device("cpu")
    shard_frozen: bool = False  # FSDP: weights no stage trains are sharded across the processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def share(self, items: list) -> list:
        """This process's contiguous block of ``items`` (block sizes differ by at most one)."""
        size, extra = divmod(len(items), self.count)
        start = self.index * size + min(self.index, extra)
        return items[start : start + size + (self.index < extra)]

    def gather(self, items: list) -> list:
        """Every process's ``share`` concatenated in process order, on every process."""
        return gather_object(items) if self.distributed else items

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return value

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Data-parallel step: replace each gradient by its mean over processes (one flat all-reduce).

        Done explicitly rather than with the DistributedDataParallel wrapper, which requires every
        parameter to be used once inside ``forward``: regularisers (EWC's penalty, BranchLoRA's key
        alignment) use parameters outside it, and methods change what trains between stages. A
        gradient missing on every process stays missing (AdamW skips it, as in one process).
        """
        if not self.distributed:
            return
        present = self.sum(torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=self.device))
        with_grad = [p for p, flag in zip(parameters, present.tolist()) if flag > 0]
        for parameter in with_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in with_grad]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.count
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    def wait(self) -> None:
        if self.distributed:
            PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process builds shared caches (data, base checkpoint) before the others read them."""
        if self.distributed and not self.is_main:
            self.wait()
        yield
        if self.distributed and self.is_main:
            self.wait()


def current_processes() -> Processes:
    """This process's place in an ``accelerate launch`` / ``torchrun`` group, or the single default process."""
    if str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        raise ConfigError("DeepSpeed is not supported: its optimizer owns the gradients that methods' hooks edit; "
                          "launch with --use_fsdp (shards the frozen weights) or --multi_gpu instead")
    fsdp = bool(str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")))
    if fsdp and str_to_bool(os.environ.get("FSDP_OFFLOAD_PARAMS", "false")):
        raise ConfigError("FSDP parameter offloading is not supported; launch without --fsdp_offload_params")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    if fsdp and reshard.upper() not in ("TRUE", "FULL_SHARD", "1"):
        # Units reshard in backward otherwise; evaluation and the frozen tower never run one, so they would stay gathered.
        raise ConfigError(f"FSDP reshard_after_forward / sharding strategy {reshard!r} is not supported; use full sharding (the default)")
    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate never forms a CPU (gloo) group
    device = state.device if state.device.type == "cuda" else torch.device("cpu")
    return Processes(state.process_index, state.num_processes, device, fsdp and state.num_processes > 1)


def launch_mixed_precision() -> str:
    """The mixed precision ``accelerate launch --mixed_precision`` (or its config file) asked for: no, bf16 or fp16."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def end_process_group() -> None:
    """After a finished run: leave together and tear the group down before exit (a process that exits while
    its peers still hold the group's connections can abort in gloo's teardown). Not called after an error,
    where the peers may be inside another collective: the launcher stops them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def shard_frozen_weights(model: nn.Module, base: set[int], processes: Processes) -> int:
    """FSDP2 over the base weights that nothing trains; places the rest on the device; returns how many tensors were sharded.

    ``model`` must still be on the CPU: ``fully_shard`` moves each unit's tensors to the mesh's device and
    cuts them there, so on a GPU at most one unit is ever whole on the device, and the unsharded
    originals are freed once cut. For that, nothing here holds a base parameter (``base`` holds their
    ids): a reference kept until the end would keep every unit's whole tensor on the device.

    Units: each block of an ``nn.ModuleList`` that holds frozen weights (the transformer layers of the
    LLM and of the vision tower: one block is gathered at a time), each leaf module outside them that
    does (embeddings, patch convolution, norms, head), so a weight is gathered whenever its own module
    runs, also where ``generate`` or a method calls a part of the model directly (image features,
    input embeddings); then each module with children that owns frozen weights itself (CLIP's
    embeddings for its class embedding), over just those; last the root, over what remains (weights
    the model's top module owns). Kept whole (``ignored_params``) and moved to the device here: what the method added,
    every base weight it trains, and tied weights (shared by two modules, so no single unit owns them).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    owners: Counter[int] = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        owners.update(id(p) for p in module.parameters(recurse=False))
    kept = {p for p in model.parameters() if p.requires_grad or id(p) not in base or owners[id(p)] > 1}
    sharded = len(owners) - len(kept)
    units: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(unit + ".") for unit in units):
            continue
        block = bool(name) and isinstance(model.get_submodule(name.rpartition(".")[0]), nn.ModuleList)
        leaf = next(module.children(), None) is None
        if (block or leaf) and any(p not in kept for p in module.parameters(recurse=block)):
            units[name] = module
    in_units = {id(p) for unit in units.values() for p in unit.parameters()}
    # Modules with children that own frozen weights themselves (CLIP's class embedding): a unit each, over just those,
    # since transformers' generate runs the vision tower outside the model's forward. Children first (nested units).
    owners_of_rest = [module for module in model.modules() if module is not model and all(module is not u for u in units.values())
                      and any(id(p) not in in_units and p not in kept for p in module.parameters(recurse=False))]
    mesh = init_device_mesh(processes.device.type, (processes.count,))
    # Full sharding everywhere, the root included (FSDP leaves the root gathered after forward by default).
    for module in [*reversed(units.values()), *reversed(owners_of_rest), model]:
        fully_shard(module, mesh=mesh, ignored_params=kept, reshard_after_forward=True)
    # The root is the first unit to run a forward unless fixed now, and a method that calls a part of the model
    # first (BranchLoRA embeds the prompt before generating) would make that part the root; torch offers no
    # public call for this.
    model._get_fsdp_state()._lazy_init()
    for parameter in kept:
        parameter.data = parameter.data.to(processes.device)
    return sharded


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``model`` gathered once for the block, then sharded again; nothing without FSDP.

    Generating a reply of T tokens runs T forwards; with units that reshard after each forward (as
    training needs, to hold one block at a time) that is T all-gathers of the whole model. Here each
    process gathers each unit once, in the same order, and keeps it, so the forwards inside
    communicate nothing and processes need not step together. The cost: for the block, every process
    holds the whole frozen model besides its shards (14.1 GB for LLaVA-1.5-7B in bfloat16).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
