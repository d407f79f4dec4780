"""Tensor transforms between leanlm's state dict and a Hugging Face Llama's: names from
``mapping``, the per-head RoPE row permutation, tied weights. One tensor at a time, so a 7B model
is converted without a second copy of itself."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from leanlm.engine.config.schema import ModelConfig
from leanlm.engine.hf.mapping import hf_name, our_name, rotary_axis


def _heads(m: ModelConfig, proj: str) -> int:
    return m.n_heads if proj == "q_proj" else m.kv_heads()


def interleaved_to_halves(t: torch.Tensor, heads: int, axis: int) -> torch.Tensor:
    """Per head, reorder the ``axis`` entries [re0, im0, re1, im1, ...] as [re0, re1, ..., im0, im1, ...]."""
    x = t.movedim(axis, 0)  # (heads * hd, ...)
    hd = x.shape[0] // heads
    x = x.reshape(heads, hd // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(heads * hd, *x.shape[1:])
    return x.movedim(0, axis).contiguous()


def halves_to_interleaved(t: torch.Tensor, heads: int, axis: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_halves``."""
    x = t.movedim(axis, 0)
    hd = x.shape[0] // heads
    x = x.reshape(heads, 2, hd // 2, *x.shape[1:]).transpose(1, 2).reshape(heads * hd, *x.shape[1:])
    return x.movedim(0, axis).contiguous()


def to_hf(name: str, tensor: torch.Tensor, m: ModelConfig) -> tuple[str, torch.Tensor]:
    """One of our tensors -> (its HF name, the tensor in HF's layout; contiguous, own storage)."""
    rot = rotary_axis(name)
    if rot is not None:
        tensor = interleaved_to_halves(tensor, _heads(m, rot[0]), rot[1])
    return hf_name(name), tensor.contiguous()


def from_hf(name: str, tensor: torch.Tensor, m: ModelConfig) -> tuple[str, torch.Tensor] | None:
    """One HF tensor -> (our name, our layout), or None for what we derive (RoPE frequencies)."""
    ours = our_name(name)
    if ours is None:
        return None
    rot = rotary_axis(ours)
    if rot is not None:
        tensor = halves_to_interleaved(tensor, _heads(m, rot[0]), rot[1])
    return ours, tensor


def exported_tensors(model: torch.nn.Module, m: ModelConfig) -> Iterator[str]:
    """Our names of the tensors an export writes: every persistent tensor of the state dict, a tied
    head's weight once (as the embedding; HF's tied checkpoints have no lm_head.weight)."""
    state = model.state_dict(keep_vars=True)
    for name in state:
        if m.tie_embeddings and name == "lm_head.weight":
            continue
        yield name
