"""leanlm.optim: optimizers and parameterisations another codebase can take alone.

Imports torch (and ``leanlm.kernels`` for dispatch) only, never ``leanlm.engine``.
"""

from leanlm.optim.factory import OPTIMIZERS, build_optimizer, param_groups_by_decay

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups_by_decay"]
