"""Dense vs LOST vs LOST + FRUGAL at equal tokens on the built-in corpus.

Reports held-out loss, parameters, optimizer-state bytes (measured) and the peak resident memory
of each training run (each run in its own process, so peaks do not mix).

    python scripts/compare_lost.py --steps 200 --out runs/compare_lost
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense + AdamW": [],
    "LOST + AdamW": ["model.lost.enabled=true", "model.lost.rank=64"],
    "LOST + FRUGAL ρ=0.25": [
        "model.lost.enabled=true",
        "model.lost.rank=64",
        "optim.name=frugal",
        "optim.density=0.25",
    ],
}


def run_one(name: str, over: list[str]) -> dict:
    import torch

    from leanlm.engine.build import build_model, make_optimizer
    from leanlm.engine.config import load_config
    from leanlm.engine.metrics import peak_memory_gib
    from leanlm.engine.model import count_parameters
    from leanlm.engine.trainer import train
    from leanlm.optim import state_bytes

    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    res = train(cfg)
    model = build_model(cfg, 4096, "meta")
    for p in model.parameters():
        p.grad = p.new_empty(p.shape)
    opt = make_optimizer(cfg, model.named_parameters())
    if cfg.optim.name == "adamw":
        optim_bytes = sum(8 * p.numel() for p in model.parameters())
    else:
        opt.step()
        optim_bytes = state_bytes(opt)
    return {
        "variant": name,
        "val_loss": res.final.loss,
        "val_ppl": res.final.ppl,
        "params": count_parameters(model),
        "optim_bytes": optim_bytes,
        "peak_rss_gib": peak_memory_gib(torch.device("cpu")),
        "tokens_per_s": res.tokens_per_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/compare_lost")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    base = [
        f"train.steps={args.steps}",
        f"optim.lr={args.lr}",
        "train.threads=2",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        "log.progress=false",
    ]
    if args.one:
        over = [
            *base,
            *VARIANTS[args.one],
            f"train.out_dir={Path(args.out) / args.one.replace(' ', '_').replace('+', '').replace('ρ=', 'rho')}",
        ]
        print(json.dumps(run_one(args.one, over)))
        return
    rows = []
    for name in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--steps",
            str(args.steps),
            "--lr",
            str(args.lr),
            "--out",
            args.out,
            "--one",
            name,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    print(f"\ntiny LLaMA (d 256, 4 layers, vocab 4096), {args.steps} steps x 16 x 256 tokens, lr {args.lr}\n")
    print("| variant | parameters | optimizer state (MiB) | peak RSS (GiB) | tokens/s | held-out loss | ppl |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['optim_bytes'] / 2**20:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |"
        )


if __name__ == "__main__":
    main()
