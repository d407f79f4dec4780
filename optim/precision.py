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
A tensor whose update is elementwise (torch's Adam, AdamW, SGD; FRUGAL's state-full AdamW part,
see ``FRUGAL.elementwise``) and whose float32 copy exceeds ``chunk_bytes`` is stepped in slices of
rows instead: each slice's weight, gradient and moments are copied to float32, stepped by the
optimizer's own math, and written back, so the float32 copies of a 32000 x 4096 embedding (2.1 GB
with its moments) shrink to ``chunk_bytes`` each. Elementwise math on a slice is the same math
(tested bitwise with round-to-nearest); per-tensor scalars such as ``step`` advance once.
``state_dtype=torch.bfloat16`` stores the Adam moments (``exp_avg``, ``exp_avg_sq``) in bf16 between
steps (rounded to nearest; float32 during the step). The rounding noise comes from a generator
seeded by (seed, parameter index, the parameter's update count), and the count lives in the
optimizer state (``sr_count``), so runs and resumes are reproducible.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from typing import Any, cast

import torch

from leanlm.optim import state8
from leanlm.optim.quantized import dequantize, int8_storage, requantize_
from leanlm.optim.sharding import is_dtensor

ROUNDINGS = ("nearest", "stochastic")
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its PrecisionHooks


def hooks_of(optimizer: torch.optim.Optimizer) -> PrecisionHooks | None:
    """The ``PrecisionHooks`` attached to ``optimizer``, if any."""
    return _HOOKS.get(optimizer)


MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# state_dtype for blockwise 8-bit moments (leanlm.optim.state8): uint8 codes under the moment's own
# key, float32 block absmax under "<key>_absmax"
STATE_8BIT = torch.uint8
ABSMAX = "_absmax"


def _signed(key: str) -> bool:
    return key == "exp_avg"  # the second moment is never negative: the unsigned map


def moment_to_float(st: dict[str, Any], key: str) -> None:
    """The moment ``st[key]`` in float32 for a step, whatever it is stored in."""
    v = st.get(key)
    if not torch.is_tensor(v):
        return
    if v.dtype == STATE_8BIT:
        st[key] = state8.decode(v, st.pop(key + ABSMAX), _signed(key))
    elif v.is_floating_point() and v.dtype != torch.float32:
        st[key] = v.float()


def store_moment(st: dict[str, Any], key: str, dtype: torch.dtype) -> None:
    """Store the float moment ``st[key]`` in ``dtype`` between steps (``STATE_8BIT``: blockwise
    8-bit when its shape is big enough, else float32)."""
    v = st.get(key)
    if not torch.is_tensor(v) or not v.is_floating_point():
        return
    if dtype != STATE_8BIT:
        st[key] = v.to(dtype)
    elif state8.quantizable(v.shape) and not is_dtensor(v):
        st[key], st[key + ABSMAX] = state8.encode(v, _signed(key))
    else:
        st[key] = v.float()


# torch optimizers whose update of each element depends only on that element's state.
ELEMENTWISE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
CHUNK_BYTES = 64 << 20  # float32 bytes per slice of a chunked step (weight; as much again per moment)


def is_elementwise(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """Whether ``optimizer`` updates each element of ``p`` from that element alone (so ``p`` may be
    stepped a slice at a time). Optimizers declare it with an ``elementwise(p)`` method."""
    own = getattr(optimizer, "elementwise", None)
    if callable(own):
        return bool(own(p))
    return isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)


def chunk_rows(p: torch.Tensor, chunk_bytes: int) -> int:
    """Rows of ``p`` per slice of a chunked step; 0 when ``p`` is stepped whole."""
    if chunk_bytes <= 0 or p.ndim < 2 or p.numel() * 4 <= chunk_bytes:
        return 0
    return max(1, chunk_bytes // (4 * (p.numel() // p.shape[0])))


SR_CHUNK = 1 << 24  # elements rounded per slice: the noise is 64 MiB of int32 at most


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` into bf16 ``out``: up with probability equal to the dropped fraction,
    so E[out] = x. Adds uniform noise to the 16 bits bf16 drops, then truncates them; non-finite
    values pass through. Works ``SR_CHUNK`` elements at a time, in place on the noise, so a 45M
    element MLP weight costs one 64 MiB buffer rather than four copies of itself."""
    flat_x, flat_out = x.contiguous().view(-1), out.view(-1)
    for start in range(0, flat_x.numel(), SR_CHUNK):
        xs = flat_x[start : start + SR_CHUNK]
        noise = torch.randint(0, 1 << 16, xs.shape, dtype=torch.int32, device=x.device, generator=generator)
        rounded = noise.add_(xs.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)  # exact in bf16
        flat_out[start : start + SR_CHUNK].copy_(torch.where(torch.isfinite(xs), rounded, xs, out=rounded))
    return out


def _generator(seed: int, index: int | str, count: int, device: torch.device) -> torch.Generator:
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
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        self.optimizer, self.rounding, self.state_dtype, self.seed = optimizer, rounding, state_dtype, seed
        self.chunk_bytes = chunk_bytes
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, bf16 grad): stepped in slices
        self._inner = False  # inside a chunked step's own optimizer.step() calls
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(params)}
        self._low: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._loading: dict[str, Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
            optimizer.register_load_state_dict_pre_hook(self._before_load),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        _HOOKS[optimizer] = self

    def _before_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        self._loading = state_dict

    def _after_load(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo what ``load_state_dict`` casts to the bf16 weights' dtype: the moments come back in
        ``state_dtype`` from the saved values (float32 ones would otherwise be rounded to bf16) and
        the rounding count as the integer it was (bf16 holds integers exactly only up to 256), so a
        resume is exactly the uninterrupted run."""
        saved, self._loading = self._loading, None
        if saved is None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for idx, entry in saved["state"].items():
            if not isinstance(idx, int) or idx >= len(params):
                continue
            p, st = params[idx], optimizer.state[params[idx]]
            for key, value in entry.items():
                if not torch.is_tensor(value):
                    continue
                if key == "sr_count":
                    st[key] = value.to(dtype=torch.int64, copy=True)
                elif key.endswith(ABSMAX):
                    st[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                elif key in MOMENT_KEYS:
                    self._restore_moment(st, key, value, saved=entry, device=p.device)
            for key in MOMENT_KEYS:  # a block absmax stays only beside 8-bit codes
                if not (torch.is_tensor(st.get(key)) and st[key].dtype == STATE_8BIT):
                    st.pop(key + ABSMAX, None)

    def _restore_moment(
        self, st: dict[str, Any], key: str, value: torch.Tensor, *, saved: dict[str, Any], device: torch.device
    ) -> None:
        """A saved moment into this run's ``state_dtype``: 8-bit codes kept as saved or decoded
        (exactly) into a float dtype; a float one re-encoded in 8 bits (what the next step would
        store anyway) or cast; None: as saved (as the optimizer made it)."""
        if value.dtype == STATE_8BIT:
            if self.state_dtype == STATE_8BIT:
                st[key] = value.to(device=device, copy=True)
                return
            st.pop(key + ABSMAX, None)
            value = state8.decode(value, saved[key + ABSMAX].float(), _signed(key))
        elif not value.is_floating_point():
            return
        if self.state_dtype == STATE_8BIT:
            st[key] = value.to(device=device, dtype=torch.float32, copy=True)
            store_moment(st, key, STATE_8BIT)
        else:
            st[key] = value.to(device=device, dtype=self.state_dtype or value.dtype, copy=True)

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

    def _chunked(self, p: torch.Tensor) -> bool:
        return (
            (p.dtype == torch.bfloat16 or int8_storage(p) is not None)
            and p.device.type != "meta"
            and not is_dtensor(p)
            and chunk_rows(p, self.chunk_bytes) > 0
            and is_elementwise(self.optimizer, p)
        )

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._inner:
            return
        for p in self._stepped():
            grad = cast(torch.Tensor, p.grad)  # _stepped: only tensors with a gradient
            if self._chunked(p):  # hidden from this step; stepped slice by slice in _after
                self._deferred.append((p, grad))
                p.grad = None
                continue
            st = optimizer.state[p]
            for key in MOMENT_KEYS:  # compute in float32 whatever they are stored in
                moment_to_float(st, key)
            stored = int8_storage(p)
            if stored is not None:  # int8 weight: its float32 value from the codes
                self._low[id(p)] = (p.data, grad)
                p.data = dequantize(*stored) if p.device.type != "meta" else torch.empty_like(p, dtype=torch.float32)
                p.grad = grad.float()
            elif p.dtype == torch.bfloat16 and not is_dtensor(p):  # FSDP2 shards step in bf16 as before
                self._low[id(p)] = (p.data, grad)
                p.data = p.data.float()
                p.grad = grad.float()

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._inner:
            return
        for p in [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._low]:
            low, grad = self._low.pop(id(p))
            st = optimizer.state[p]
            int8 = int8_storage(p) is not None
            if (self.rounding == "stochastic" or int8) and p.device.type != "meta":  # meta: shapes only
                count = int(st.get("sr_count", 0))
                self._write(p, low, slice(None), p.data, count=count)
                st["sr_count"] = torch.tensor(count + 1, dtype=torch.int64)
            elif not int8:
                low.copy_(p.data)
            p.data, p.grad = low, grad
        if self.state_dtype is not None:
            for p in self._stepped():
                st = optimizer.state[p]
                for key in MOMENT_KEYS:
                    store_moment(st, key, self.state_dtype)
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            others = [p for p in self._stepped()]  # already stepped: hide their gradients meanwhile
            grads = [p.grad for p in others]
            for p in others:
                p.grad = None
            self._inner = True
            try:
                for p, grad in deferred:  # each leaves its gradient hidden, or the next would step it again
                    self._step_in_slices(p, grad)
            finally:
                self._inner = False
                for p, g in [*zip(others, grads, strict=True), *deferred]:
                    p.grad = g

    def _read(self, p: torch.Tensor, low: torch.Tensor, part: slice) -> torch.Tensor:
        """Rows ``part`` of ``p``'s stored value in float32 (bf16 ``low`` or its int8 codes)."""
        stored = int8_storage(p)
        if stored is None:
            return low[part].float()
        return dequantize(stored[0][part], stored[1][part])

    def _write(
        self, p: torch.Tensor, low: torch.Tensor, part: slice, x: torch.Tensor, *, count: int, piece: int = -1
    ) -> None:
        """Round float32 ``x``, the updated rows ``part`` of ``p``, back into its storage: bf16
        ``low`` (to nearest or stochastically) or its int8 codes (always stochastically); the
        noise is seeded by parameter, update count and slice."""
        index = self._index[id(p)] if piece < 0 else f"{self._index[id(p)]}.{piece}"
        stored = int8_storage(p)
        if stored is not None:
            generator = _generator(self.seed, index, count, p.device)
            requantize_(stored[0][part], stored[1][part], x, generator)
        elif self.rounding == "stochastic":
            stochastic_round_(low[part], x, _generator(self.seed, index, count, p.device))
        else:
            low[part].copy_(x)

    def _step_in_slices(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One update of ``p`` (bf16 or int8) by the optimizer, ``chunk_rows`` rows at a time in
        float32. The state before the step is restored before each slice (per-element tensors
        sliced, scalars such as ``step`` as they were), so every slice takes the same, single step.
        8-bit moments are decoded and encoded a slice at a time (slices start on a block)."""
        st = self.optimizer.state[p]
        count = int(st.pop("sr_count", 0))
        whole = {k: v for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape}
        absmax = {k: st[k] for k in list(st) if k.endswith(ABSMAX)}
        before = {
            k: v.clone() if torch.is_tensor(v) else v for k, v in st.items() if k not in whole and k not in absmax
        }
        had = set(whole)  # state that existed before this step (none on the first)
        after: dict[str, Any] = {}
        low, rows = p.data, self._slice_rows(p)
        cols = p.numel() // p.shape[0]
        try:
            for piece, start in enumerate(range(0, p.shape[0], rows)):
                part = slice(start, start + rows)
                end = min(start + rows, low.shape[0])  # (p.shape is the slice's inside the loop)
                blocks = slice(start * cols // state8.BLOCK, state8.blocks_of(end * cols))
                st.clear()
                st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in before.items()})
                st.update(
                    {k: self._slice_in(k, v, part, absmax=absmax, blocks=blocks) for k, v in whole.items() if k in had}
                )
                p.data, p.grad = self._read(p, low, part), grad[part].float()
                self.optimizer.step()
                for k, v in st.items():
                    if torch.is_tensor(v) and v.shape == p.data.shape:
                        self._slice_out(k, v, low, part=part, stored=(whole, absmax), blocks=blocks)
                    else:
                        after[k] = v
                self._write(p, low, part, p.data, count=count, piece=piece)
        finally:
            p.data, p.grad = low, None  # the caller gives the gradient back once every slice is done
        st.clear()
        st.update(after)
        st.update(whole)
        st.update(absmax)
        if self.rounding == "stochastic" or int8_storage(p) is not None:
            st["sr_count"] = torch.tensor(count + 1, dtype=torch.int64)

    def _slice_rows(self, p: torch.Tensor) -> int:
        """Rows per slice; with 8-bit moments a multiple that starts every slice on a block."""
        rows = chunk_rows(p, self.chunk_bytes)
        if self.state_dtype != STATE_8BIT:
            return rows
        align = state8.BLOCK // math.gcd(p.numel() // p.shape[0], state8.BLOCK)
        return max(align, rows // align * align)

    @staticmethod
    def _slice_in(
        k: str, v: torch.Tensor, part: slice, *, absmax: dict[str, torch.Tensor], blocks: slice
    ) -> torch.Tensor:
        """Rows ``part`` of the stored per-element state ``v`` in float32 (a view when it is float32)."""
        if v.dtype == STATE_8BIT:
            return state8.decode(v[part], absmax[k + ABSMAX][blocks], _signed(k))
        return v[part] if v.dtype == torch.float32 else v[part].float()

    def _slice_out(
        self,
        k: str,
        v: torch.Tensor,
        low: torch.Tensor,
        *,
        part: slice,
        stored: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
        blocks: slice,
    ) -> None:
        """Store a slice's updated per-element state ``v`` into the whole tensor (created on the
        first step in the stored dtype: ``state_dtype`` for the moments)."""
        whole, absmax = stored
        if k not in whole:  # created by this first step: the whole tensor, stored
            if self.state_dtype == STATE_8BIT and k in MOMENT_KEYS and state8.quantizable(low.shape):
                whole[k] = torch.zeros(low.shape, dtype=STATE_8BIT, device=low.device)
                absmax[k + ABSMAX] = torch.zeros(state8.blocks_of(low.numel()), device=low.device)
            else:
                float_state = self.state_dtype if self.state_dtype != STATE_8BIT else torch.float32
                dtype = float_state if (self.state_dtype and k in MOMENT_KEYS) else v.dtype
                whole[k] = torch.zeros(low.shape, dtype=dtype, device=low.device)
        if whole[k].dtype == STATE_8BIT:
            codes, am = state8.encode(v, _signed(k))
            whole[k][part].copy_(codes)
            absmax[k + ABSMAX][blocks].copy_(am)
        elif whole[k][part].data_ptr() != v.data_ptr():
            whole[k][part].copy_(v)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
