"""LOST layers with int8 factors: ``train.param_dtype=int8`` for a LOST model.

The low-rank factors A (n, r), B (r, m) and the channel-sparse values W_s (m, k) are stored as
int8 codes with one float32 scale per row (``leanlm.optim.quantized.Int8Storage``); the forward
dequantizes them to bf16 for LOST's kernels, which keep them for backward: one block's worth
under activation checkpointing (required with int8 LOST layers), the whole model's without.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.optim.lost import LOSTLinear
from leanlm.optim.quantized import Int8Storage

FACTORS = ("lowrank_in", "lowrank_out", "sparse")


class Int8LOSTLinear(Int8Storage, LOSTLinear):
    """A ``LOSTLinear`` whose A, B and W_s are int8 codes + per-row float32 scales."""

    int8_names = FACTORS

    @classmethod
    def from_lost(cls, layer: LOSTLinear, dtype: torch.dtype = torch.bfloat16) -> Int8LOSTLinear:
        """The int8 version of ``layer`` (factors rounded to nearest; storage only on meta)."""
        if layer.support != "channels":
            raise ValueError("int8 LOST layers need model.lost.support=channels (random support is 1-D)")
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        kept = {k: v for k, v in layer.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        q.__dict__.update(kept)
        q._parameters.update({k: v for k, v in layer._parameters.items() if k not in FACTORS})
        q._buffers.update(layer._buffers)
        q._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
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
        out = LOSTLinear.__new__(LOSTLinear)
        nn.Module.__init__(out)
        kept = {k: v for k, v in self.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        out.__dict__.update(kept)
        out._parameters.update({k: v for k, v in self._parameters.items() if k not in FACTORS})
        codes = {n + suffix for n in FACTORS for suffix in ("_codes", "_scale")}
        out._buffers.update({k: v for k, v in self._buffers.items() if k not in codes})
        for name in FACTORS:
            out._parameters[name] = nn.Parameter(self.dequantized(dtype, name))
        return out


def quantize_lost(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``LOSTLinear`` in ``model`` by its ``Int8LOSTLinear``; returns how many."""
    names = [n for n, m in model.named_modules() if type(m) is LOSTLinear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Int8LOSTLinear.from_lost(getattr(owner, child), dtype))
    return len(names)
