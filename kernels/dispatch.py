"""The one dispatch rule of every kernel op, and the helpers the references and the Triton
kernels share (φ, the inverse index). Ops import these from here, never from the package, so the
package ``__init__`` can re-export both without an import circle."""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

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


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch rule of every op: Triton for CUDA tensors when it is installed, unless
    ``LEANLM_KERNELS`` forces a path (``triton`` without Triton installed is an error)."""
    path = kernel_path()
    if path == "reference":
        return False
    if path == "triton":
        if not triton_available():
            raise RuntimeError(f"{KERNELS_ENV}=triton but Triton is not installed: pip install triton")
        return True
    return t.is_cuda and triton_available()


# LOST's nonlinearity φ between A and B; the Triton kernels take its position here as a constexpr.
PHIS = ("identity", "silu", "relu2")


def apply_phi(h: torch.Tensor, phi: str) -> torch.Tensor:
    """φ(h) in PyTorch (the reference, and the kernels' backward recompute on the host)."""
    if phi == "identity":
        return h
    if phi == "silu":
        return F.silu(h)
    if phi == "relu2":
        return F.relu(h).square()
    raise ValueError(f"unknown phi {phi!r}; choose one of {', '.join(PHIS)}")


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int32: the position of each column / row / channel in ``index``, −1 where it is not
    selected (the kernels' way from a coordinate to its slot in the selection)."""
    inv = torch.full((size,), -1, dtype=torch.int32, device=index.device)
    inv[index.long()] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return inv
