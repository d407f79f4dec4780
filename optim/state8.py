"""8-bit optimizer moments: blockwise dynamic quantization (Dettmers et al. 2022, bitsandbytes'
format), in plain torch so it runs wherever the model does and checkpoints as ordinary tensors.

A moment tensor is cut into blocks of ``BLOCK`` consecutive elements (of the flattened tensor);
each block keeps its absmax in float32 and each element a uint8 index into a 256-entry "dynamic"
map of values in [-1, 1] (signed, for the first moment) or [0, 1] (unsigned, for the second):
seven decades from 1e-6 to 1, each split linearly, so small values keep their relative precision.
Encoding divides by the block's absmax and picks the nearest map entry. 8.125 bits per value.

Tensors with fewer than ``MIN_NUMEL`` elements stay float32, decided from the tensor's global
shape (never from a shard), as bitsandbytes does. Tested against bitsandbytes' own codec when it
is installed (tests/optim/test_state8.py).
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256
MIN_NUMEL = 4096
DECADES = 7  # the map spans 10^-6 .. 1


@functools.cache
def _dynamic_map_values(signed: bool) -> tuple[float, ...]:
    """The 256 map values, sorted: per decade 10^(d-6) (d = 0..6), the midpoints of an even split
    of [0.1, 1] into 2^d parts (signed, mirrored) or 2^(d+1) parts (unsigned); then 0 and 1."""
    values: list[float] = []
    for d in range(DECADES):
        parts = 2**d if signed else 2 ** (d + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (mids * 10.0 ** (d - (DECADES - 1))).tolist()  # scaled in float32
        if signed:
            values += (mids * -(10.0 ** (d - (DECADES - 1)))).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # the signed map has one spare code
    return tuple(sorted(values))


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry code book (float32, sorted ascending)."""
    return torch.tensor(_dynamic_map_values(signed), dtype=torch.float32, device=device)


def quantizable(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a moment of this (global) shape is stored in 8 bits."""
    return torch.Size(shape).numel() >= MIN_NUMEL


def blocks_of(numel: int) -> int:
    return -(-numel // BLOCK)


CHUNK = 1 << 22  # elements coded at once (a multiple of BLOCK): bounds the temporaries to ~64 MiB


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape, float) -> (uint8 codes of the same shape, float32 absmax per block)."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks_of(n), dtype=torch.float32, device=x.device)
    table = dynamic_map(signed, x.device)
    bounds = (table[1:] + table[:-1]) / 2  # nearest entry: bucketize against the midpoints
    for start in range(0, n, CHUNK):
        part = flat[start : start + CHUNK].float()
        pad = blocks_of(part.numel()) * BLOCK - part.numel()
        blocks = torch.nn.functional.pad(part, (0, pad)).view(-1, BLOCK)  # (blocks, BLOCK)
        peak = blocks.abs().amax(dim=1)
        absmax[start // BLOCK : start // BLOCK + peak.numel()] = peak
        blocks /= torch.where(peak > 0, peak, torch.ones_like(peak))[:, None]
        index = torch.bucketize(blocks, bounds, out_int32=True)
        codes[start : start + part.numel()] = index.view(-1)[: part.numel()]
    return codes.view(x.shape), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """(uint8 codes, absmax per block) -> float32 tensor of the codes' shape."""
    flat = codes.reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    table = dynamic_map(signed, codes.device)
    for start in range(0, n, CHUNK):
        part = table[flat[start : start + CHUNK].int()]
        pad = blocks_of(part.numel()) * BLOCK - part.numel()
        peak = absmax[start // BLOCK : start // BLOCK + blocks_of(part.numel())]
        values = torch.nn.functional.pad(part, (0, pad)).view(-1, BLOCK).mul_(peak[:, None])
        out[start : start + part.numel()] = values.view(-1)[: part.numel()]
    return out.view(codes.shape)
