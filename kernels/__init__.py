"""leanlm.kernels: Triton kernels with PyTorch references and a dispatch.

Every op comes as ``op`` (dispatch), ``op_reference`` (plain PyTorch, any device) and a Triton
implementation; ``LEANLM_KERNELS=reference|triton`` forces a path. The kernels themselves land
with the LOST and FRUGAL issues; this package exists now so the layout and imports are fixed.
"""

import os

KERNELS_ENV = "LEANLM_KERNELS"


def kernel_path() -> str:
    """Which implementation the dispatch should use: ``reference``, ``triton`` or ``auto``."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"{KERNELS_ENV}={value!r} is not one of auto, reference, triton")
    return value
