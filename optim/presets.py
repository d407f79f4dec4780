"""GaLore and BAdam as special cases of FRUGAL, so all three compare on equal footing.

* ``galore(...)``: svd projection (top singular vectors of the gradient, refreshed every
  ``update_gap`` steps), no state-free part, moments kept across refreshes (as galore-torch does),
  the low-rank update scaled by ``scale`` (GaLore's α, 0.25 in its paper). One difference from
  galore-torch, on purpose: weight decay is decoupled and applied before the update.
* ``badam(...)``: ρ of the projectable tensors are trained with Adam, whole, in ``block_order``;
  the rest get no update; the moments are rebuilt at every switch. BAdam also skips computing the
  frozen blocks' gradients; this preset computes full gradients (it reproduces BAdam's update, not
  its gradient-memory saving).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from leanlm.optim.frugal import FRUGAL


def galore(
    params: Iterable[Any],
    lr: float = 1e-3,
    density: float = 0.25,
    update_gap: int = 200,
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
    lr: float = 1e-3,
    density: float = 0.25,
    update_gap: int = 200,
    block_order: str = "descending",
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
