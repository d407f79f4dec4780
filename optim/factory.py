"""Optimizer factory: a name and keyword arguments -> a ``torch.optim.Optimizer``.

Kept free of engine types so another codebase can call it with ``model.named_parameters()``.
Later optimizers (FRUGAL and its GaLore/BAdam presets) register here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from leanlm.optim.frugal import FRUGAL
from leanlm.optim.presets import apollo, badam, fira, galore, galore_fira

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
    return FRUGAL(list(named_params), **kwargs)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "frugal": _frugal,
    "galore": galore,
    "badam": badam,
    "fira": fira,
    "galore_fira": galore_fira,
    "apollo": apollo,
}

_ADAM = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}
# Which settings each optimizer takes: setting name (as in leanlm's ``optim.*`` config) -> keyword.
OPTIMIZER_SETTINGS: dict[str, dict[str, str]] = {
    "adamw": _ADAM,
    "galore": {**_ADAM, "density": "density", "update_gap": "update_gap", "galore_scale": "scale"},
    "badam": {**_ADAM, "density": "density", "update_gap": "update_gap", "block_order": "block_order"},
    "frugal": {
        **_ADAM,
        **{k: k for k in ("density", "projection", "update_gap", "state_free", "state_free_lr_scale")},
        **{k: k for k in ("proj_lr_scale", "reset_on_refresh", "block_order", "scaling", "rank")},
    },
    "fira": {**_ADAM, "density": "density", "update_gap": "update_gap", "fira_alpha": "alpha", "rank": "rank"},
    "galore_fira": {**_ADAM, "density": "density", "update_gap": "update_gap", "galore_scale": "scale", "rank": "rank"},
    "apollo": {
        **_ADAM,
        **{k: k for k in ("density", "update_gap", "scaling", "rank")},
        "apollo_scale": "scale",
    },
}


def optimizer_kwargs(name: str, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The keyword arguments ``build_optimizer(name, ...)`` takes, picked from a flat mapping of
    settings (e.g. ``dataclasses.asdict(cfg.optim)``); ``seed`` seeds the subspace choices."""
    if name not in OPTIMIZER_SETTINGS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_SETTINGS)}")
    kwargs = {arg: settings[key] for key, arg in OPTIMIZER_SETTINGS[name].items()}
    kwargs["betas"] = tuple(kwargs["betas"])
    if "rank" in kwargs:
        kwargs["rank"] = kwargs["rank"] or None  # the config's 0: from density
    if name != "adamw":
        kwargs["seed"] = seed
    return kwargs


def build_optimizer(name: str, named_params: NamedParams, **kwargs: Any) -> torch.optim.Optimizer:
    """``build_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.1)``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(named_params), **kwargs)
