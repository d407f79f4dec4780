"""Optimizer factory: a registered name and keyword arguments -> a ``torch.optim.Optimizer``.

Kept free of engine types so another codebase can call it with ``model.named_parameters()``.
Which names exist, and which settings each takes, is ``leanlm.optim.registry``'s table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from leanlm.optim.frugal import FRUGAL
from leanlm.optim.registry import entry

NamedParams = Iterable[tuple[str, nn.Parameter]]


def param_groups_by_decay(named_params: NamedParams, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices (ndim >= 2), none on norms, biases and other 1-D tensors."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(
    named_params: NamedParams,
    *,
    lr: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    **unused: Any,
) -> torch.optim.Optimizer:
    """torch's AdamW, weight decay on matrices only (``param_groups_by_decay``)."""
    if unused:
        raise TypeError(f"adamw got unexpected options: {', '.join(sorted(unused))}")
    groups = param_groups_by_decay(named_params, weight_decay)
    # foreach is the fastest portable path; fused exists only for CUDA tensors.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


def frugal(named_params: NamedParams, **kwargs: Any) -> FRUGAL:
    """FRUGAL over named parameters (names keep the embedding, head and norms state-full)."""
    return FRUGAL(list(named_params), **kwargs)


def optimizer_kwargs(name: str, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The keyword arguments ``build_optimizer(name, ...)`` takes, picked from a flat mapping of
    settings (e.g. ``dataclasses.asdict(cfg.optim)``); ``seed`` seeds the subspace choices."""
    return entry(name).kwargs(settings, seed)


def build_optimizer(name: str, named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    """``build_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.1)``; any name
    of ``leanlm.optim.registry.REGISTRY``."""
    return entry(name).builder()(list(named_params), **kwargs)
