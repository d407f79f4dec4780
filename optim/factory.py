"""Optimizer factory: a name and keyword arguments -> a ``torch.optim.Optimizer``.

Kept free of engine types so another codebase can call it with ``model.named_parameters()``.
Later optimizers (FRUGAL and its GaLore/BAdam presets) register here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

NamedParams = Iterable[tuple[str, nn.Parameter]]


def param_groups_by_decay(named_params: NamedParams, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices (ndim >= 2), none on norms, biases and other 1-D tensors."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _adamw(
    named_params: NamedParams,
    *,
    lr: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    **unused: Any,
) -> torch.optim.Optimizer:
    if unused:
        raise TypeError(f"adamw got unexpected options: {', '.join(sorted(unused))}")
    groups = param_groups_by_decay(named_params, weight_decay)
    # foreach is the fastest portable path; fused exists only for CUDA tensors.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


def _frugal(named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    from leanlm.optim.frugal import FRUGAL

    return FRUGAL(list(named_params), **kwargs)


def _galore(named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    from leanlm.optim.presets import galore

    return galore(list(named_params), **kwargs)


def _badam(named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    from leanlm.optim.presets import badam

    return badam(list(named_params), **kwargs)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "frugal": _frugal,
    "galore": _galore,
    "badam": _badam,
}


def build_optimizer(name: str, named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    """``build_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.1)``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(named_params), **kwargs)
