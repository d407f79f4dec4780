"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to a floor, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from leanlm.engine.config import OptimConfig


def lr_factor(step: int, total: int, *, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, schedule, min_ratio = cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no object
        return lr_factor(step, total_steps, warmup=warmup, schedule=schedule, min_ratio=min_ratio)

    fn: Callable[[int], float] = factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
