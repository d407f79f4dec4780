"""One optimizer step's math: micro-batches -> per-row losses -> (re)weighting -> backward -> clip -> step.

When things happen (eval, checkpoints, logging) is the trainer's business, not this module's.
The model returns per-row (per-sequence) losses; ``batch_loss`` turns them into the micro-batch's
training loss, either the plain mean or the loss-reweighted sum (``leanlm.engine.reweight``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from leanlm.engine import distributed as dist
from leanlm.engine.reweight import WeightStats, sample_weights
from leanlm.optim import StepInBackward
from leanlm.optim.precision import hooks_of


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """What every step of a run shares, built once by the trainer's ``setup``."""

    device: torch.device
    autocast: contextlib.AbstractContextManager | None = None  # bf16 autocast, or None (full precision)
    grad_clip: float = 0.0  # global gradient-norm cap (0: none; per tensor with in_backward)
    chunk_tokens: int = 4096  # tokens per chunk of the head + cross-entropy
    in_backward: StepInBackward | None = None  # the optimizer steps inside the last backward


@dataclass(kw_only=True)
class StepResult:
    loss: float  # mean training loss over this rank's micro-batches (unweighted)
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # tokens processed on this rank
    reweight: WeightStats | None = None  # averaged over micro-batches, when reweighting is on
    finite: bool = True  # False: a loss or the gradient norm was NaN/Inf on some rank; no update
    row_losses: torch.Tensor | None = None  # this rank's per-row losses, micro-batches in order (per-source logs)


def batch_loss(
    rows: torch.Tensor, strategy: str | None = None, r: float = 1.0
) -> tuple[torch.Tensor, WeightStats | None]:
    """The micro-batch loss from this rank's per-row losses ``rows`` (B_local,).

    ``None`` or ``uniform``: the plain mean (bit-identical to no reweighting). Otherwise the rows of
    every rank are gathered, weighted (weights sum to 1 over the global micro-batch, no gradient),
    and this rank's slice, taken by its global rank, gives Σ_local w_i ℓ_i · world_size.
    """
    if strategy is None or strategy == "uniform":
        return rows.mean(), None
    world = dist.world_size()
    global_rows = dist.all_gather(rows.detach().float())  # (world * B_local,), rank-major
    weights = sample_weights(global_rows, strategy, r)
    local = weights.view(world, -1)[dist.rank()]
    return (local * rows).sum() * world, WeightStats.of(global_rows, weights)


@dataclass
class _Tally:
    """The step's running mean loss, token count and reweighting stats over micro-batches."""

    accum: int
    total: torch.Tensor
    tokens: int = 0
    stats: list[WeightStats] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, rows: torch.Tensor, tokens: int, st: WeightStats | None) -> None:
        self.total += rows.float().mean() / self.accum
        self.rows.append(rows.float())
        self.tokens += tokens
        if st is not None:
            self.stats.append(st)

    def result(self, grad_norm: float, finite: bool = True) -> StepResult:
        stats = WeightStats.mean(self.stats) if self.stats else None
        return StepResult(
            loss=float(self.total.item()),
            grad_norm=grad_norm,
            tokens=self.tokens,
            reweight=stats,
            finite=finite,
            row_losses=torch.cat(self.rows) if self.rows else None,
        )


