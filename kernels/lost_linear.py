"""LOST linear: y = γ·φ(x A) B + (1 − γ)·x[:, I] W_sᵀ.

Shapes: x (..., n) (any leading dims, non-contiguous allowed), A (n, r), B (r, m), W_s (m, k),
index I (k,) int, sorted and unique; γ a Python float or 0-d tensor (an explicit scale on each
path, never folded into the weights: Adam's steps are scale-free, so folding changes training).

``lost_linear`` dispatches: the PyTorch reference runs everywhere; the fused Triton kernels
(``leanlm.kernels.lost_triton``: two launches forward with a GEMM over the concatenated inner
dimension r + k, fused backward; a ``torch.library`` custom op) are picked on CUDA when Triton is
installed. ``LEANLM_KERNELS=reference|triton`` forces one (triton on CPU tensors needs
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from leanlm.kernels.dispatch import PHIS, apply_phi, use_triton


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
    """Dispatch: Triton on CUDA (or when forced), the PyTorch reference otherwise."""
    if not use_triton(x):
        return lost_linear_reference(x, lowrank_in, lowrank_out, sparse, index, gamma, phi)
    if phi not in PHIS:
        raise ValueError(f"unknown phi {phi!r}; choose one of {', '.join(PHIS)}")
    from leanlm.kernels.lost_op import lost_linear_fwd  # lazy: keeps triton off the CPU path

    dtype = _compute_dtype(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)  # a view when the leading dims allow it
    # γ travels as a 0-d device tensor: no host sync, and torch.compile need not specialise on it.
    g = torch.as_tensor(gamma, dtype=torch.float32, device=x.device).reshape(())
    y, _ = lost_linear_fwd(x2d, lowrank_in.to(dtype), lowrank_out.to(dtype), sparse.to(dtype), index, g, phi)
    return y.reshape(*lead, lowrank_out.shape[1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul in (custom ops are not autocast themselves)."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch 2.4: no device argument
        enabled = torch.is_autocast_enabled() if device == "cuda" else False
    if not enabled:
        return x.dtype
    try:
        return torch.get_autocast_dtype(device)
    except AttributeError:  # torch 2.4
        return torch.get_autocast_gpu_dtype()
