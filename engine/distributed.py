"""Process group setup from torchrun's environment, and the few collectives the engine uses.

This is the only module that reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...);
everything else asks ``rank()``, ``world_size()``, ``is_main()``. Without torchrun every helper
degrades to the single-process answer, so the same code runs in a notebook.
"""

from __future__ import annotations

import contextlib
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


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``none`` for one process, ``ddp`` otherwise. fsdp2 and deepspeed need torchrun
    (one process is fine: ``torchrun --nproc-per-node=1``)."""
    if backend == "auto":
        return "ddp" if env_world_size() > 1 else "none"
    if backend == "none" and env_world_size() > 1:
        raise ConfigError(
            f"distributed.backend=none but torchrun started {env_world_size()} processes; use ddp or auto"
        )
    if backend in ("fsdp2", "deepspeed") and not launched_by_torchrun():
        raise ConfigError(
            f"distributed.backend={backend} needs a process group: launch with torchrun "
            "(e.g. torchrun --nproc-per-node=2 -m leanlm.engine.cli train ...)"
        )
    return backend


def init(device: torch.device, timeout_s: int = 600, backend: str = "auto") -> None:
    """Create the default process group when launched by torchrun with more than one process
    (or with one, for the backends that need a group: fsdp2, deepspeed)."""
    needs_group = env_world_size() > 1 or (backend in ("fsdp2", "deepspeed") and launched_by_torchrun())
    if not needs_group or is_initialized():
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


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a stop signal seen by one rank stops all, in the
    same step, so that the collective checkpoint save that follows has every rank in it)."""
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    return bool(all_reduce_sum(t).item())


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
    if not is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP; unchanged without a process group (one process)."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _fsdp2_api():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def shard_fsdp2(model: nn.Module, blocks: list[nn.Module], bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each transformer block, then the root (embedding, final
    norm, head). Parameters become ``DTensor``s sharded on dim 0. ``bf16``: compute in bf16 with
    fp32 gradient reduction and fp32 sharded master weights (use on GPU instead of autocast)."""
    fully_shard, MixedPrecisionPolicy = _fsdp2_api()
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def deepspeed_config(
    micro_batch: int, grad_accum: int, grad_clip: float, zero_stage: int, bf16: bool
) -> dict[str, Any]:
    """The ``ds_config`` our settings imply. DeepSpeed clips at 1.0 unless told otherwise, so
    ``grad_clip=0`` (off) becomes an infinite threshold: the norm is still measured and logged."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 1e30,
        "zero_optimization": {"stage": zero_stage, "round_robin_gradients": False},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def wrap_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> nn.Module:
    """``deepspeed.initialize`` with our model and client optimizer; a FRUGAL client optimizer
    under ZeRO-1/2/3 gets its flat-partition layout attached. Returns the DeepSpeed engine (whose
    ``.optimizer`` wraps ours; the client optimizer keeps the param groups the scheduler drives)."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "distributed.backend=deepspeed needs DeepSpeed: pip install --no-build-isolation deepspeed"
        ) from None
    from leanlm.optim.zero import attach_deepspeed

    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    try:
        attach_deepspeed(ds_opt)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return engine


def is_deepspeed(model: nn.Module) -> bool:
    """A DeepSpeed engine (it owns backward, step and gradient accumulation)."""
    return hasattr(model, "is_gradient_accumulation_boundary") and hasattr(model, "backward")


def gradient_sync(model: Any, last: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients only on a step's last micro-batch: FSDP2's ``set_requires_gradient_sync``,
    or the context of DDP's ``no_sync`` before it; nothing to do for other models."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()  # DDP


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / DeepSpeed (or compile) wrapper. FSDP2 wraps nothing."""
    inner: Any = model
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or inner._orig_mod
    return inner


def fault_injection_due(step: int) -> bool:
    """Testing aid for elastic restarts: ``LEANLM_FAULT_AT=step:rank`` makes that rank die (as if
    killed) after that step, on the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT=0)."""
    spec = os.environ.get("LEANLM_FAULT_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    at, who = parse_fault_spec(spec)
    return step == at and rank() == who


def parse_fault_spec(spec: str) -> tuple[int, int]:
    """``LEANLM_FAULT_AT=step[:rank]`` -> (step, rank); a ``ConfigError`` when malformed."""
    at, _, who = spec.partition(":")
    try:
        return int(at), int(who or 0)
    except ValueError:
        raise ConfigError(f"LEANLM_FAULT_AT={spec!r}: expected STEP or STEP:RANK (a testing aid; unset it)") from None
