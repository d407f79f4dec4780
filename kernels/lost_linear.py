"""LOST linear: y = γ·φ(x A) B + (1 − γ)·x[:, I] W_sᵀ.

Shapes: x (..., n) (any leading dims, non-contiguous allowed), A (n, r), B (r, m), W_s (m, k),
index I (k,) int, sorted and unique; γ a Python float or 0-d tensor (an explicit scale on each
path, never folded into the weights: Adam's steps are scale-free, so folding changes training).

``lost_linear`` dispatches: the PyTorch reference runs everywhere; the fused Triton kernel (two
launches forward, GEMM over the concatenated inner dimension r + k) lands with the kernels issue
and will be picked on CUDA unless ``LEANLM_KERNELS=reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanlm.kernels import kernel_path

PHIS = ("identity", "silu", "relu2")


def apply_phi(h: torch.Tensor, phi: str) -> torch.Tensor:
    if phi == "identity":
        return h
    if phi == "silu":
        return F.silu(h)
    if phi == "relu2":
        return F.relu(h).square()
    raise ValueError(f"unknown phi {phi!r}; choose one of {', '.join(PHIS)}")


def lost_linear_reference(
    x: torch.Tensor,
    lowrank_in: torch.Tensor,
    lowrank_out: torch.Tensor,
    sparse: torch.Tensor,
    index: torch.Tensor,
    gamma: float | torch.Tensor,
    phi: str = "silu",
) -> torch.Tensor:
    """Plain PyTorch: gather the k input channels, two GEMMs for the low-rank path, scaled sum."""
    low = apply_phi(x @ lowrank_in, phi) @ lowrank_out  # (..., m)
    if sparse.numel() == 0:
        return gamma * low
    picked = x.index_select(-1, index)  # (..., k)
    return gamma * low + (1 - gamma) * (picked @ sparse.T)


def lost_linear(
    x: torch.Tensor,
    lowrank_in: torch.Tensor,
    lowrank_out: torch.Tensor,
    sparse: torch.Tensor,
    index: torch.Tensor,
    gamma: float | torch.Tensor,
    phi: str = "silu",
) -> torch.Tensor:
    """Dispatch: the reference today (the Triton path is not built yet; forcing it is an error)."""
    if kernel_path() == "triton":
        raise NotImplementedError(
            "LEANLM_KERNELS=triton: the fused LOST kernel is not built yet; use reference"
        )
    return lost_linear_reference(x, lowrank_in, lowrank_out, sparse, index, gamma, phi)