def _forward(
    model: nn.Module, batch: torch.Tensor, spec: StepSpec, reweight: tuple[str, float] | None
) -> tuple[torch.Tensor, torch.Tensor, int, WeightStats | None]:
    """One micro-batch (micro, T + 1) forward: (the loss to back-propagate, the per-row losses
    (micro,) detached, the target token count, the reweighting stats)."""
    batch = batch.to(spec.device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with spec.autocast or contextlib.nullcontext():
        rows = model(inputs, targets=targets, chunk_tokens=spec.chunk_tokens)  # (micro,) float32
    loss, st = batch_loss(rows, *(reweight or (None,)))
    return loss, rows.detach(), targets.numel(), st


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[torch.Tensor],
    spec: StepSpec,
    *,
    reweight: tuple[str, float] | None = None,
) -> StepResult:
    """Forward/backward every micro-batch (each (micro, T + 1) tokens), clip, step, zero grads.

    ``reweight``: (strategy, r) to weight rows by their loss, or None for the plain mean (it can
    change during a run: reweighting starts after its warmup). With ``spec.in_backward`` the
    optimizer steps inside the last backward (``leanlm.optim.StepInBackward``, per-tensor
    clipping), so this only runs the micro-batches.
    """
    if dist.is_deepspeed(model):
        return _deepspeed_step(model, micro_batches, spec, reweight)
    if spec.in_backward is not None:
        return _step_in_backward(model, micro_batches, spec, reweight)
    accum = len(micro_batches)
    tally = _Tally(accum, torch.zeros((), device=spec.device))
    for j, batch in enumerate(micro_batches):
        with dist.gradient_sync(model, last=j == accum - 1):  # DDP / FSDP2: reduce on the last only
            loss, rows, tokens, st = _forward(model, batch, spec, reweight)
            (loss / accum).backward()
        tally.add(rows, tokens, st)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    mean_loss, grad_norm = tally.total.item(), norm.item()
    # Checked before the update, on every rank alike: a NaN step never reaches the weights, so
    # the last checkpoint stays a good one to resume from.
    finite = not dist.any_rank(not (math.isfinite(mean_loss) and math.isfinite(grad_norm)))
    if finite:
        hooks = hooks_of(optimizer)
        if hooks is not None:  # bf16 weights: float32 step copies for one tensor at a time
            hooks.step()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tally.result(grad_norm, finite)


def _step_in_backward(
    model: nn.Module, micro_batches: list[torch.Tensor], spec: StepSpec, reweight: tuple[str, float] | None
) -> StepResult:
    """The step with the update inside backward: each parameter is stepped (and its gradient
    freed) by its hook during the last micro-batch's backward (under FSDP2: each shard, once it is
    reduce-scattered). A non-finite loss on any rank skips backward on every rank, so nothing is
    updated; a non-finite gradient stops the hooks from updating any later tensor."""
    in_backward = spec.in_backward
    assert in_backward is not None  # train_step routes here only with one
    accum = len(micro_batches)
    tally = _Tally(accum, torch.zeros((), device=spec.device))
    in_backward.begin()
    finite = True
    for j, batch in enumerate(micro_batches):
        with dist.gradient_sync(model, last=j == accum - 1):  # FSDP2: reduce-scatter (and step) on the last
            loss, rows, tokens, st = _forward(model, batch, spec, reweight)
        tally.add(rows, tokens, st)
        finite = finite and not dist.any_rank(not bool(torch.isfinite(loss.detach())))
        if finite:
            in_backward.armed = j == accum - 1  # earlier micro-batches accumulate
            (loss / accum).backward()
    finite = finite and in_backward.finite  # the same on every rank (norms are all-reduced)
    for p in (p for g in in_backward.optimizer.param_groups for p in g["params"]):
        p.grad = None  # after a skipped step, accumulated gradients must not leak into the next
    return tally.result(in_backward.grad_norm() if finite else math.nan, finite)


def _deepspeed_step(
    engine, micro_batches: list[torch.Tensor], spec: StepSpec, reweight: tuple[str, float] | None
) -> StepResult:
    """The same step through a DeepSpeed engine: it scales by the accumulation count, reduces,
    clips (``gradient_clipping`` in its config) and steps at the accumulation boundary."""
    accum = len(micro_batches)
    tally = _Tally(accum, torch.zeros((), device=spec.device))
    measured = None
    for batch in micro_batches:
        loss, rows, tokens, st = _forward(engine, batch, spec, reweight)
        engine.backward(loss)
        tally.total += rows.float().mean() / accum
        if engine.is_gradient_accumulation_boundary():
            if not hasattr(engine.optimizer, "_global_grad_norm"):
                # ZeRO-0 fp32 steps our optimizer directly and measures no norm: measure it here
                grads = [p for p in engine.module.parameters() if p.grad is not None]
                measured = torch.nn.utils.clip_grad_norm_(grads, float("inf")).item()
            total = tally.total.item()
            bad = not math.isfinite(total) or (measured is not None and not math.isfinite(measured))
            if dist.any_rank(bad):  # before DeepSpeed's update: the weights stay finite
                return StepResult(loss=total, grad_norm=float(measured or math.nan), tokens=tally.tokens, finite=False)
        engine.step()
        tally.tokens += tokens
        if st is not None:
            tally.stats.append(st)
    norm = engine.get_global_grad_norm()
    norm = measured if norm is None else norm
    return tally.result(float(norm) if norm is not None else float("nan"))
