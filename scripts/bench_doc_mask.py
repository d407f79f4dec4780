"""The cost of model.doc_masking on this machine: forward + backward of LLaMA-60m (configs/
llama_60m.yaml shape, vocabulary 32000) on packed rows with and without the block-causal mask
(SDPA + boolean mask on CPU), bf16 autocast, median of the timed repeats; the mask's build time
alone is reported too.

    .venv/bin/python scripts/bench_doc_mask.py [--seq 256 1024] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from leanlm.engine.config import load_config
from leanlm.engine.doc_mask import DocumentBoundary, build_mask
from leanlm.engine.model import LLaMA

ROOT = Path(__file__).resolve().parents[1]


def rows(batch: int, seq: int, doc_len: int) -> torch.Tensor:
    """Packed rows of documents of about ``doc_len`` tokens (BOS = 1 at each start)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32000, (batch, seq + 1), generator=gen)
    starts = torch.rand(batch, seq + 1, generator=gen) < 1.0 / doc_len
    return tokens.masked_fill(starts, 1)


def timed(model: LLaMA, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x[:, :-1], targets=x[:, 1:]).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--doc-len", type=int, default=200, help="mean document length in tokens")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "llama_60m.yaml", [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, docs ~{args.doc_len}")
    print("| seq_len | causal (s/step) | document-masked (s/step) | cost | mask build (ms) |")
    print("|---|---|---|---|---|")
    for seq in args.seq:
        x = rows(args.batch, seq, args.doc_len)
        out = {}
        for masked in (False, True):
            torch.manual_seed(0)
            model = LLaMA(dataclasses.replace(cfg.model, doc_masking=masked), 32000, seq)
            model.set_document_boundary(1, 2)
            out[masked] = timed(model, x, args.repeats)
        t = time.perf_counter()
        for _ in range(20):
            build_mask(x[:, :-1], DocumentBoundary.of(1, 2))
        build_ms = (time.perf_counter() - t) / 20 * 1e3
        cost = out[True] / out[False] - 1
        print(f"| {seq} | {out[False]:.3f} | {out[True]:.3f} | {cost * 100:+.1f}% | {build_ms:.2f} |")


if __name__ == "__main__":
    main()
