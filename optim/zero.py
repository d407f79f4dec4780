"""FRUGAL under DeepSpeed ZeRO-1/2/3: give it the map from flat partitions back to matrices.

ZeRO-1/2 flattens each parameter group into one padded 1-D buffer, splits it evenly across ranks
and replaces the client optimizer's ``group["params"]`` with this rank's fp32 partition. A
matrix-aware optimizer then sees no matrices. ``attach_deepspeed`` reads the ZeRO optimizer's
layout (which parameters, at which offsets, fall in this rank's partition) and hands it to
``FRUGAL.attach_flat_layout``, after which ``columns`` and ``randk`` act on the partition exactly as
they would on the whole matrices (same subspaces, moments only for the state-full elements)::

    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=FRUGAL(...), config=cfg)
    attach_deepspeed(opt)   # before the first step

ZeRO-3 partitions each parameter separately (rank r holds elements [r·P, (r+1)·P) of every
flattened parameter, P = its partition size) and steps one sub-group's flat fp32 buffer at a time;
the same segments describe that layout, so FRUGAL maps it too (``stage3_segments``).
"""

from __future__ import annotations

from typing import Any

import torch

from leanlm.optim.flat import FlatSegment
from leanlm.optim.frugal import FRUGAL


def zero_segments(
    params: list[torch.Tensor], offsets: list[int], *, part_start: int, part_size: int, index: Any
) -> list[FlatSegment]:
    """Segments of the partition [part_start, part_start + part_size) of a flat group holding
    ``params`` at ``offsets``; ``index(p)`` is the parameter's index in the client optimizer."""
    out = []
    part_end = part_start + part_size
    for p, off in zip(params, offsets, strict=True):
        lo, hi = max(off, part_start), min(off + p.numel(), part_end)
        if lo < hi:
            out.append(
                FlatSegment(
                    index=index(p), shape=tuple(p.shape), start=lo - off, length=hi - lo, offset=lo - part_start
                )
            )
    return out


def attach_deepspeed(zero_optimizer: Any) -> None:
    """Attach this rank's ZeRO-1/2/3 partition layout to the FRUGAL client optimizer inside
    ``zero_optimizer`` (the optimizer ``deepspeed.initialize`` returns). No-op at ZeRO-0."""
    inner = getattr(zero_optimizer, "optimizer", None)
    if isinstance(zero_optimizer, FRUGAL) or not isinstance(inner, FRUGAL):
        return  # stage 0 (the client optimizer itself sees the matrices) or not FRUGAL
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        if getattr(zero_optimizer, "offload_optimizer", False):
            raise ValueError("FRUGAL under ZeRO-3 does not support optimizer offload")
        for _, flat, group_index, segments in stage3_segments(zero_optimizer, inner.param_index):
            inner.attach_flat_layout(flat, segments, group=inner.param_groups[group_index])
        return
    if not hasattr(zero_optimizer, "round_robin_bit16_groups"):
        raise ValueError(f"FRUGAL cannot map {type(zero_optimizer).__name__} partitions; use ZeRO stage 0-3 or FSDP2")
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
        start = tdist.get_rank(group=pg) * size
        segments = zero_segments(params, offsets, part_start=start, part_size=size, index=inner.param_index)
        inner.attach_flat_layout(flat, segments)


def stage3_segments(zero_optimizer: Any, index: Any) -> list[tuple[int, torch.Tensor, int, list]]:
    """(sub-group, its flat fp32 buffer, client param-group index, segments) for ZeRO-3.

    A sub-group's buffer is the concatenation of this rank's partition of each of its parameters
    (``partition_numel()`` elements each, the last rank's padded past the parameter's end)."""
    import torch.distributed as tdist

    out = []
    for sub, params in enumerate(zero_optimizer.fp16_groups):
        segments, offset = [], 0
        for p in params:
            part = p.partition_numel()
            pg = getattr(p, "ds_process_group", None) or zero_optimizer.dp_process_group
            start = tdist.get_rank(group=pg) * part
            length = max(0, min(p.ds_numel - start, part))
            if length:
                segments.append(
                    FlatSegment(index=index(p), shape=tuple(p.ds_shape), start=start, length=length, offset=offset)
                )
            offset += part
        flat = zero_optimizer.fp32_partitioned_groups_flat[sub]
        out.append((sub, flat, zero_optimizer.sub_group_to_group_id[sub], segments))
    return out
