"""Pure-bf16 training that still learns: updates computed in float32 and rounded to bf16
stochastically, and optionally bf16 optimizer moments.

A bf16 weight has an 8-bit mantissa: an update smaller than half its last place (2^-9 of the
weight) is lost entirely under round-to-nearest, which is what late-training AdamW steps mostly
are. Stochastic rounding rounds up with probability equal to the remainder, so the expected weight
is exact and small updates accumulate on average (as in torch-optimi and the Gopher/Gemini bf16
recipes). ``PrecisionHooks`` wraps any ``torch.optim.Optimizer`` through its step pre/post hooks:

    opt = FRUGAL(model.named_parameters(), lr=1e-3)          # model in bf16
    PrecisionHooks(opt, rounding="stochastic", seed=0)        # that is all

Before each step every bf16 parameter that has a gradient is swapped to a float32 copy (its
gradient too), so the optimizer's math runs in float32; after the step the result is rounded back
into the bf16 storage. Peak extra memory is a float32 copy of the tensors being stepped: one tensor
at a time with ``StepInBackward`` (the 7B recipe) or ``hooks.step()`` instead of ``opt.step()``,
every tensor at once with a plain ``opt.step()``. FSDP2-sharded parameters keep their bf16 step.
``state_dtype=torch.bfloat16`` stores the Adam moments (``exp_avg``, ``exp_avg_sq``) in bf16 between
steps (rounded to nearest; float32 during the step). The rounding noise comes from a generator
seeded by (seed, parameter index, the parameter's update count), and the count lives in the
optimizer state (``sr_count``), so runs and resumes are reproducible.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from leanlm.optim.sharding import is_dtensor

ROUNDINGS = ("nearest", "stochastic")
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its PrecisionHooks


def hooks_of(optimizer: torch.optim.Optimizer) -> PrecisionHooks | None:
    """The ``PrecisionHooks`` attached to ``optimizer``, if any."""
    return _HOOKS.get(optimizer)


MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` into bf16 ``out``: up with probability equal to the dropped fraction,
    so E[out] = x. Adds uniform noise to the 16 bits bf16 drops, then truncates them; non-finite
    values pass through."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # low 16 bits clear: exact in bf16
    out.copy_(torch.where(torch.isfinite(x), rounded, x))
    return out


def _generator(seed: int, index: int, count: int, device: torch.device) -> torch.Generator:
    digest = hashlib.blake2b(f"leanlm-sr:{seed}:{index}:{count}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))


class PrecisionHooks:
    """Float32 math for a bf16 model's optimizer step; ``rounding`` back to bf16 (``nearest`` or
    ``stochastic``); ``state_dtype`` for the moments between steps (None: as the optimizer makes
    them, float32 here)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rounding: str = "stochastic",
        state_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        self.optimizer, self.rounding, self.state_dtype, self.seed = optimizer, rounding, state_dtype, seed
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(params)}
        self._low: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]
        _HOOKS[optimizer] = self

    def step(self) -> None:
        """``optimizer.step()`` one tensor at a time, each gradient freed after its update: the
        float32 copies then exist for one tensor only (a plain ``optimizer.step()`` makes them for
        every tensor at once). The same update: the optimizers skip tensors without a gradient."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
            self.optimizer.step()
            p.grad = None

    def _stepped(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p in self._stepped():
            st = optimizer.state[p]
            for key in MOMENT_KEYS:  # compute in float32 whatever they are stored in
                if key in st and st[key].dtype != torch.float32 and st[key].is_floating_point():
                    st[key] = st[key].float()
            if p.dtype == torch.bfloat16 and not is_dtensor(p):  # FSDP2 shards step in bf16 as before
                self._low[id(p)] = (p.data, p.grad)
                p.data = p.data.float()
                p.grad = p.grad.float()

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p in [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._low]:
            low, grad = self._low.pop(id(p))
            st = optimizer.state[p]
            if self.rounding == "stochastic" and p.device.type != "meta":  # meta: shapes only (leanlm memory)
                count = int(st.get("sr_count", 0))
                gen = _generator(self.seed, self._index[id(p)], count, p.device)
                stochastic_round_(low, p.data, gen)
                st["sr_count"] = torch.tensor(count + 1, dtype=torch.int64)
            else:
                low.copy_(p.data)
            p.data, p.grad = low, grad
        if self.state_dtype is not None:
            for p in self._stepped():
                st = optimizer.state[p]
                for key in MOMENT_KEYS:
                    if key in st and st[key].is_floating_point():
                        st[key] = st[key].to(self.state_dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
