"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to a floor, constant, or
warmup-stable-decay (WSD: constant, then a short decay at the end; MiniCPM, Hägele et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from leanlm.engine.config import OptimConfig


def lr_factor(
    step: int,
    total: int,
    *,
    warmup: int,
    schedule: str,
    min_ratio: float,
    decay_fraction: float = 0.2,
    decay_shape: str = "1-sqrt",
    decay_to: float = 0.0,
    decay_steps: int = 0,
) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based).

    WSD: 1 until the last ``decay_fraction`` of the ``total`` steps, then down towards ``decay_to``
    with ``decay_shape``: ``linear`` (1 - p) or ``1-sqrt`` (1 - sqrt(p)), p the fraction of the
    decay done before this update (Hägele et al. 2024, eq. 1; ``1-sqrt`` is their best)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = decay_start(total, decay_fraction, decay_steps)
        return wsd_factor(step, total, start=start, decay_shape=decay_shape, decay_to=decay_to)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_start(total: int, decay_fraction: float, decay_steps: int = 0) -> int:
    """The first update of WSD's decay phase: ``decay_steps`` before the end, else the last
    ``decay_fraction`` of ``total``."""
    if decay_steps:
        return max(0, total - decay_steps)
    return total - max(1, round(decay_fraction * total)) if decay_fraction > 0 else total


def schedule_phase(step: int, total: int, cfg: OptimConfig) -> str:
    """Where a run that has made ``step`` updates stands: for WSD ``warmup``, ``stable`` (every
    update so far at the peak: a cooldown can start here), ``decay`` or ``cooled`` (its decay
    done: a point on a compute-optimal schedule); other schedules give their name."""
    if cfg.schedule != "wsd":
        return cfg.schedule
    if step <= cfg.warmup_steps and cfg.warmup_steps:
        return "warmup"
    if step <= decay_start(total, cfg.decay_fraction, cfg.decay_steps):
        return "stable"
    return "cooled" if step >= total else "decay"


def wsd_factor(step: int, total: int, *, start: int, decay_shape: str, decay_to: float) -> float:
    if step < start:
        return 1.0
    p = (step - start) / max(1, total - start)
    shape = 1.0 - (math.sqrt(p) if decay_shape == "1-sqrt" else p)
    return decay_to + (1.0 - decay_to) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, schedule, min_ratio = cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio
    fraction, shape, to, steps = cfg.decay_fraction, cfg.decay_shape, cfg.decay_to, cfg.decay_steps

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no object
        return lr_factor(
            step,
            total_steps,
            warmup=warmup,
            schedule=schedule,
            min_ratio=min_ratio,
            decay_fraction=fraction,
            decay_shape=shape,
            decay_to=to,
            decay_steps=steps,
        )

    fn: Callable[[int], float] = factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
