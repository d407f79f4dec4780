"""Fira and APOLLO: full-rank updates scaled by a norm ratio measured in the state-full subspace.

FRUGAL keeps Adam moments only for R = P↓G, the state-full part of a matrix gradient G (m, n)
(selected columns, rows or entries, or a rank-r basis). Its ``sign`` rule moves the rest by
lr·sign(G − P↑R). These two rules instead scale a full-size term by how much Adam rescales the
gradient where Adam's statistics exist, per channel (or per tensor):

    D   = m / (√v + ε)                    the Adam direction on R (moment-shaped), with the step factor
                                          s_t = √(1−β2^t)/(1−β1^t): the packages' (HF-style) Adam step lr·s_t·D
    φ_c = ‖D_c‖ / (‖R_c‖ + 1e-8)          channel c: a row of W when the subspace spans columns (columns, randk,
                                          and svd / random / gaussian with m >= n), else a column; "tensor": one φ
    fira:   S = φ ⊙ (G − P↑R),  W <- W − lr·s_t·(P↑D + κ·S)   (Chen et al. 2024, arXiv 2410.01623; κ:
                                                                state_free_lr_scale)
    apollo: S = φ ⊙ G,          W <- W − lr·s_t·S             (Zhu et al. 2024, arXiv 2412.05270)

and, before the step, Fira's norm-growth limiter on S: when ‖S_t‖ > γ·‖S_{t−1}‖ (γ = 1.01), S is
shrunk to γ·‖S_{t−1}‖ (the kept norm is the one after shrinking). It damps the spikes a new
subspace would cause. For the coordinate kinds G − P↑R is the exact complement (the unselected
coordinates); for the basis kinds the dense orthogonal-complement residual.

ε sits where the packages put it (before bias correction: torch's AdamW adds ε·√(1−β2^t) there
instead), so without weight decay the updates equal the ``fira`` and ``apollo-torch`` packages' to
float rounding (tested). One deliberate difference: weight decay is decoupled and applied before
the update, as in the rest of FRUGAL (the packages apply it after, to the updated weights).

State per matrix beyond FRUGAL's: one float32 scalar, the limiter's last norm ("growth_norm", −1
before the first step; kept across subspace refreshes, as in Fira).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from leanlm.kernels.frugal_update import update_moments_
from leanlm.optim.projections import Projection

RULES = ("fira", "apollo")
SCALINGS = ("channel", "tensor")
GROWTH_LIMIT = 1.01  # γ, Fira's and APOLLO's norm-growth limit per step
NORM_EPS = 1e-8  # both packages' guard in φ's denominator

Sum = Callable[[torch.Tensor], torch.Tensor]  # the sum over ranks of a locally-computed partial sum


def same(t: torch.Tensor) -> torch.Tensor:
    """The ``Sum`` of one process: nothing to add."""
    return t


def adam_normalized_(low: torch.Tensor, st: dict[str, Any], betas, eps: float) -> tuple[torch.Tensor, float]:
    """Update the moments with ``low`` and return (D in float32, the step factor s_t). Increments
    ``st["step"]``."""
    b1, b2 = betas
    k = update_moments_(low, st, betas)
    bc2 = math.sqrt(1 - b2**k)
    d = st["exp_avg_sq"].float().sqrt().add_(eps)
    return st["exp_avg"].float().div(d), bc2 / (1 - b1**k)


def channel_ratio(
    proj: Projection, st: dict, d: torch.Tensor, low: torch.Tensor, shape: tuple[int, int], scaling: str, allsum: Sum
) -> torch.Tensor:
    """φ: (m, 1), (1, n) or a scalar, in float32."""
    num = proj.channels(d * d, st, shape)
    den = proj.channels(low * low, st, shape)
    if scaling == "tensor":
        num, den = allsum(num.sum()), allsum(den.sum())
    return num.sqrt_().div_(den.sqrt_().add_(NORM_EPS))


def limit_growth_(s: torch.Tensor, st: dict[str, Any], allsum: Sum = same) -> None:
    """Fira's norm-growth limiter, in place on ``s``; no host synchronisation."""
    norm = allsum(torch.linalg.vector_norm(s).square()).sqrt()
    prev = st["growth_norm"]
    shrink = torch.where(
        prev < 0, torch.ones_like(norm), (norm / (prev + NORM_EPS)).clamp(min=GROWTH_LIMIT) / GROWTH_LIMIT
    )
    s.div_(shrink)
    prev.copy_(norm / shrink)


def scaled_update_(
    p: torch.Tensor,
    g: torch.Tensor,
    st: dict[str, Any],
    proj: Projection,
    *,
    rule: str,
    scaling: str,
    lr: float,
    free_scale: float,
    betas,
    eps: float,
    scratch: torch.Tensor,
    allsum: Sum = same,
) -> None:
    """One matrix's Fira or APOLLO step, adding into ``p`` (m, n). ``scratch``: a float32 (m, n)
    buffer (overwritten). ``allsum``: sums partial norms over ranks when ``p`` is one rank's rows of
    a sharded matrix (its channels, whole rows, are local; tensor norms are not)."""
    shape = (p.shape[0], p.shape[1])
    low = proj.down(g, st)  # R, moment-shaped
    d, step = adam_normalized_(low, st, betas, eps)
    low = low.float()
    phi = channel_ratio(proj, st, d, low, shape, scaling, allsum)
    s = scratch
    if rule == "apollo":
        torch.mul(g, phi, out=s)
    elif proj.coordinates:  # the complement: every coordinate, then the selected ones zeroed
        torch.mul(g, phi, out=s)
        proj.put(torch.zeros_like(d), st, s, False)
    else:
        torch.sub(g, proj.lift(low, st, shape, out=s), out=s)
        s.mul_(phi)
    limit_growth_(s, st, allsum)
    p.add_(s, alpha=-lr * step * (free_scale if rule == "fira" else 1.0))
    if rule == "fira" and d.numel():  # the Adam step on the subspace
        if proj.coordinates:
            proj.put(d.mul_(-lr * step), st, p, True)
        else:
            p.add_(proj.lift(d, st, shape, out=s), alpha=-lr * step)
