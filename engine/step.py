"""One optimizer step's math: micro-batches -> per-row losses -> backward -> clip -> step.

When things happen (eval, checkpoints, logging) is the trainer's business, not this module's.
The loss path returns per-row (per-sequence) losses so sample reweighting can weight rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def row_losses(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean token cross-entropy of each row over its non-ignored targets, in float32.

    logits: (B, T, V); targets: (B, T) -> (B,). A row with no valid target has loss 0.
    """
    B, T, V = logits.shape
    tok = F.cross_entropy(
        logits.reshape(B * T, V).float(),
        targets.reshape(B * T),
        ignore_index=ignore_index,
        reduction="none",
    )
    valid = (targets != ignore_index).sum(dim=1).clamp_min(1)
    return tok.view(B, T).sum(dim=1) / valid


@dataclass
class StepResult:
    loss: float  # mean training loss over this rank's micro-batches
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # tokens processed on this rank


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[torch.Tensor],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    grad_clip: float = 0.0,
) -> StepResult:
    """Forward/backward every micro-batch (each (micro, T + 1) tokens), clip, step, zero grads."""
    accum = len(micro_batches)
    total = torch.zeros((), device=device)
    tokens = 0
    for j, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        # DDP: all-reduce gradients only on the last micro-batch.
        sync = (
            contextlib.nullcontext()
            if j == accum - 1 or not hasattr(model, "no_sync")
            else model.no_sync()
        )
        with sync:
            with autocast or contextlib.nullcontext():
                loss = row_losses(model(inputs), targets).mean() / accum
            loss.backward()
        total += loss.detach()
        tokens += targets.numel()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total.item(), grad_norm=norm.item(), tokens=tokens)
