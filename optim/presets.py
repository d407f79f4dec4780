"""GaLore, BAdam, Fira and APOLLO as special cases of FRUGAL, so all compare on equal footing.

* ``galore(...)``: svd projection (top singular vectors of the gradient, refreshed every
  ``update_gap`` steps), no state-free part, moments kept across refreshes (as galore-torch does),
  the low-rank update scaled by ``scale`` (GaLore's α, 0.25 in its paper). One difference from
  galore-torch, on purpose: weight decay is decoupled and applied before the update.
* ``badam(...)``: ρ of the projectable tensors are trained with Adam, whole, in ``block_order``;
  the rest get no update; the moments are rebuilt at every switch. BAdam also skips computing the
  frozen blocks' gradients; this preset computes full gradients (it reproduces BAdam's update, not
  its gradient-memory saving).
* ``fira(...)``: the paper's recipe (Chen et al. 2024): GaLore's svd subspace, moments kept across
  refreshes, the residual scaled per channel (``state_free="fira"``). ``alpha``: the fira
  package's scale of the low-rank update (1.0 there by default).
* ``galore_fira(...)``: the best at ρ 0.25 with small batches (BENCHMARKS.md, ``compare_optim``;
  with 32k-token batches ``fira`` wins): GaLore mode (svd, moments kept, the low-rank step
  scaled by 0.25) plus Fira's scaled residual at the same 0.25. Not a paper's recipe: ``galore``
  and ``fira`` are those.
* ``apollo(...)`` / ``apollo_mini(...)``: APOLLO's recipes (Zhu et al. 2024): a Gaussian random
  projection (no SVD), the whole gradient scaled per channel (rank ρ·min(m, n), or ``rank``) or,
  for APOLLO-Mini, per tensor at rank 1 with ``scale`` 128; moments kept across refreshes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from leanlm.optim.defaults import GROUP_DEFAULTS as _D
from leanlm.optim.frugal import FRUGAL


def galore(
    params: Iterable[Any],
    lr: float = _D["lr"],
    density: float = _D["density"],
    update_gap: int = _D["update_gap"],
    scale: float = 0.25,
    **kwargs: Any,
) -> FRUGAL:
    """GaLore-AdamW: rank = round(density·min(m, n)) on every projectable matrix."""
    return FRUGAL(
        params,
        lr=lr,
        density=density,
        update_gap=update_gap,
        projection="svd",
        state_free="none",
        reset_on_refresh=False,
        proj_lr_scale=scale,
        **kwargs,
    )


def badam(
    params: Iterable[Any],
    lr: float = _D["lr"],
    density: float = _D["density"],
    update_gap: int = _D["update_gap"],
    block_order: str = _D["block_order"],
    **kwargs: Any,
) -> FRUGAL:
    """BAdam-style block coordinate descent over whole projectable tensors."""
    return FRUGAL(
        params,
        lr=lr,
        density=density,
        update_gap=update_gap,
        projection="blocks",
        state_free="none",
        reset_on_refresh=True,
        block_order=block_order,
        **kwargs,
    )


def fira(
    params: Iterable[Any],
    lr: float = _D["lr"],
    density: float = _D["density"],
    update_gap: int = _D["update_gap"],
    alpha: float = 1.0,
    rank: int | None = None,
    residual_scale: float = 1.0,
    **kwargs: Any,
) -> FRUGAL:
    """Fira: GaLore's subspace plus the residual scaled per channel, with the norm-growth limiter.
    The low-rank step is scaled by ``alpha`` and the residual by ``residual_scale`` (1, as in the
    fira package, which also subtracts alpha·P↑P↓G for its residual; here the residual is exact,
    the same at alpha 1)."""
    kwargs.setdefault("projection", "svd")
    return FRUGAL(
        params,
        lr=lr,
        density=density,
        update_gap=update_gap,
        state_free="fira",
        reset_on_refresh=False,
        proj_lr_scale=alpha,
        state_free_lr_scale=residual_scale / alpha,
        rank=rank,
        **kwargs,
    )


def galore_fira(
    params: Iterable[Any],
    lr: float = 1e-2,
    density: float = _D["density"],
    update_gap: int = _D["update_gap"],
    scale: float = 0.25,
    rank: int | None = None,
    **kwargs: Any,
) -> FRUGAL:
    """GaLore's update plus the Fira residual, both scaled by ``scale``: the low-rank Adam step in
    the top singular subspace and, off it, the gradient scaled per channel by the Adam/gradient
    norm ratio (with the growth limiter). The same state as GaLore (and Fira) plus one scalar per
    matrix; ``lr`` 1e-2 was the best of {3e-3, 1e-2, 3e-2} on the tiny benchmark."""
    return fira(params, lr, density, update_gap, alpha=scale, rank=rank, residual_scale=scale, **kwargs)


def apollo(
    params: Iterable[Any],
    lr: float = _D["lr"],
    density: float = _D["density"],
    update_gap: int = _D["update_gap"],
    scale: float = 1.0,
    scaling: str = _D["scaling"],
    rank: int | None = None,
    **kwargs: Any,
) -> FRUGAL:
    """APOLLO: every projectable matrix's gradient scaled per channel (or per tensor) by the ratio
    measured in a Gaussian random projection; the update is multiplied by √scale, as in apollo-torch."""
    kwargs.setdefault("projection", "gaussian")
    return FRUGAL(
        params,
        lr=lr,
        density=density,
        update_gap=update_gap,
        state_free="apollo",
        scaling=scaling,
        reset_on_refresh=False,
        proj_lr_scale=math.sqrt(scale),
        rank=rank,
        **kwargs,
    )


def apollo_mini(
    params: Iterable[Any], lr: float = _D["lr"], update_gap: int = _D["update_gap"], scale: float = 128.0, **kwargs: Any
) -> FRUGAL:
    """APOLLO-Mini: rank 1, one ratio per tensor, √128 update scale (the paper's recipe)."""
    return apollo(params, lr=lr, update_gap=update_gap, scale=scale, scaling="tensor", rank=1, **kwargs)
