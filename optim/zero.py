"""FRUGAL under DeepSpeed ZeRO-1/2: give it the map from flat partitions back to matrices.

ZeRO-1/2 flattens each parameter group into one padded 1-D buffer, splits it evenly across ranks
and replaces the client optimizer's ``group["params"]`` with this rank's fp32 partition. A
matrix-aware optimizer then sees no matrices. ``attach_deepspeed`` reads the ZeRO optimizer's
layout (which parameters, at which offsets, fall in this rank's partition) and hands it to
``FRUGAL.attach_flat_layout``, after which ``columns`` and ``randk`` act on the partition exactly as
they would on the whole matrices (same subspaces, moments only for the state-full elements)::

    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=FRUGAL(...), config=cfg)
    attach_deepspeed(opt)   # before the first step

ZeRO-3 partitions each parameter separately and is not mapped: ``attach_deepspeed`` rejects it.
"""

from __future__ import annotations

from typing import Any

import torch

from leanlm.optim.sharding import FlatSegment


def zero_segments(
    params: list[torch.Tensor], offsets: list[int], part_start: int, part_size: int, index: Any
) -> list[FlatSegment]:
    """Segments of the partition [part_start, part_start + part_size) of a flat group holding
    ``params`` at ``offsets``; ``index(p)`` is the parameter's index in the client optimizer."""
    out = []
    part_end = part_start + part_size
    for p, off in zip(params, offsets, strict=True):
        lo, hi = max(off, part_start), min(off + p.numel(), part_end)
        if lo < hi:
            out.append(FlatSegment(index(p), tuple(p.shape), lo - off, hi - lo, lo - part_start))
    return out


def attach_deepspeed(zero_optimizer: Any) -> None:
    """Attach this rank's ZeRO-1/2 partition layout to the FRUGAL client optimizer inside
    ``zero_optimizer`` (the optimizer ``deepspeed.initialize`` returns). No-op at ZeRO-0."""
    from leanlm.optim.frugal import FRUGAL

    inner = getattr(zero_optimizer, "optimizer", None)
    if isinstance(zero_optimizer, FRUGAL) or not isinstance(inner, FRUGAL):
        return  # stage 0 (the client optimizer itself sees the matrices) or not FRUGAL
    if not hasattr(zero_optimizer, "round_robin_bit16_groups"):
        raise ValueError(
            f"FRUGAL cannot map {type(zero_optimizer).__name__} partitions (ZeRO-3 partitions each "
            "parameter separately); use ZeRO stage 0, 1 or 2, or FSDP2"
        )
    if getattr(zero_optimizer, "round_robin_gradients", False):
        raise ValueError("FRUGAL needs round_robin_gradients=false in the ZeRO config")
    import torch.distributed as tdist

    for i, group in enumerate(inner.param_groups):
        params = zero_optimizer.round_robin_bit16_groups[i]
        offsets = getattr(zero_optimizer, "round_robin_bit16_offsets", None)
        if offsets is not None:
            offsets = offsets[i]
        else:  # older DeepSpeed: no per-parameter padding inside a group
            offsets, acc = [], 0
            for p in params:
                offsets.append(acc)
                acc += p.numel()
        pg = zero_optimizer.real_dp_process_group[i]
        size = int(zero_optimizer.partition_size[i])
        flat = group["params"][0]
        segments = zero_segments(
            params, offsets, tdist.get_rank(group=pg) * size, size, inner.param_index
        )
        inner.attach_flat_layout(flat, segments)
