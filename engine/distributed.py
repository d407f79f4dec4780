"""Process group setup from torchrun's environment, and the few collectives the engine uses.

This is the only module that reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...);
everything else asks ``rank()``, ``world_size()``, ``is_main()``. Without torchrun every helper
degrades to the single-process answer, so the same code runs in a notebook.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from leanlm.engine.errors import ConfigError


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``none`` for one process, ``ddp`` otherwise."""
    if backend == "auto":
        return "ddp" if env_world_size() > 1 else "none"
    if backend == "none" and env_world_size() > 1:
        raise ConfigError(
            f"distributed.backend=none but torchrun started {env_world_size()} processes; use ddp or auto"
        )
    return backend


def init(device: torch.device, timeout_s: int = 600) -> None:
    """Create the default process group when launched by torchrun with more than one process."""
    if env_world_size() <= 1 or is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``t``."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return all_reduce_sum(t).item() / world_size()


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
    if not is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def wrap_model(model: nn.Module, backend: str, device: torch.device) -> nn.Module:
    """Wrap for data parallelism. ``none`` returns the model unchanged."""
    if backend == "none" or not is_initialized():
        return model
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise ConfigError(f"distributed.backend={backend!r} is not supported; use auto, none or ddp")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP (or compile) wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
