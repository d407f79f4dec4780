"""Int8 weights and 8-bit moments, side by side: float32 weights, bf16 + stochastic rounding, int8 +
stochastic rounding (one scale per row, and per group of 128), and bf16 with 8-bit moments. Same
model, tokens and data order; each variant at its best learning rate of a sweep, then again with
more seeds at that learning rate.

    python scripts/compare_int8.py --out runs/compare_int8                    # tiny, ~1 h on 2 cores
    python scripts/compare_int8.py --out runs/cmp_wide --preset tiny --lrs 1.5e-3 3e-3 6e-3 \\
        model.d_model=384 model.n_heads=6 model.n_layers=6 model.ffn_dim=1024

Every run is cached as JSON under --out (rerunning skips finished ones). Prints a Markdown table:
held-out loss per lr at seed 0 (a best lr at the sweep's edge adds the next lr past it), the
best lr, the loss at each seed there, the mean, and the gap to
the reference (int8 weights against bf16; 8-bit moments against float32 moments). Variants keep
float32 moments unless they test the moments, so each comparison changes one thing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from leanlm.engine.config import load_config
from leanlm.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# label -> (overrides, the label it is compared against)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "fp32 weights": (["train.param_dtype=fp32"], ""),
    "bf16 + SR": (["train.param_dtype=bf16", "optim.state_dtype=fp32"], "fp32 weights"),
    "int8 row + SR": (["train.param_dtype=int8", "train.int8_group=0", "optim.state_dtype=fp32"], "bf16 + SR"),
    "int8 g128 + SR": (["train.param_dtype=int8", "train.int8_group=128", "optim.state_dtype=fp32"], "bf16 + SR"),
    "bf16 + SR, 8-bit moments": (["train.param_dtype=bf16", "optim.state_dtype=int8"], "bf16 + SR"),
}


def run_one(args: argparse.Namespace, label: str, lr: float, seed: int) -> dict:
    """One training run (cached): held-out loss at the end and the curve."""
    name = f"{label}_lr{lr:g}_s{seed}".replace(" ", "_").replace(",", "").replace("+", "p")
    cache = Path(args.out) / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    if args.cached:  # report only: a run not made yet counts as missing
        return {"label": label, "lr": lr, "seed": seed, "loss": float("nan")}
    run = Path(args.out) / name
    shutil.rmtree(run, ignore_errors=True)  # an interrupted attempt: start it again
    over = [
        f"train.steps={args.steps}",
        f"optim.name={args.optim}",
        f"optim.lr={lr}",
        f"train.seed={seed}",
        f"train.out_dir={run}",
        "log.progress=false",
        "checkpoint.every=0",
        f"eval.every={args.steps // 3}",
        *VARIANTS[label][0],
        *args.overrides,
    ]
    t0 = time.perf_counter()
    res = train(load_config(ROOT / "configs" / f"{args.preset}.yaml", over))
    curve = [
        (r["step"], round(r["val/loss"], 4))
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val/loss" in r
    ]
    out = {"label": label, "lr": lr, "seed": seed, "loss": res.final.loss, "wall_s": time.perf_counter() - t0}
    out["curve"] = curve
    cache.write_text(json.dumps(out))
    print(f"{label} lr {lr:g} seed {seed}: held-out loss {res.final.loss:.4f}; curve {curve}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    ap.add_argument("--seeds", type=int, default=2, help="seeds at each variant's best lr (the sweep uses seed 0)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="labels to run (default: all)")
    ap.add_argument("--out", default="runs/compare_int8")
    ap.add_argument("--cached", action="store_true", help="print the table from finished runs only")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    best: dict[str, tuple[float, list[dict], dict[float, float]]] = {}
    for label in args.variants:
        sweep = {lr: run_one(args, label, lr, 0)["loss"] for lr in args.lrs}
        sweep = {k: v for k, v in sweep.items() if v == v} or sweep  # (NaN: not run, with --cached)
        lr = min(sweep, key=lambda k: sweep[k])
        while lr in (min(sweep), max(sweep)) and len(sweep) < len(args.lrs) + 2:  # best at an edge: go past it
            nxt = lr / 2 if lr == min(sweep) else lr * 2
            loss = run_one(args, label, nxt, 0)["loss"]
            if loss != loss:  # not run (--cached)
                break
            sweep[nxt] = loss
            lr = min(sweep, key=lambda k: sweep[k])
        runs = [r for seed in range(args.seeds) if (r := run_one(args, label, lr, seed))["loss"] == r["loss"]]
        best[label] = (lr, runs, sweep)
    head = f"variant ({args.preset}, {args.optim}, {args.steps} steps)"
    print(f"\n| {head} | seed-0 loss (lr) | best lr | loss per seed | mean | vs reference |")
    print("|---|---|---|---|---|---|")
    mean = {k: sum(r["loss"] for r in runs) / len(runs) for k, (_, runs, _) in best.items() if runs}
    for label, (lr, runs, sweep) in best.items():
        if not runs:
            continue  # nothing finished yet (--cached)
        ref = VARIANTS[label][1]
        gap = f"{100 * (mean[label] / mean[ref] - 1):+.2f}% vs {ref}" if ref in mean else ""
        cells = " / ".join(f"{sweep[x]:.4f} ({x:g})" for x in sorted(sweep) if sweep[x] == sweep[x])
        seeds = " / ".join(f"{r['loss']:.4f}" for r in runs)
        print(f"| {label} | {cells} | {lr:g} | {seeds} | {mean[label]:.4f} | {gap} |")


if __name__ == "__main__":
    main()
