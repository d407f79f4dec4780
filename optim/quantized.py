"""Int8 weights that learn: a weight stored as int8 codes with float32 scales, trained through a
placeholder parameter that carries its gradient.

Storage (per quantized weight, shape (rows, cols)): ``codes`` int8 (rows, cols) in [-127, 127]
and ``scale`` float32 (rows, cols / group), symmetric: ``w = code * scale``. ``group`` is the
number of consecutive elements of a row that share a scale (``group == cols``: one scale per
output row, torchao's layout; 128: Q-APOLLO's granularity, finer where rows carry outliers).

Forward and backward dequantize one layer at a time (``Int8Linear``): nothing keeps a float copy
of the weight between matmuls. The optimizer sees an ordinary ``nn.Parameter`` of the weight's
shape (bf16, stride 0: two bytes for the whole tensor) that receives a dense bf16 gradient; during
the step ``PrecisionHooks`` swaps in the float32 dequantized weight, lets the optimizer update it
with its own math, and rounds the result back onto the grid with ``requantize_``:

- the scale is kept while the updated values fit it; a row or group whose values leave
  [-127, 127] grid steps (or whose scale is zero) is refitted to its new absmax, and only that one;
- the new code is ``code + delta / scale`` rounded stochastically (up with probability equal to
  the fraction), so a zero update leaves every code bit-identical and E[code] * scale equals the
  float32 result; the noise comes from the caller's generator, seeded by (seed, parameter index,
  update count), so runs and resumes are bitwise.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127
_OWNER = "_leanlm_int8"  # attribute of a placeholder parameter: (weak reference to its module, name)


def check_group(cols: int, group: int) -> int:
    """The group size for rows of ``cols`` elements (0: the whole row); a one-line error when
    ``group`` does not divide the row."""
    group = group or cols
    if group <= 0 or cols % group:
        raise ValueError(
            f"int8 group {group} must divide the row length {cols}; use 0 (one scale per row) or a divisor"
        )
    return group


def _grouped(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (rows, cols) -> (rows, cols / group, group), matching scale: (rows, cols / group)
    return x.reshape(*scale.shape, -1)


def fit_scale(x: torch.Tensor, group: int) -> torch.Tensor:
    """The absmax / 127 scale of each row group of float ``x`` (rows, cols): (rows, cols / group)."""
    rows, cols = x.shape
    return x.float().reshape(rows, cols // group, group).abs().amax(dim=-1).div_(INT8_MAX)


def quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 codes and float32 scales of ``x`` (rows, cols); used once, at init or
    when a float checkpoint is loaded into an int8 model (training rounds stochastically)."""
    scale = fit_scale(x, check_group(x.shape[1], group))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = _grouped(x.float(), scale).div(safe[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8).view(x.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` (rows, cols), computed in float32 and cast to ``dtype`` (so a bf16 weight is
    the nearest bf16 value of the float32 one, not a product of two rounded factors)."""
    w = _grouped(codes.float(), scale).mul_(scale[..., None]).view(codes.shape)
    return w if dtype == torch.float32 else w.to(dtype)


ROUND_CHUNK = 1 << 22  # elements requantized at once: a few float32 temporaries of 16 MiB each


@torch.no_grad()
def requantize_(
    codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Round float32 ``x`` (rows, cols), the updated weight, back into ``codes`` and ``scale`` in
    place, stochastically, ``ROUND_CHUNK`` elements of rows at a time. Returns the boolean
    (rows, cols / group) map of refitted scales.

    The new code is ``code + (x - code * scale) / scale``: exactly ``code`` when ``x`` is the
    dequantized weight itself, so a zero update changes nothing. Groups whose values leave the
    grid (or have no scale yet) get the scale ``absmax(x) / 127`` and are rounded afresh."""
    rows = max(1, ROUND_CHUNK // max(1, codes.shape[1]))
    refits = [
        _requantize_rows(codes[i : i + rows], scale[i : i + rows], x[i : i + rows], generator)
        for i in range(0, codes.shape[0], rows)
    ]
    return torch.cat(refits) if refits else torch.zeros_like(scale, dtype=torch.bool)


def _requantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    old = _grouped(codes.float(), scale)  # (rows, groups, group)
    xs = _grouped(x.float(), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    y = xs.sub(old * scale[..., None]).div_(safe).add_(old)  # the new value, in grid steps
    refit = (scale <= 0) | (y.abs().amax(dim=-1) > INT8_MAX)
    if bool(refit.any()):
        fresh = xs.abs().amax(dim=-1).div_(INT8_MAX)
        scale.copy_(torch.where(refit, fresh, scale))
        fresh_safe = torch.where(fresh > 0, fresh, torch.ones_like(fresh))[..., None]
        y = torch.where(refit[..., None], xs / fresh_safe, y)
    low = y.floor()
    # up with probability equal to the fraction: uniform noise on a 2^-24 grid (exact in float32)
    noise = torch.randint(0, 1 << 24, y.shape, generator=generator, device=y.device, dtype=torch.int32)
    up = noise.float().mul_(2.0**-24).lt_(y.sub_(low))
    codes.copy_(low.add_(up).clamp_(-INT8_MAX, INT8_MAX).view(codes.shape))
    return refit


class _Int8Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized from int8 in forward and again in backward: only ``x`` and
    the codes are saved, so no float copy of W outlives the matmul. The weight's gradient goes to
    the placeholder parameter (bf16, the weight's shape)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, holder: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor):
        # x: (..., cols), codes: (rows, cols) -> (..., rows)
        ctx.save_for_backward(x, codes, scale)
        ctx.holder_dtype = holder.dtype
        return F.linear(x, dequantize(codes, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, codes, scale = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize(codes, scale, grad.dtype)  # (..., cols)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)
            grad_w = (g2.T @ x2).to(ctx.holder_dtype)  # (rows, cols)
        return grad_x, grad_w, None, None


class _Dequantize(torch.autograd.Function):
    """The dequantized tensor as a differentiable function of the placeholder: its gradient is the
    placeholder's. For layers whose own kernels take the weight (LOST): the copy lives as long as
    those kernels keep it for backward (one block at a time under activation checkpointing)."""

    @staticmethod
    def forward(ctx: Any, holder: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.holder_dtype = holder.dtype
        return dequantize(codes, scale, holder.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad.to(ctx.holder_dtype), None, None


def placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of ``shape`` that holds one element (stride 0): the parameter the optimizer sees."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


class Int8Storage(nn.Module):
    """Base of modules whose 2-D parameters named in ``int8_names`` are stored as int8.

    Each such parameter ``name`` is a placeholder (bf16, no storage: the optimizer's handle and
    the gradient's home) beside the buffers ``name_codes`` int8 (rows, cols) and ``name_scale``
    float32 (rows, cols / group), which are what checkpoints hold. Loading a float ``name``
    quantizes it (an HF or bf16 source); ``.to(dtype)`` leaves codes and scales as they are."""

    int8_names: tuple[str, ...] = ()
    int8_group: int = 0

    def _make_int8(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        group = check_group(shape[1], self.int8_group)
        holder = nn.Parameter(placeholder(shape, dtype, device))
        setattr(holder, _OWNER, (weakref.ref(self), name))
        self._parameters[name] = holder
        self._buffers[name + "_codes"] = torch.zeros(shape, dtype=torch.int8, device=device)
        self._buffers[name + "_scale"] = torch.zeros(shape[0], shape[1] // group, dtype=torch.float32, device=device)

    def storage(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale) of the int8 parameter ``name``: the live buffers."""
        return self._buffers[name + "_codes"], self._buffers[name + "_scale"]  # type: ignore[return-value]

    def dequantized(self, dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
        return dequantize(*self.storage(name), dtype)

    def differentiable(self, name: str) -> torch.Tensor:
        """The dequantized ``name`` in the placeholder's dtype, with the gradient flowing to it."""
        return _Dequantize.apply(self._parameters[name], *self.storage(name))

    @torch.no_grad()
    def load_float_(self, w: torch.Tensor, name: str = "weight") -> None:
        """Quantize the float tensor ``w`` into the int8 parameter ``name`` (round to nearest)."""
        codes, scale = self.storage(name)
        new_codes, new_scale = quantize(w.to(codes.device), self.int8_group)
        codes.copy_(new_codes)
        scale.copy_(new_scale)

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Storage:
        """Moves follow ``fn``'s device; codes stay int8 and scales float32 whatever dtype ``fn``
        casts to, and placeholders stay placeholders (a plain ``.to`` would materialise them)."""
        holders = {n: self._parameters.pop(n) for n in self.int8_names}
        scales = {n: self._buffers.pop(n + "_scale") for n in self.int8_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, holder in holders.items():
                scale = scales[name]
                assert holder is not None and scale is not None
                self._parameters[name] = self._moved_holder(fn, name, holder)
                probe = fn(torch.empty(0, dtype=scale.dtype, device=scale.device))
                # a move (or to_empty) applies; a cast to another dtype does not
                self._buffers[name + "_scale"] = fn(scale) if probe.dtype == scale.dtype else scale.to(probe.device)
        return self

    def _moved_holder(self, fn: Any, name: str, holder: nn.Parameter) -> nn.Parameter:
        probe = fn(torch.empty(0, dtype=holder.dtype, device=holder.device))
        moved = placeholder(holder.shape, probe.dtype, probe.device)
        if holder.device.type == probe.device.type:
            holder.data = moved
            return holder
        fresh = nn.Parameter(moved, requires_grad=holder.requires_grad)  # meta -> a device: another kind
        setattr(fresh, _OWNER, (weakref.ref(self), name))
        return fresh

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.int8_names:  # the codes and scales are the weight
            destination.pop(prefix + name, None)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        keys = [n + suffix for n in self.int8_names for suffix in ("_codes", "_scale")]
        holders = {n: self._parameters.pop(n) for n in self.int8_names}
        hidden = {k: self._buffers.pop(k) for k in keys}  # the base class must not see these
        try:
            for name in self.int8_names:
                self._load_int8(
                    state_dict, prefix, name, hidden=hidden, assign=assign, problems=(missing_keys, error_msgs)
                )
            skip = {prefix + k for k in [*keys, *self.int8_names]}
            super()._load_from_state_dict(
                state_dict={k: v for k, v in state_dict.items() if k not in skip},
                prefix=prefix,
                local_metadata=local_metadata,
                strict=strict,
                missing_keys=missing_keys,
                unexpected_keys=unexpected_keys,
                error_msgs=error_msgs,
            )
        finally:
            self._parameters.update(holders)
            self._buffers.update(hidden)

    @torch.no_grad()
    def _load_int8(
        self, state: dict, prefix: str, name: str, *, hidden: dict, assign: bool, problems: tuple[list, list]
    ) -> None:
        """Fill the int8 parameter ``name``'s codes and scale (in ``hidden``) from ``state``: its
        saved codes and scale, or a float ``name`` quantized."""
        missing_keys, error_msgs = problems
        float_weight = state.get(prefix + name)
        if float_weight is not None:  # a float source: quantize it
            codes, scale = quantize(float_weight.to(hidden[name + "_codes"].device), self.int8_group)
            hidden[name + "_codes"].copy_(codes)
            hidden[name + "_scale"].copy_(scale)
            return
        for key in (name + "_codes", name + "_scale"):
            own = hidden[key]
            if prefix + key not in state:
                missing_keys.append(prefix + key)
                continue
            value = state[prefix + key]
            if value.shape != own.shape or value.dtype != own.dtype:
                error_msgs.append(f"{prefix + key}: {tuple(value.shape)} {value.dtype} vs {tuple(own.shape)}")
            elif assign:
                hidden[key] = value
            else:
                own.copy_(value)

    def to_float(self, dtype: torch.dtype) -> nn.Module:
        """The float module this one stands for, with the dequantized weights in ``dtype``."""
        raise NotImplementedError


class Int8Linear(Int8Storage):
    """``nn.Linear`` (no bias) whose weight is int8 codes and float32 scales (``Int8Storage``)."""

    int8_names = ("weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int8_group = check_group(in_features, group)
        self._make_int8("weight", (out_features, in_features), dtype, torch.device(device or "cpu"))

    @property
    def group(self) -> int:
        return self.int8_group

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 0, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """The int8 version of ``linear`` (its weight rounded to nearest; storage only on meta)."""
        if linear.bias is not None:
            raise ValueError("int8 weights: linear layers with a bias are not supported (LLaMA has none)")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group, dtype, w.device)
        if w.device.type != "meta":
            layer.load_float_(w.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self.weight, *self.storage("weight"))

    def to_float(self, dtype: torch.dtype) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.dequantized(dtype))
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group={self.group}"


def int8_storage(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, scale) behind the placeholder parameter ``p``, or None for an ordinary tensor."""
    owner = getattr(p, _OWNER, None)
    if owner is None:
        return None
    module, name = owner[0](), owner[1]
    return module.storage(name) if module is not None else None


def int8_modules(model: nn.Module) -> list[tuple[str, Int8Storage]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Storage)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_linears(model: nn.Module, names: list[str], group: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the ``nn.Linear`` modules named ``names`` in ``model`` by ``Int8Linear`` (each weight
    rounded to nearest once); returns how many."""
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        replace_module(model, name, Int8Linear.from_linear(linear, group, dtype))
    return len(names)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every int8 module in ``model`` by its float counterpart holding the dequantized
    weights in ``dtype`` (what an export writes); returns how many."""
    names = int8_modules(model)
    for name, q in names:
        replace_module(model, name, q.to_float(dtype))
    return len(names)


def int8_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights' codes and scales in ``model`` (meta tensors count by shape)."""
    total = 0
    for _, module in int8_modules(model):
        for name in module.int8_names:
            codes, scale = module.storage(name)
            total += codes.numel() + scale.numel() * 4
    return total


def dequantize_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict with every int8 tensor (``X_codes`` + ``X_scale``) replaced by the float ``X``
    in ``dtype``; other tensors as they are. What export and float runs read."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_scale") and key[: -len("_scale")] + "_codes" in state:
            continue
        if key.endswith("_codes") and value.dtype == torch.int8:
            base = key[: -len("_codes")]
            out[base] = dequantize(value, state[base + "_scale"], dtype)
        else:
            out[key] = value
    return out


def has_int8(state: dict[str, Any]) -> bool:
    """Whether a model state dict holds int8 weights."""
    return any(k.endswith("_codes") for k in state)
