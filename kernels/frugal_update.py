"""The FRUGAL step for one matrix under the ``columns`` / ``rows`` projections, fused.

Per element of W (m, n) with gradient G: decoupled weight decay, then either the Adam step (its
column / row is in the state-full index I; moments of shape (m, k) for columns, (k, n) for rows)
or the state-free step (−lr_free·sign(G), −lr_free·G, or nothing). The reference does this with
torch ops (a gather, the moment updates, a full-size state-free buffer and a scatter); the Triton
kernel reads p and g once, m and v only for state-full elements, and writes p (and m, v) once:
~4+4+4 bytes per parameter plus 16 per state-full parameter in fp32, against AdamW's 28.

``frugal_update`` dispatches: Triton for CUDA tensors when it is installed (``LEANLM_KERNELS``
forces a path), the reference otherwise. The FRUGAL optimizer calls it for every columns / rows
matrix, so the reference *is* the CPU code path of ``leanlm.optim.FRUGAL``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from leanlm.kernels.dispatch import inverse_index, use_triton

FREE_CODE = {"sign": 0, "sgd": 1, "none": 2}


def update_moments_(low: torch.Tensor, st: dict[str, Any], betas) -> float:
    """Fold ``low`` into the moments ``st["exp_avg"]``, ``st["exp_avg_sq"]``; increments and
    returns the step count ``st["step"]``."""
    b1, b2 = betas
    st["step"] += 1
    low = low.to(st["exp_avg"].dtype)
    st["exp_avg"].lerp_(low, 1 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(low, low, value=1 - b2)
    return float(st["step"])


def adam_direction_(low: torch.Tensor, st: dict[str, Any], betas, eps: float, lr: float) -> torch.Tensor:
    """Update the moments with ``low`` and return the Adam step (already scaled by −lr/bc1)."""
    b1, b2 = betas
    k = update_moments_(low, st, betas)
    out = st["exp_avg_sq"].sqrt().div_(math.sqrt(1 - b2**k)).add_(eps)  # the denominator...
    return torch.div(st["exp_avg"], out, out=out).mul_(-lr / (1 - b1**k))  # ...then the step


def adam_foreach_(params, grads, states, lr: float, betas, eps: float) -> None:
    """Plain AdamW moments + update for same-role tensors (weight decay applied by the caller)."""
    b1, b2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    for s in states:
        s["step"] += 1
    torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
    steps = [float(s["step"]) for s in states]
    step_sizes = [-lr / (1 - b1**k) for k in steps]
    bc2_sqrt = [math.sqrt(1 - b2**k) for k in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def state_free_update(residual: torch.Tensor, rule: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The state-free direction (before −lr scaling): sign(residual) or the residual itself."""
    out = torch.empty_like(residual) if out is None else out
    return torch.sign(residual, out=out) if rule == "sign" else out.copy_(residual)


def frugal_update_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    st: dict[str, Any],
    dim: int,
    lr: float,
    lr_free: float,
    betas,
    eps: float,
    free: str,
    decay: float = 1.0,
    scratch: torch.Tensor | None = None,
) -> None:
    """In place on ``p`` and the state ``st`` (exp_avg, exp_avg_sq, step, index). ``dim``: 1 for
    columns, 0 for rows. ``scratch``: a reusable buffer shaped like ``g`` for the state-free step."""
    if decay != 1.0:
        p.mul_(decay)
    index = st["index"]
    low = g.index_select(dim, index)
    upd = adam_direction_(low, st, betas, eps, lr) if low.numel() else low
    if free == "none":
        p.index_add_(dim, index, upd.to(p.dtype))
        return
    # The state-free step everywhere, then the selected coordinates overwritten with the Adam
    # step, so each coordinate gets exactly one of the two.
    u = state_free_update(g, free, scratch).mul_(-lr_free)
    u.index_copy_(dim, index, upd.to(u.dtype))
    p.add_(u)


def frugal_update(
    p: torch.Tensor,
    g: torch.Tensor,
    st: dict[str, Any],
    dim: int,
    lr: float,
    lr_free: float,
    betas,
    eps: float,
    free: str,
    decay: float = 1.0,
    scratch: torch.Tensor | None = None,
    inv: torch.Tensor | None = None,
) -> None:
    """Dispatch: the fused Triton kernel (contiguous p, g and moments) or the reference.
    ``inv``: the cached ``inverse_index`` of ``st["index"]`` (computed when omitted)."""
    fusable = p.is_contiguous() and g.is_contiguous() and st["exp_avg"].is_contiguous()
    if not (fusable and use_triton(p)):
        frugal_update_reference(p, g, st, dim, lr, lr_free, betas, eps, free, decay, scratch)
        return
    from leanlm.kernels.frugal_triton import fused_update

    if inv is None:
        inv = inverse_index(st["index"], p.shape[dim])
    if st["index"].numel():  # as in the reference: no Adam coordinates, no Adam step
        st["step"] += 1
    k = max(float(st["step"]), 1.0)
    b1, b2 = betas
    fused_update(
        p,
        g,
        st["exp_avg"],
        st["exp_avg_sq"],
        inv,
        dim,
        st["index"].numel(),
        decay=decay,
        step_size=-lr / (1 - b1**k),
        bc2_sqrt=math.sqrt(1 - b2**k),
        b1=b1,
        b2=b2,
        eps=eps,
        lr_free=lr_free,
        free=FREE_CODE[free],
    )
