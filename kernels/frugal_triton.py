"""Triton kernel for the fused FRUGAL columns / rows update (see ``frugal_update`` for the math).

One program handles up to BLOCK columns of one row of the contiguous matrix W (m, n). Each
element's column (or row) looks up its slot in the state-full index through the inverse map
``inv`` (int32, −1 when unselected); only selected elements load and store the moments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _frugal_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    inv_ptr,
    n_cols,
    k_sel,
    decay,
    step_size,
    bc2_sqrt,
    b1,
    b2,
    eps,
    lr_free,
    DIM: tl.constexpr,
    FREE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, column block): no per-element integer division on the GPU."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    offs = row * n_cols + cols
    if DIM == 1:  # columns: moments (m, k)
        pos = tl.load(inv_ptr + cols, mask=ok, other=-1)
        sidx = row * k_sel + pos
    else:  # rows: moments (k, n), one slot for the whole row
        pos = tl.load(inv_ptr + row + tl.zeros_like(cols), mask=ok, other=-1)
        sidx = pos.to(tl.int64) * n_cols + cols
    sel = ok & (pos >= 0)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32) * decay
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + sidx, mask=sel, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + sidx, mask=sel, other=0.0).to(tl.float32)
    m = m + (1.0 - b1) * (g - m)
    v = v * b2 + (1.0 - b2) * g * g
    adam = m / (tl.sqrt(v) / bc2_sqrt + eps) * step_size
    if FREE == 0:
        free = tl.where(g > 0, -lr_free, tl.where(g < 0, lr_free, 0.0))
    elif FREE == 1:
        free = -lr_free * g
    else:
        free = tl.zeros_like(g)
    p = p + tl.where(sel, adam, free)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)
    tl.store(m_ptr + sidx, m.to(m_ptr.dtype.element_ty), mask=sel)
    tl.store(v_ptr + sidx, v.to(v_ptr.dtype.element_ty), mask=sel)


def fused_update(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    inv: torch.Tensor,
    dim: int,
    k: int,
    *,
    decay: float,
    step_size: float,
    bc2_sqrt: float,
    b1: float,
    b2: float,
    eps: float,
    lr_free: float,
    free: int,
) -> None:
    """One launch over the whole matrix; p, exp_avg, exp_avg_sq are updated in place."""
    m, n = p.shape
    block = min(1024, triton.next_power_of_2(n))
    _frugal_kernel[(m, triton.cdiv(n, block))](
        p_ptr=p,
        g_ptr=g,
        m_ptr=exp_avg,
        v_ptr=exp_avg_sq,
        inv_ptr=inv,
        n_cols=n,
        k_sel=k,
        decay=decay,
        step_size=step_size,
        bc2_sqrt=bc2_sqrt,
        b1=b1,
        b2=b2,
        eps=eps,
        lr_free=lr_free,
        DIM=dim,
        FREE=free,
        BLOCK=block,
        num_warps=4,
    )
