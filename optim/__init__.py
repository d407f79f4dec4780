"""leanlm.optim: optimizers and parameterisations another codebase can take alone.

Imports torch (and ``leanlm.kernels`` for dispatch) only, never ``leanlm.engine``.

    from leanlm.optim import FRUGAL, LOSTLinear, convert
    opt = FRUGAL(model.named_parameters(), lr=1e-3, density=0.25, projection="columns")
    print(opt.describe())                      # what was split, by name

The names below are the drop-in API. They load on first access (PEP 562), so that importing a
torch-free submodule such as ``leanlm.optim.registry`` (which the engine's config reads) does not
import torch. Engine plumbing stays importable from its module (``leanlm.optim.factory``,
``leanlm.optim.groups``, ``leanlm.optim.precision``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that owns it
_OWNERS = {
    "FRUGAL": "frugal",
    "apollo": "presets",
    "apollo_mini": "presets",
    "badam": "presets",
    "fira": "presets",
    "galore": "presets",
    "galore_fira": "presets",
    "LOSTLinear": "lost",
    "convert": "lost",
    "PrecisionHooks": "precision",
    "StepInBackward": "in_backward",
    "build_optimizer": "factory",
    "frugal_param_groups": "groups",
    "state_bytes": "memory",
}

__all__ = [  # the keys of _OWNERS, spelled out for linters and type checkers
    "FRUGAL",
    "LOSTLinear",
    "PrecisionHooks",
    "StepInBackward",
    "apollo",
    "apollo_mini",
    "badam",
    "build_optimizer",
    "convert",
    "fira",
    "frugal_param_groups",
    "galore",
    "galore_fira",
    "state_bytes",
]


def __getattr__(name: str) -> Any:
    owner = _OWNERS.get(name)
    if owner is None:
        raise AttributeError(f"module 'leanlm.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"leanlm.optim.{owner}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see (the same names, eagerly)
    from leanlm.optim.factory import build_optimizer
    from leanlm.optim.frugal import FRUGAL
    from leanlm.optim.groups import frugal_param_groups
    from leanlm.optim.in_backward import StepInBackward
    from leanlm.optim.lost import LOSTLinear, convert
    from leanlm.optim.memory import state_bytes
    from leanlm.optim.precision import PrecisionHooks
    from leanlm.optim.presets import apollo, apollo_mini, badam, fira, galore, galore_fira
