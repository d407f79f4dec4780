"""Document masking for packed rows: a token attends only to earlier tokens of its own document.

Rows are packed ``[BOS] doc [EOS] [BOS] doc ...``; a document starts at each BOS (or, for a
tokenizer without BOS, right after each EOS). Within a row, doc id = the running count of starts;
the row's leading partial document gets id 0 and attends to itself only. RoPE is relative, so
positions stay absolute (a document at offset 300 computes what it computes at 0).

The mask is built once per forward, outside the layer loop, and handed to every block (activation
checkpointing recomputes attention with it, never rebuilds it). On CPU it is a boolean (B, 1, T, T)
mask for SDPA (True = may attend; ``flex_attention`` cannot run backward on CPU); on CUDA a
``BlockMask`` for a compiled ``flex_attention`` when torch has it (>= 2.5), else the same SDPA mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DocumentBoundary:
    """Where documents start: at ``token`` (a BOS) or, with ``after``, right after it (an EOS)."""

    token: int
    after: bool = False

    @staticmethod
    def of(bos_id: int, eos_id: int) -> DocumentBoundary:
        """The boundary of a tokenizer: its BOS, else its EOS (documents framed by EOS alone)."""
        if bos_id >= 0:
            return DocumentBoundary(bos_id)
        if eos_id >= 0:
            return DocumentBoundary(eos_id, after=True)
        raise ValueError("model.doc_masking needs a tokenizer with a BOS or an EOS token to find documents")


def document_ids(tokens: torch.Tensor, boundary: DocumentBoundary) -> torch.Tensor:
    """tokens (B, T) -> doc id of each position (B, T), int32: the count of starts up to it."""
    starts = tokens == boundary.token
    if boundary.after:  # a document starts on the token after an EOS
        starts = torch.cat([torch.zeros_like(starts[:, :1]), starts[:, :-1]], dim=1)
    return starts.cumsum(dim=1, dtype=torch.int32)


@dataclass
class AttentionMask:
    """What every block's attention takes for one forward: None fields mean plain causal."""

    dense: torch.Tensor | None = None  # (B, 1, T, T) bool for SDPA
    block: Any = None  # a flex_attention BlockMask (CUDA)


def build_mask(tokens: torch.Tensor, boundary: DocumentBoundary) -> AttentionMask:
    """The block-causal mask of ``tokens`` (B, T), in the form the device's path takes."""
    doc = document_ids(tokens, boundary)  # (B, T)
    if tokens.device.type == "cuda" and _flex() is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q, k):
            return (k <= q) & (doc[b, q] == doc[b, k])

        B, T = tokens.shape
        return AttentionMask(block=create_block_mask(same_document, B, None, T, T, device=tokens.device))
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    return AttentionMask(dense=((doc[:, :, None] == doc[:, None, :]) & causal)[:, None])  # (B, 1, T, T)


_FLEX: list[Any] = []


def _flex() -> Any:
    """``torch.compile(flex_attention)``, made once per process (None where torch lacks it)."""
    if not _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            _FLEX.append(torch.compile(flex_attention))
        except ImportError:  # torch 2.4
            _FLEX.append(None)
    return _FLEX[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None) -> torch.Tensor:
    """q, k, v: (B, H, T, hd) -> (B, H, T, hd); causal, within documents when ``mask`` is given."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask.block is not None:
        return _flex()(q, k, v, block_mask=mask.block)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
