"""Tokens/s and peak memory of the optimizer step in backward against the plain step, same run.

    python scripts/bench_step_in_backward.py --config configs/tiny.yaml --steps 60
    python scripts/bench_step_in_backward.py --config configs/llama_60m.yaml --steps 20 train.batch_size=8

Each variant is one ``train()`` in its own process (so peak RSS is its own); tokens/s is the median
of the logged per-step throughput after the first 5 steps (warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, out: Path, over: list[str]) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    cmd = [sys.executable, "-m", "leanlm.engine.cli", "train", config, f"train.out_dir={out}", *over]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r and r["step"] > 5]
    return statistics.median(tps), max(r.get("mem/peak_gib", 0.0) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--optims", nargs="+", default=["adamw", "frugal"])
    ap.add_argument("--out", default="/tmp/bench_step_in_backward")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [
        f"train.steps={args.steps}",
        "log.every=1",
        "log.progress=false",
        "eval.every=0",
        "eval.tokens=512",
        "checkpoint.every=0",
        "train.grad_clip=0",
        *args.overrides,
    ]
    print(
        "| optimizer | plain tokens/s | in backward tokens/s | ratio | plain peak RSS GiB | in backward peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|")
    for optim in args.optims:
        res = {}
        for mode in ("false", "true"):
            out = Path(args.out) / f"{optim}-{mode}"
            res[mode] = measure(args.config, out, [*base, f"optim.name={optim}", f"optim.step_in_backward={mode}"])
        (tp, mp), (tb, mb) = res["false"], res["true"]
        print(f"| {optim} | {tp:,.0f} | {tb:,.0f} | {tb / tp:.3f} | {mp:.2f} | {mb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
