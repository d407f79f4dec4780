"""Held-out evaluation: mean token loss and perplexity on a fixed token set, plus a unigram baseline."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leanlm.engine import distributed as dist


@dataclass
class EvalResult:
    loss: float  # mean token cross-entropy (nats)
    ppl: float  # exp(loss)
    tokens: int  # targets scored


def eval_windows(val_tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """The fixed held-out set as non-overlapping windows: (n, seq_len + 1)."""
    n = (len(val_tokens) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(val_tokens, dtype=np.int64))[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    chunk_tokens: int = 4096,
) -> EvalResult:
    """Sum of token losses / number of tokens over the fixed set; windows are split across ranks."""
    was_training = model.training
    model.eval()
    every = eval_windows(val_tokens, seq_len)
    windows = every[dist.rank() :: dist.world_size()]
    # Every rank runs the same number of forwards (FSDP2 and ZeRO-3 gather weights collectively):
    # a rank out of windows runs a dummy one and counts nothing.
    per_rank = -(-len(every) // dist.world_size())
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, token count]
    for i in range(0, per_rank, batch_size):
        batch = windows[i : i + batch_size]
        real = len(batch) > 0
        batch = (batch if real else every[:1]).to(device)
        with autocast or contextlib.nullcontext():
            rows = model(batch[:, :-1], targets=batch[:, 1:], chunk_tokens=chunk_tokens)  # (b,) mean per row
        if real:
            sums[0] += rows.double().sum() * seq_len  # every target is valid in packed windows
            sums[1] += batch[:, 1:].numel()
    dist.all_reduce_sum(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1].clamp_min(1)).item()
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=int(sums[1].item()))


def unigram_loss(train_counts: np.ndarray, val_tokens: np.ndarray, seq_len: int) -> float:
    """Held-out loss of an add-one-smoothed unigram model fit on training counts, on the same targets."""
    targets = eval_windows(val_tokens, seq_len)[:, 1:].flatten().numpy()
    probs = (train_counts.astype(np.float64) + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[targets]).mean())
