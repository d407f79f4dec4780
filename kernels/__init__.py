"""leanlm.kernels: Triton kernels with PyTorch references and a dispatch.

Every op comes as ``op`` (dispatch), ``op_reference`` (plain PyTorch, any device) and a Triton
implementation; ``LEANLM_KERNELS=reference|triton`` forces a path (``auto``, the default, takes
Triton for CUDA tensors when it is installed).

    lost_linear      fused LOST layer (lost_linear.py dispatch, lost_triton.py, lost_op.py)
    frugal_update    fused FRUGAL step for the columns / rows projections (frugal_update.py)
    dispatch         the dispatch rule (``use_triton``, ``LEANLM_KERNELS``), φ, the inverse index
"""

from leanlm.kernels.dispatch import (
    KERNELS_ENV,
    PHIS,
    apply_phi,
    inverse_index,
    kernel_path,
    triton_available,
    use_triton,
)
from leanlm.kernels.frugal_update import frugal_update, frugal_update_reference
from leanlm.kernels.lost_linear import lost_linear, lost_linear_reference

__all__ = [
    "KERNELS_ENV",
    "PHIS",
    "apply_phi",
    "frugal_update",
    "frugal_update_reference",
    "inverse_index",
    "kernel_path",
    "lost_linear",
    "lost_linear_reference",
    "triton_available",
    "use_triton",
]
