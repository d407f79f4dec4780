"""The optimizer step inside backward: each parameter is updated the moment its gradient is
complete, and its gradient is freed at once, so at most a few gradients are alive at any time
(instead of a full model's worth). The torchtitan / LOMO idea, for any ``torch.optim.Optimizer``
that skips parameters whose ``grad`` is None (AdamW, FRUGAL and its GaLore / BAdam presets do).

    opt = FRUGAL(model.named_parameters(), lr=1e-3)
    in_backward = StepInBackward(opt)            # hooks every parameter of ``opt``
    for batch in data:
        loss = model(batch)
        if in_backward.check_loss(loss):         # False for a NaN/Inf loss: nothing is updated
            loss.backward()                      # the updates happen here
        scheduler.step()

Why this is the same step: ``optimizer.step()`` is called from each parameter's
post-accumulate-grad hook while that parameter is the only one holding a gradient, so it updates
exactly that parameter with the optimizer's own math and state (FRUGAL's per-tensor refresh
cadence and subspace seeds are unchanged; a BAdam refresh still happens once per group). Without
clipping the result is bitwise equal to ``backward(); step()`` (tested).

What changes: global-norm clipping needs every gradient before any update, so ``clip`` is applied
per tensor (each tensor's gradient norm is capped at ``clip``, as LOMO does); the global norm is
still measured (``grad_norm()``, before clipping). With gradient accumulation, set ``armed=False``
for every micro-batch but the last: gradients then accumulate as usual and are stepped on the last
backward (gradients of earlier micro-batches are kept aside meanwhile, so the memory saving needs
a single micro-batch per step). A non-finite gradient in some
tensor skips that tensor's update and sets ``finite`` to False; tensors updated earlier in the
same backward keep their update, so stop the run then (the engine does).

FSDP2 (``fully_shard``) calls these hooks on each sharded parameter once its gradient is
reduce-scattered (torch >= 2.5; see ``fsdp2_calls_hooks``): each rank steps its own shard. Each
tensor's norm is then all-reduced from its shards (one scalar collective per tensor), so the
clipping, the global norm and the finiteness verdict are the same on every rank.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as tdist

from leanlm.optim.sharding import is_dtensor, local


def fsdp2_calls_hooks() -> bool:
    """Whether this torch's FSDP2 runs post-accumulate-grad hooks on sharded parameters after its
    reduce-scatter (what step-in-backward under FSDP2 needs; added in torch 2.5)."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    except ImportError:  # torch 2.4: FSDP2 lived under _composable and ran no such hooks
        return False
    return "_post_accumulate_grad_hooks" in inspect.getsource(collectives)


NORM_CHUNK = 1 << 24  # elements per float32 slice when a low-precision gradient's norm is taken


def _norm(t: torch.Tensor) -> float:
    """L2 norm in float32; a big bf16 gradient (the embedding's) in slices, not one float32 copy."""
    if t.dtype == torch.float32 or t.numel() <= NORM_CHUNK:
        return float(torch.linalg.vector_norm(t.float()))
    flat = t.reshape(-1)
    sq = sum(
        float(torch.linalg.vector_norm(flat[i : i + NORM_CHUNK].float())) ** 2
        for i in range(0, flat.numel(), NORM_CHUNK)
    )
    return math.sqrt(sq)


class StepInBackward:
    """Hooks ``optimizer``'s parameters so that each is stepped, then its gradient freed, as soon
    as backward has accumulated it. ``clip`` > 0: per-tensor gradient-norm cap."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip: float = 0.0,
        bucket_bytes: int = 0,
        on_flush: Callable[[], Any] | None = None,
    ) -> None:
        """``bucket_bytes`` > 0: gradients wait until this many bytes are complete, then one
        ``optimizer.step()`` updates them together (fewer calls: the optimizer's per-call overhead
        and foreach batching are kept; at most ``bucket_bytes`` plus one tensor's gradient is
        alive). 0 steps each tensor alone. ``on_flush``: called after each bucket's step and
        gradient release (the engine hands freed heap pages back to the kernel there on CPU)."""
        self.optimizer, self.clip, self.bucket_bytes, self.on_flush = optimizer, clip, bucket_bytes, on_flush
        self._bucket: list[torch.Tensor] = []
        self._bucket_size = 0
        self._flush_queued = False
        self.armed = True  # False: let gradients accumulate (micro-batches before the last)
        self.finite = True
        self._sq_norm = 0.0
        self._pending: dict[int, torch.Tensor] = {}  # gradients of earlier micro-batches, by id(p)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params()]

    def _params(self) -> Iterator[torch.Tensor]:
        seen: set[int] = set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def begin(self) -> None:
        """Reset the step's gradient-norm accumulator and finiteness flag (call before backward)."""
        self.finite, self._sq_norm = True, 0.0
        self._pending.clear()

    def check_loss(self, loss: torch.Tensor) -> bool:
        """``begin()`` and whether the loss is finite (backward of a NaN loss would update with NaN)."""
        self.begin()
        self.finite = bool(torch.isfinite(loss.detach()).all())
        return self.finite

    def grad_norm(self) -> float:
        """The global L2 norm of this step's gradients, before any clipping."""
        return math.sqrt(self._sq_norm)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:  # the hook runs after accumulation, so there is one
            return
        if not self.armed:  # accumulating: keep the gradient aside (``step`` must see only ``p``'s)
            pending = self._pending.get(id(p))
            if pending is None:
                self._pending[id(p)] = grad
            else:
                pending.add_(grad)
            p.grad = None
            return
        pending = self._pending.pop(id(p), None)
        if pending is not None:  # the same sum, in the same order, as autograd's accumulation
            grad = p.grad = pending.add_(grad)
        shard = local(grad)  # this rank's shard under FSDP2, else the gradient itself
        norm = _norm(shard)
        if is_dtensor(grad):  # the whole tensor's norm, the same on every rank (NaN/Inf included)
            sq = torch.tensor([norm * norm], dtype=torch.float64, device=shard.device)
            tdist.all_reduce(sq, group=grad.device_mesh.get_group())
            norm = math.sqrt(float(sq.item()))
        self._sq_norm += norm * norm
        if not math.isfinite(norm):
            self.finite = False
        elif self.clip > 0 and norm > self.clip:
            shard.mul_(self.clip / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient, per tensor
        self._bucket.append(p)
        self._bucket_size += grad.numel() * grad.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._flush()
        elif not self._flush_queued:  # whatever is left steps when this backward ends
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_queued = True

    @torch.no_grad()
    def _flush(self) -> None:
        """Step the waiting tensors (only they hold gradients now), then free their gradients."""
        if self._bucket and self.finite:
            self.optimizer.step()
        for p in self._bucket:
            p.grad = None
        self._bucket, self._bucket_size, self._flush_queued = [], 0, False
        if self.on_flush is not None:
            self.on_flush()

    def remove(self) -> None:
        """Detach the hooks (the optimizer then steps normally again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
