"""LOST layers with int8 factors: ``train.param_dtype=int8`` for a LOST model.

The low-rank factors A (n, r), B (r, m) and the channel-sparse values W_s (m, k) are stored as
int8 codes with one float32 scale per row (``leanlm.optim.quantized.Int8Storage``); the forward
dequantizes them to bf16 for LOST's kernels, which keep them for backward: one block's worth
under activation checkpointing (required with int8 LOST layers), the whole model's without.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlm.optim.lost import LOSTLinear
from leanlm.optim.quantized import Int8Storage, replace_module

FACTORS = ("lowrank_in", "lowrank_out", "sparse")


class Int8LOSTLinear(Int8Storage, LOSTLinear):
    """A ``LOSTLinear`` whose A, B and W_s are int8 codes + per-row float32 scales."""

    int8_names = FACTORS

    @classmethod
    def from_lost(cls, layer: LOSTLinear, dtype: torch.dtype = torch.bfloat16) -> Int8LOSTLinear:
        """The int8 version of ``layer`` (factors rounded to nearest; storage only on meta)."""
        if layer.support != "channels":
            raise ValueError("int8 LOST layers need model.lost.support=channels (random support is 1-D)")
        q = _shell(cls, layer, skip_buffers=set())
        for name in FACTORS:
            value = layer._parameters[name]
            assert value is not None
            q._make_int8(name, (value.shape[0], value.shape[1]), dtype, value.device)
            if value.device.type != "meta":
                q.load_float_(value.detach(), name)
        return q

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, s = (self.differentiable(name) for name in FACTORS)
        return a, b, s

    @property
    def dtype(self) -> torch.dtype:
        return self.lowrank_in.dtype

    def to_float(self, dtype: torch.dtype) -> LOSTLinear:
        """The plain ``LOSTLinear`` with the dequantized factors in ``dtype`` (what export writes)."""
        out = _shell(LOSTLinear, self, skip_buffers={n + suffix for n in FACTORS for suffix in ("_codes", "_scale")})
        for name in FACTORS:
            out._parameters[name] = nn.Parameter(self.dequantized(dtype, name))
        return out


def _shell(cls: type[LOSTLinear], src: LOSTLinear, *, skip_buffers: set[str]) -> Any:
    """A ``cls`` sharing ``src``'s settings, buffers (but ``skip_buffers``) and parameters other
    than the factors, which the caller adds in its own storage."""
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.__dict__.update({k: v for k, v in src.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    out._parameters.update({k: v for k, v in src._parameters.items() if k not in FACTORS})
    out._buffers.update({k: v for k, v in src._buffers.items() if k not in skip_buffers})
    out._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    return out


def quantize_lost(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``LOSTLinear`` in ``model`` by its ``Int8LOSTLinear``; returns how many."""
    names = [n for n, m in model.named_modules() if type(m) is LOSTLinear]
    for name in names:
        replace_module(model, name, Int8LOSTLinear.from_lost(model.get_submodule(name), dtype))  # type: ignore[arg-type]
    return len(names)
