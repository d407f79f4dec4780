"""Peak memory of one training step with sample reweighting off vs on (and chunked vs one-piece loss).

Each configuration runs in its own process: build LLaMA-60m (vocab 32000), then one forward and
backward on a batch of 8 x 1024 tokens; the step's peak is the rise in peak resident memory
(``ru_maxrss``) over the process's peak before the step. CPU-only measurement; on a GPU the same
script reports ``torch.cuda.max_memory_allocated`` instead.

    python scripts/bench_reweight_memory.py --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(batch: int, seq: int, chunk: int, strategy: str) -> dict:
    import torch

    from leanlm.engine.config import load_config
    from leanlm.engine.model import LLaMA
    from leanlm.engine.step import batch_loss

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "llama_60m.yaml")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = LLaMA(cfg.model, 32000, seq).to(device)
    tokens = torch.randint(0, 32000, (batch, seq + 1), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with ctx:
        rows = model(tokens[:, :-1], targets=tokens[:, 1:], chunk_tokens=chunk)
    loss, _ = batch_loss(rows, None if strategy == "off" else strategy, 1.0)
    loss.backward()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "chunk": chunk,
        "reweight": strategy,
        "step_peak_mib": (peak - before) / 2**20,
        "wall_s": wall,
        "device": str(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--one", nargs=2, metavar=("CHUNK", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.batch, args.seq, int(args.one[0]), args.one[1])))
        return
    rows = []
    for chunk in (4096, 0):
        for strategy in ("off", "linupper"):
            cmd = [
                sys.executable,
                __file__,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--one",
                str(chunk),
                strategy,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"LLaMA-60m, vocab 32000, batch {args.batch} x {args.seq} tokens, one forward + backward "
        f"({rows[0]['device']})\n"
    )
    print("| loss computation | reweighting | step peak (MiB) | vs off | wall (s) |\n|---|---|---|---|---|")
    for i, r in enumerate(rows):
        base = rows[i - i % 2]["step_peak_mib"]
        label = f"chunked, {r['chunk']} tokens/chunk" if r["chunk"] else "one piece (chunk_tokens=0)"
        print(
            f"| {label} | {r['reweight']} | {r['step_peak_mib']:,.0f} | {r['step_peak_mib'] / base:.3f} | "
            f"{r['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
