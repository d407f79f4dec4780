"""Quality at equal tokens: AdamW vs FRUGAL (ρ 0.25 and ρ 0) vs GaLore-mode vs BAdam-mode.

Each optimizer is trained on the built-in corpus at each learning rate of its own small sweep
(three values, 3x apart), same model, same seed, same data order, same tokens; the table reports
each optimizer at its best learning rate (held-out loss on the fixed eval set) and flags a best
value at the edge of its grid.

    python scripts/compare_optim.py --steps 200 --out runs/compare_optim
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leanlm.engine.config import load_config
from leanlm.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]

# name -> (overrides, lr grid)
OPTIMIZERS = {
    "AdamW": (["optim.name=adamw"], [1e-3, 3e-3, 1e-2]),
    "FRUGAL ρ=0.25 (columns)": (
        ["optim.name=frugal", "optim.density=0.25", "optim.projection=columns"],
        [1e-3, 3e-3, 1e-2],
    ),
    "FRUGAL ρ=0.25 (blocks)": (
        ["optim.name=frugal", "optim.density=0.25", "optim.projection=blocks"],
        [1e-3, 3e-3, 1e-2],
    ),
    # ρ=0's best was the grid's lowest value, so its grid extends one step down
    "FRUGAL ρ=0": (["optim.name=frugal", "optim.density=0"], [3e-4, 1e-3, 3e-3, 1e-2]),
    "GaLore mode (ρ=0.25)": (["optim.name=galore", "optim.density=0.25"], [3e-3, 1e-2, 3e-2]),
    "BAdam mode (ρ=0.25)": (["optim.name=badam", "optim.density=0.25"], [1e-3, 3e-3, 1e-2]),
}

# Single-lr diagnostics (not part of the sweep): GaLore mode's best run has lr 1e-2 on embeddings,
# head and norms but 0.25 x 1e-2 on the block matrices (its scale). These give FRUGAL and AdamW
# (FRUGAL at density 1 is AdamW exactly) the same per-group learning rates.
DIAGNOSTICS = {
    "FRUGAL ρ=0.25, block lr x0.25": (
        ["optim.name=frugal", "optim.density=0.25", "optim.proj_lr_scale=0.25"],
        [1e-2],
    ),
    "AdamW, block lr x0.25 (FRUGAL ρ=1)": (
        ["optim.name=frugal", "optim.density=1.0", "optim.proj_lr_scale=0.25"],
        [1e-2],
    ),
    # FRUGAL with GaLore's SVD subspace for the Adam part (plus the sign step on the residual)
    "FRUGAL ρ=0.25 (svd)": (
        ["optim.name=frugal", "optim.density=0.25", "optim.projection=svd"],
        [3e-3, 1e-2],
    ),
    # a gentler state-free step (the paper's fine-tuning setting)
    "FRUGAL ρ=0.25, state-free lr x0.1": (
        ["optim.name=frugal", "optim.density=0.25", "optim.state_free_lr_scale=0.1"],
        [3e-3, 1e-2],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--update-gap", type=int, default=50, help="subspace refresh period (T)")
    ap.add_argument("--out", default="runs/compare_optim")
    ap.add_argument("--only", nargs="*", help="subset of optimizer names")
    ap.add_argument("--diagnostics", action="store_true", help="also run the single-lr DIAGNOSTICS")
    ap.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base = [
        f"train.steps={args.steps}",
        "train.batch_size=16",
        "train.seq_len=256",
        "train.threads=2",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "optim.weight_decay=0.0",
        "optim.betas=[0.9,0.999]",
        f"optim.update_gap={args.update_gap}",
        "eval.every=0",
        "eval.tokens=65536",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        "log.progress=false",
        "log.every=10",
    ]
    todo = {} if args.table else {**OPTIMIZERS, **(DIAGNOSTICS if args.diagnostics else {})}
    for name, (over, grid) in todo.items():
        if args.only and name not in args.only:
            continue
        for lr in grid:
            key = f"{name} lr={lr:g}"
            if key in results:
                continue
            run_dir = out / key.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace("ρ", "rho")
            cfg = load_config(
                ROOT / "configs" / "tiny.yaml",
                [*base, *over, f"optim.lr={lr}", f"train.out_dir={run_dir}"],
            )
            t0 = time.perf_counter()
            res = train(cfg)
            results[key] = {
                "optimizer": name,
                "lr": lr,
                "val_loss": res.final.loss,
                "val_ppl": res.final.ppl,
                "tokens": res.tokens_seen,
                "wall_s": time.perf_counter() - t0,
            }
            print(
                f"{key}: val loss {res.final.loss:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            results_path.write_text(json.dumps(results, indent=1))
    print(f"\ntorch {torch.__version__}; {args.steps} steps x 16 x 256 tokens; T={args.update_gap}\n")
    print("| optimizer | best lr | held-out loss | ppl | losses over the lr grid | vs AdamW |")
    print("|---|---|---|---|---|---|")
    best_adamw = min((r["val_loss"] for r in results.values() if r["optimizer"] == "AdamW"), default=None)
    for name, (_, grid) in {**OPTIMIZERS, **DIAGNOSTICS}.items():
        runs = sorted((r for r in results.values() if r["optimizer"] == name), key=lambda r: r["lr"])
        if not runs:
            continue
        best = min(runs, key=lambda r: r["val_loss"])
        edge = " (single lr)" if len(grid) == 1 else " (edge of grid)" if best["lr"] in (grid[0], grid[-1]) else ""
        sweep = ", ".join(f"{r['lr']:g}: {r['val_loss']:.3f}" for r in runs)
        rel = f"{(best['val_loss'] / best_adamw - 1) * 100:+.1f}%" if best_adamw else ""
        print(f"| {name} | {best['lr']:g}{edge} | {best['val_loss']:.4f} | {best['val_ppl']:.2f} | {sweep} | {rel} |")


if __name__ == "__main__":
    main()
