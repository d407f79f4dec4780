"""Data path throughput on this machine: `leanlm tokenize` (MB of text per second, 1 and N worker
processes) and the shard loader (tokens per second delivered to the step by ``PackedTokens`` at
the LLaMA-60m recipe's batch of 512 x 256 tokens), next to the 60m model's own training speed.

    .venv/bin/python scripts/bench_data.py [--source stdlib] [--workers 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from leanlm.engine.config import load_config
from leanlm.engine.data import build_corpus
from leanlm.engine.data.tokenize import tokenize_source
from leanlm.engine.model import LLaMA

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        first = work / "w1"
        tok = None
        for workers in (1, args.workers):
            out = work / f"w{workers}"
            meta = tokenize_source(
                args.source,
                out,
                tokenizer=str(tok or ""),
                vocab_size=32000 if tok is None else 0,
                workers=workers,
                unit_bytes=4_000_000,
            )
            tok = tok or first
            mb = meta["text_bytes_tokenized"] / 1e6
            print(
                f"tokenize, {workers} worker(s): {mb:.1f} MB of text in {meta['seconds']:.1f}s = "
                f"{mb / meta['seconds']:.2f} MB/s ({mb / meta['seconds'] / workers:.2f} MB/s per worker), "
                f"{meta['tokens']['train']:,} train tokens, {len(meta['shards'])} shards"
            )
        cfg = load_config(ROOT / "configs" / "llama_60m.yaml", [f"data.source=tokens:{first}", "data.vocab_size=32000"])
        corpus = build_corpus(cfg)
        stream = corpus.train
        t = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += sum(b.numel() for b in stream.next_step())
        rate = n / (time.perf_counter() - t)
        print(
            f"loader: {rate:,.0f} tokens/s (batch {cfg.train.batch_size} x {cfg.train.seq_len + 1}, {args.steps} steps)"
        )
        torch.manual_seed(0)
        model = LLaMA(cfg.model, corpus.tokenizer.vocab_size, cfg.train.seq_len)
        x = stream.next_step()[0][:8]
        times = []
        for i in range(3):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x[:, :-1], targets=x[:, 1:]).mean().backward()
            if i:
                times.append(time.perf_counter() - t)
        train_rate = x[:, :-1].numel() / min(times)
        print(
            f"LLaMA-60m forward + backward on this CPU: {train_rate:,.0f} tokens/s; loader / training = "
            f"{rate / train_rate:,.0f}x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
