"""``torch.ops.leanlm.lost_linear_fwd`` / ``lost_linear_bwd``: the Triton LOST kernels as
``torch.library`` custom ops with fake (meta) implementations and autograd, so the fused layer
composes with ``torch.compile`` (one opaque node, shapes from the fake kernel) and FSDP2.

Imported only when the Triton path is taken (it imports triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

import leanlm.kernels.lost_triton as lost_triton


@torch.library.custom_op("leanlm::lost_linear_fwd", mutates_args=())
def lost_linear_fwd(
    x: Tensor, a: Tensor, b: Tensor, ws: Tensor, index: Tensor, gamma: Tensor, phi: str
) -> tuple[Tensor, Tensor]:
    """x (N, n) -> (Y (N, m), H_pre (N, r)); ``gamma`` a 0-d float32 tensor on x's device."""
    return lost_triton.forward(x, a, b, ws, index, gamma, phi)


@lost_linear_fwd.register_fake
def _(x, a, b, ws, index, gamma, phi):
    return x.new_empty((x.shape[0], b.shape[1])), x.new_empty((x.shape[0], a.shape[1]))


@torch.library.custom_op("leanlm::lost_linear_bwd", mutates_args=())
def lost_linear_bwd(
    dy: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    ws: Tensor,
    index: Tensor,
    hpre: Tensor,
    gamma: Tensor,
    phi: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dW_s)."""
    return lost_triton.backward(dy, x, a, b, ws, index, hpre, gamma, phi)


@lost_linear_bwd.register_fake
def _(dy, x, a, b, ws, index, hpre, gamma, phi):
    return (
        x.new_empty((x.shape[0], x.shape[1])),
        torch.empty_like(a),
        torch.empty_like(b),
        torch.empty_like(ws),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, a, b, ws, index, gamma, phi = inputs
    ctx.save_for_backward(x, a, b, ws, index, output[1], gamma)
    ctx.phi = phi


def _backward(ctx, dy, _dhpre):
    x, a, b, ws, index, hpre, gamma = ctx.saved_tensors
    dx, da, db, dws = lost_linear_bwd(dy, x, a, b, ws, index, hpre, gamma, ctx.phi)
    return dx, da, db, dws, None, None, None


lost_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
