"""Optimizer-state accounting: bytes actually held, and the analytic count for FRUGAL."""

from __future__ import annotations

import torch

from leanlm.optim.sharding import local


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (moments, steps, indices, bases). Meta tensors count
    by shape, so a model on the meta device can be measured without allocating. Sharded state
    (DTensors) counts this rank's shard: the figure is per rank."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values() if isinstance(st, dict) else ():
            if torch.is_tensor(v):
                v = local(v)
                total += v.numel() * v.element_size()
    return total
