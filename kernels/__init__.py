"""leanlm.kernels: Triton kernels with PyTorch references and a dispatch.

Every op comes as ``op`` (dispatch), ``op_reference`` (plain PyTorch, any device) and a Triton
implementation; ``LEANLM_KERNELS=reference|triton`` forces a path (``auto``, the default, takes
Triton for CUDA tensors when it is installed).

    lost_linear      fused LOST layer (lost_linear.py dispatch, lost_triton.py, lost_op.py)
    frugal_update    fused FRUGAL step for the columns / rows projections (frugal_update.py)
"""

import importlib.util
import os

import torch

KERNELS_ENV = "LEANLM_KERNELS"


def kernel_path() -> str:
    """Which implementation the dispatch should use: ``reference``, ``triton`` or ``auto``."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"{KERNELS_ENV}={value!r} is not one of auto, reference, triton")
    return value


# Looked up once at import (a plain constant, which torch.compile traces without a cache wrapper).
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is importable (Linux installs it with leanlm; elsewhere it may be missing)."""
    return _TRITON


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int32: the position of each column / row / channel in ``index``, −1 where it is not
    selected (the kernels' way from a coordinate to its slot in the selection)."""
    inv = torch.full((size,), -1, dtype=torch.int32, device=index.device)
    inv[index.long()] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return inv
