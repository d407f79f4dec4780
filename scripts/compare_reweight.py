"""Sample-reweighting strategies side by side at equal tokens: held-out loss curves and a table.

The same model, seed, data order and tokens for uniform (plain mean), linupper, quadratic and
extremes; reweighting starts after ``--warmup`` steps. Writes ``<out>/curves.png`` and prints a
Markdown table.

    python scripts/compare_reweight.py --steps 300 --out runs/compare_reweight
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanlm.engine.config import load_config
from leanlm.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=30, help="reweight warm-up steps")
    ap.add_argument("--r", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/compare_reweight")
    args = ap.parse_args()
    out = Path(args.out)
    curves = {}
    for strategy in STRATEGIES:
        run = out / strategy
        if not (run / "metrics.jsonl").exists() or not any(
            "val/loss" in line for line in (run / "metrics.jsonl").read_text().splitlines()[-3:]
        ):
            over = [
                f"train.steps={args.steps}",
                f"eval.every={args.eval_every}",
                f"optim.lr={args.lr}",
                f"train.reweight.strategy={strategy}",
                f"train.reweight.r={args.r}",
                f"train.reweight.warmup_steps={args.warmup}",
                f"train.out_dir={run}",
                "train.threads=2",
                "checkpoint.every=0",
                "checkpoint.keep=1",
                "log.progress=false",
            ]
            if run.exists():
                import shutil

                shutil.rmtree(run)
            train(load_config(ROOT / "configs" / "tiny.yaml", over))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves[strategy] = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    print(f"{args.steps} steps x 16 x 256 tokens, lr {args.lr}, r {args.r}, warm-up {args.warmup} steps\n")
    steps = [s for s, _ in curves["uniform"]]
    print("| strategy | " + " | ".join(f"step {s}" for s in steps) + " | final vs uniform |")
    print("|---|" + "---|" * (len(steps) + 1))
    base = curves["uniform"][-1][1]
    for strategy, pts in curves.items():
        vals = " | ".join(f"{v:.4f}" for _, v in pts)
        print(f"| {strategy} | {vals} | {(pts[-1][1] / base - 1) * 100:+.2f}% |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, pts in curves.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=strategy)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"Sample reweighting, tiny LLaMA on the stdlib corpus (r={args.r})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    print(f"\nplot: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
