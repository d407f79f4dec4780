"""Pure-bf16 weights: float32 weights vs bf16 with round-to-nearest vs bf16 with stochastic
rounding (and bf16 vs float32 moments), same model, seed, data order and tokens.

    python scripts/compare_bf16.py --steps 300 --out runs/compare_bf16

Prints a Markdown table of held-out loss and perplexity at the end, and the loss at each
evaluation. The tiny preset (5.3M parameters, stdlib corpus) with AdamW by default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from leanlm.engine.config import load_config
from leanlm.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32 weights": ["train.param_dtype=fp32"],
    "bf16, round to nearest": ["train.param_dtype=bf16", "train.bf16_rounding=nearest"],
    "bf16, stochastic rounding": ["train.param_dtype=bf16", "train.bf16_rounding=stochastic"],
    "bf16, stochastic, fp32 moments": [
        "train.param_dtype=bf16",
        "train.bf16_rounding=stochastic",
        "optim.state_dtype=fp32",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/compare_bf16")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    rows = []
    for label, extra in VARIANTS.items():
        run = Path(args.out) / label.replace(" ", "_").replace(",", "")
        over = [
            f"train.steps={args.steps}",
            f"optim.name={args.optim}",
            f"optim.lr={args.lr}",
            f"train.out_dir={run}",
            "log.progress=false",
            "eval.every=50",
            *extra,
            *args.overrides,
        ]
        t0 = time.perf_counter()
        res = train(load_config(ROOT / "configs" / "tiny.yaml", over))
        curve = [
            (r["step"], round(r["val/loss"], 4))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/loss" in r
        ]
        rows.append((label, res.final.loss, res.final.ppl, time.perf_counter() - t0, curve))
        print(f"{label}: held-out loss {res.final.loss:.4f}; curve {curve}", flush=True)
    print(f"\n| weights ({args.optim}, lr {args.lr}, {args.steps} steps) | held-out loss | ppl | wall s |")
    print("|---|---|---|---|")
    for label, loss, ppl, wall, _ in rows:
        print(f"| {label} | {loss:.4f} | {ppl:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
