"""leanlm.optim: optimizers and parameterisations another codebase can take alone.

Imports torch (and ``leanlm.kernels`` for dispatch) only, never ``leanlm.engine``.

    from leanlm.optim import FRUGAL, LOSTLinear, convert
    opt = FRUGAL(model.named_parameters(), lr=1e-3, density=0.25, projection="columns")
    print(opt.describe())                      # what was split, by name
"""

from leanlm.optim.factory import (
    OPTIMIZER_SETTINGS,
    OPTIMIZERS,
    build_optimizer,
    optimizer_kwargs,
    param_groups_by_decay,
)
from leanlm.optim.frugal import FRUGAL
from leanlm.optim.groups import frugal_param_groups, is_projectable_name
from leanlm.optim.in_backward import StepInBackward
from leanlm.optim.lost import LOSTLinear, convert
from leanlm.optim.memory import state_bytes
from leanlm.optim.precision import PrecisionHooks, stochastic_round_
from leanlm.optim.presets import apollo, apollo_mini, badam, fira, galore, galore_fira

__all__ = [
    "FRUGAL",
    "OPTIMIZERS",
    "OPTIMIZER_SETTINGS",
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
    "is_projectable_name",
    "optimizer_kwargs",
    "param_groups_by_decay",
    "state_bytes",
    "stochastic_round_",
]
