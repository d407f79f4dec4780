"""The optimizer registry: every optimizer leanlm can build by name, in one table.

Each entry says how to build the optimizer (a ``"module:callable"`` taking ``(named_params,
**kwargs)``), which of leanlm's ``optim.*`` settings it takes (setting -> keyword) and what its
recipe fixes (the projection, the rule outside the subspace). Everything else that lists
optimizer names derives from this table: the config's ``optim.name`` choices, ``build_optimizer``,
``optimizer_kwargs``, the Hugging Face ``TrainerOptimizer`` and the tests.

This module imports only the standard library and the torch-free table of FRUGAL's group
defaults, so the config (which must not import torch) can read it; builders are imported when
an optimizer is built. A new optimizer is one
``register(...)`` call (or one entry below).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from leanlm.optim.defaults import GROUP_DEFAULTS

_ADAM = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One optimizer: how to build it, the settings it takes, what its recipe fixes."""

    build: str | Callable[..., Any]
    """``"module:callable"`` (imported on first use) or the callable: ``(named_params, **kwargs)``."""
    settings: Mapping[str, str] = field(default_factory=dict)
    """leanlm setting (an ``optim.*`` key) -> the builder's keyword."""
    seeded: bool = True
    """Takes ``seed`` (its subspace choices are seeded from the run's seed)."""
    projection: str | None = None
    """The subspace its recipe fixes; None: the ``projection`` setting (or none at all)."""
    state_free: str | None = None
    """The rule outside the subspace its recipe fixes; None: the ``state_free`` setting."""

    def builder(self) -> Callable[..., Any]:
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)

    def kwargs(self, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """The builder's keyword arguments, picked from a flat mapping of settings."""
        out = {arg: settings[key] for key, arg in self.settings.items()}
        if "betas" in out:
            out["betas"] = tuple(out["betas"])
        if "rank" in out:
            out["rank"] = out["rank"] or None  # the config's 0: from density
        if self.seeded:
            out["seed"] = seed
        return out

    def rule(self, settings: Mapping[str, Any]) -> tuple[str | None, str]:
        """(projection, state-free rule) this optimizer runs with under ``settings``: what its
        recipe fixes, else the settings it takes. AdamW, which splits nothing, is (None, "none")."""
        projection = self.projection or (settings["projection"] if "projection" in self.settings else None)
        state_free = self.state_free or (settings["state_free"] if "state_free" in self.settings else "none")
        return projection, state_free


REGISTRY: dict[str, Entry] = {
    "adamw": Entry(build="leanlm.optim.factory:adamw", settings=_ADAM, seeded=False),
    # every FRUGAL group key but the seed (the run's) and projectable (per group, from the names)
    "frugal": Entry(
        build="leanlm.optim.factory:frugal",
        settings={k: k for k in GROUP_DEFAULTS if k not in ("seed", "projectable")},
    ),
    "galore": Entry(
        build="leanlm.optim.presets:galore",
        settings={**_ADAM, "density": "density", "update_gap": "update_gap", "galore_scale": "scale"},
        projection="svd",
        state_free="none",
    ),
    "badam": Entry(
        build="leanlm.optim.presets:badam",
        settings={**_ADAM, "density": "density", "update_gap": "update_gap", "block_order": "block_order"},
        projection="blocks",
        state_free="none",
    ),
    "fira": Entry(
        build="leanlm.optim.presets:fira",
        settings={**_ADAM, "density": "density", "update_gap": "update_gap", "fira_alpha": "alpha", "rank": "rank"},
        projection="svd",
        state_free="fira",
    ),
    "galore_fira": Entry(
        build="leanlm.optim.presets:galore_fira",
        settings={**_ADAM, "density": "density", "update_gap": "update_gap", "galore_scale": "scale", "rank": "rank"},
        projection="svd",
        state_free="fira",
    ),
    "apollo": Entry(
        build="leanlm.optim.presets:apollo",
        settings={**_ADAM, **{k: k for k in ("density", "update_gap", "scaling", "rank")}, "apollo_scale": "scale"},
        projection="gaussian",
        state_free="apollo",
    ),
    # APOLLO-Mini is a fixed recipe (rank 1, one ratio per tensor, update scale 128); vary it
    # through ``apollo`` (optim.rank, optim.scaling, optim.apollo_scale).
    "apollo_mini": Entry(
        build="leanlm.optim.presets:apollo_mini",
        settings={**_ADAM, "update_gap": "update_gap"},
        projection="gaussian",
        state_free="apollo",
    ),
}


def register(name: str, entry: Entry) -> None:
    """Add an optimizer under ``name`` (``optim.name=<name>`` then works everywhere)."""
    if name in REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    REGISTRY[name] = entry


def entry(name: str) -> Entry:
    """The registry entry of ``name``; a ValueError naming the choices otherwise."""
    found = REGISTRY.get(name)
    if found is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(REGISTRY)}")
    return found
