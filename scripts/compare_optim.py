"""Quality at equal tokens and equal memory: leanlm's optimizers and the peer packages, side by side.

Every optimizer trains the same model on the built-in corpus, same seed, same data order, same
tokens, at each learning rate of its own grid (three values, 3x apart; when the best value is at an
edge the grid is extended one step that way, twice at most, so no optimizer is judged at the edge
of its grid). The table reports each at its best learning rate (held-out loss on the fixed eval
set), with the optimizer state it held at the end of the run; ``--plot`` draws held-out loss vs step
for the best run of each (PNG under ``scripts/results/``).

Peers run their own code (optional installs, never leanlm dependencies):
``pip install --no-deps galore-torch apollo-torch fira bitsandbytes transformers``. Their low-rank
group holds the same matrices FRUGAL splits (linear weights inside the blocks), at rank
ρ·min(m, n) = 64 for ρ = 0.25; everything else gets their plain Adam. A peer that is not installed
is skipped with a note.

    python scripts/compare_optim.py --scale tiny  --out runs/compare_optim/tiny
    python scripts/compare_optim.py --scale large --out runs/compare_optim/large
    python scripts/compare_optim.py --scale tiny  --out runs/compare_optim/tiny --table --plot
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_optim import tensor_bytes  # scripts/ is on the path when run as a script

import leanlm.engine.build as build
from leanlm.engine.checkpoint.checkpointer import Checkpointer
from leanlm.engine.config import load_config
from leanlm.engine.trainer import train
from leanlm.optim import frugal_param_groups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"

# The two scales, at the same 819,200 tokens. tiny: the project's benchmark (4,096 tokens per
# step, 200 steps). large: 8x the batch (32,768 tokens per step, less gradient noise), 8x fewer
# steps; both see four subspaces (refreshes at 0, T, 2T, 3T).
SCALES = {
    "tiny": dict(steps=200, batch=16, update_gap=50),
    "large": dict(steps=25, batch=128, update_gap=7),
}
RANK_DENSITY = 0.25  # ρ: leanlm's density; the peers' rank is ρ·min(m, n)
LR3 = [1e-3, 3e-3, 1e-2]
LR3_HIGH = [3e-3, 1e-2, 3e-2]


def _peer_groups(named: list[tuple[str, torch.nn.Parameter]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The peers' convention: a plain group, and a group with ``rank`` holding the matrices FRUGAL splits."""
    split, plain = frugal_param_groups(named)
    return [{"params": plain["params"]}, {"params": split["params"], **extra}]


def _rank(named: list[tuple[str, torch.nn.Parameter]]) -> int:
    split, _ = frugal_param_groups(named)
    return round(RANK_DENSITY * min(min(p.shape) for p in split["params"]))


def _galore_torch(named, lr, betas, eps, update_gap):
    from galore_torch import GaLoreAdamW

    extra = dict(rank=_rank(named), update_proj_gap=update_gap, scale=0.25, proj_type="std")
    return GaLoreAdamW(_peer_groups(named, extra), lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def _apollo_torch(named, lr, betas, eps, update_gap):
    from apollo_torch import APOLLOAdamW

    extra = dict(
        rank=_rank(named), proj="random", scale_type="channel", scale=1.0, update_proj_gap=update_gap, proj_type="std"
    )
    return APOLLOAdamW(_peer_groups(named, extra), lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def _fira(named, lr, betas, eps, update_gap):
    from fira import FiraAdamW

    extra = dict(rank=_rank(named), update_proj_gap=update_gap, alpha=1.0, proj_type="std")
    return FiraAdamW(_peer_groups(named, extra), lr=lr, betas=betas, eps=eps, weight_decay=0.0)


PEERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore-torch": _galore_torch,
    "apollo-torch": _apollo_torch,
    "fira (package)": _fira,
}

_FRUGAL = ["optim.name=frugal", f"optim.density={RANK_DENSITY}"]
_GALORE_KEEP = ["optim.reset_on_refresh=false"]  # GaLore, Fira and APOLLO keep the moments across refreshes
# name -> (config overrides, lr grid); peers: overrides name the engine's AdamW, the optimizer is swapped in.
OPTIMIZERS: dict[str, tuple[list[str], list[float]]] = {
    "AdamW": (["optim.name=adamw"], LR3),
    # the official FRUGAL code's pretraining recipe: whole tensors (blocks, descending), signSGD elsewhere
    "FRUGAL sign (blocks, official recipe)": ([*_FRUGAL, "optim.projection=blocks"], LR3),
    "FRUGAL sign (columns)": ([*_FRUGAL, "optim.projection=columns"], LR3),
    "FRUGAL sign ×0.1 (columns)": ([*_FRUGAL, "optim.projection=columns", "optim.state_free_lr_scale=0.1"], LR3),
    "FRUGAL fira (columns)": ([*_FRUGAL, "optim.projection=columns", "optim.state_free=fira"], LR3_HIGH),
    "FRUGAL fira (svd)": ([*_FRUGAL, "optim.projection=svd", "optim.state_free=fira"], LR3_HIGH),
    # GaLore mode (svd, moments kept, low-rank step x0.25) plus Fira's scaled residual at the same x0.25
    "FRUGAL fira (svd, GaLore scale)": (
        [*_FRUGAL, "optim.projection=svd", "optim.state_free=fira", *_GALORE_KEEP, "optim.proj_lr_scale=0.25"],
        LR3_HIGH,
    ),
    "GaLore mode": (["optim.name=galore", f"optim.density={RANK_DENSITY}"], LR3_HIGH),
    "BAdam mode": (["optim.name=badam", f"optim.density={RANK_DENSITY}"], LR3),
    "APOLLO preset": (["optim.name=apollo", f"optim.density={RANK_DENSITY}"], LR3_HIGH),
    "APOLLO-Mini preset": (
        ["optim.name=apollo", "optim.rank=1", "optim.scaling=tensor", "optim.apollo_scale=128"],
        LR3_HIGH,
    ),
    "galore-torch": (["optim.name=adamw"], LR3_HIGH),
    "apollo-torch": (["optim.name=adamw"], LR3_HIGH),
    "fira (package)": (["optim.name=adamw"], LR3_HIGH),
}


def run_one(name: str, lr: float, scale: dict, out: Path) -> dict[str, Any]:
    over, _ = OPTIMIZERS[name]
    steps, batch, gap = scale["steps"], scale["batch"], scale["update_gap"]
    run_dir = out / f"{name}_lr{lr:g}".translate(str.maketrans({" ": "_", "(": "", ")": "", "×": "x", "ρ": "rho"}))
    base = [
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.seq_len=256",
        "train.threads=2",
        "train.precision=bf16",  # bf16 autocast, as on GPU; ~1.8x faster here (AMX)
        f"optim.warmup_steps={max(1, steps // 10)}",
        "optim.weight_decay=0.0",
        "optim.betas=[0.9,0.999]",
        f"optim.update_gap={gap}",
        f"eval.every={steps // 4}",
        "eval.tokens=65536",
        "checkpoint.every=0",
        "log.progress=false",
        "log.every=10",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*base, *over, f"optim.lr={lr}", f"train.out_dir={run_dir}"])
    made: list[torch.optim.Optimizer] = []
    plain_build = build.build_optimizer

    def capture(opt_name, named_params, **kwargs):  # keep the optimizer to measure its state; swap in a peer
        named = list(named_params)
        if name in PEERS:
            opt = PEERS[name](named, kwargs["lr"], tuple(kwargs["betas"]), kwargs["eps"], gap)
        else:
            opt = plain_build(opt_name, named, **kwargs)
        made.append(opt)
        return opt

    build.build_optimizer = capture
    saving = Checkpointer.due
    Checkpointer.due = lambda self, step, stopping: False  # no checkpoints: the peers' state holds objects
    t0 = time.perf_counter()
    try:
        res = train(cfg)
    finally:
        build.build_optimizer, Checkpointer.due = plain_build, saving
    curve = [
        (r["step"], r["val/loss"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "val/loss" in r
    ]
    return {
        "optimizer": name,
        "lr": lr,
        "val_loss": res.final.loss,
        "val_ppl": res.final.ppl,
        "tokens": res.tokens_seen,
        "state_bytes": tensor_bytes(made[0].state),
        "wall_s": time.perf_counter() - t0,
        "curve": curve,
    }


def _available(name: str) -> bool:
    if name not in PEERS:
        return True
    module = {"galore-torch": "galore_torch", "apollo-torch": "apollo_torch", "fira (package)": "fira"}[name]
    try:
        __import__(module)
        return True
    except Exception as e:  # any import failure means "not installed here"
        print(f"skipping {name}: {module} does not import ({type(e).__name__}: {e})")
        return False


def sweep(name: str, scale: dict, out: Path, results: dict, save: Callable[[], None], extend: int = 2) -> None:
    """The grid, then up to ``extend`` more values past an edge that holds the best loss."""
    grid = list(OPTIMIZERS[name][1])
    for _ in range(extend + 1):
        for lr in grid:
            key = f"{name} lr={lr:g}"
            if key not in results:
                results[key] = run_one(name, lr, scale, out)
                r = results[key]
                print(
                    f"{key}: val loss {r['val_loss']:.4f}, state {r['state_bytes']:,} B ({r['wall_s']:.0f}s)",
                    flush=True,
                )
                save()
        runs = [r for r in results.values() if r["optimizer"] == name]
        best = min(runs, key=lambda r: r["val_loss"])["lr"]
        lrs = sorted(r["lr"] for r in runs)
        if best == lrs[0]:
            grid = [lrs[0] / 3]
        elif best == lrs[-1]:
            grid = [lrs[-1] * 3]
        else:
            return


def table(results: dict, scale_name: str) -> str:
    scale = SCALES[scale_name]
    tokens = scale["steps"] * scale["batch"] * 256
    lines = [
        f"{scale_name}: {scale['steps']} steps x {scale['batch']} x 256 = {tokens:,} tokens; T={scale['update_gap']}; "
        f"torch {torch.__version__}",
        "",
        "| optimizer | best lr | held-out loss | ppl | vs AdamW | optimizer state | losses over the lr grid |",
        "|---|---|---|---|---|---|---|",
    ]
    best_adamw = min((r["val_loss"] for r in results.values() if r["optimizer"] == "AdamW"), default=None)
    for name in OPTIMIZERS:
        runs = sorted((r for r in results.values() if r["optimizer"] == name), key=lambda r: r["lr"])
        if not runs:
            continue
        best = min(runs, key=lambda r: r["val_loss"])
        edge = " (edge)" if len(runs) > 1 and best["lr"] in (runs[0]["lr"], runs[-1]["lr"]) else ""
        sweep_s = ", ".join(f"{r['lr']:g}: {r['val_loss']:.3f}" for r in runs)
        rel = f"{(best['val_loss'] / best_adamw - 1) * 100:+.1f}%" if best_adamw else ""
        state = f"{best['state_bytes'] / 2**20:.2f} MiB"
        cells = [
            name,
            f"{best['lr']:g}{edge}",
            f"{best['val_loss']:.4f}",
            f"{best['val_ppl']:.2f}",
            rel,
            state,
            sweep_s,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, scale_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(OPTIMIZERS):
        runs = [r for r in results.values() if r["optimizer"] == name]
        if not runs:
            continue
        best = min(runs, key=lambda r: r["val_loss"])
        steps, losses = zip(*best["curve"], strict=True)
        style = "--" if name in PEERS else "-"
        label = f"{name} (lr {best['lr']:g}): {best['val_loss']:.3f}"
        ax.plot(steps, losses, style, marker="o", ms=3, color=plt.cm.tab20(i % 20), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"compare_optim, {scale_name} scale, each at its best lr (dashed: peer packages)")
    low = min(r["val_loss"] for r in results.values())
    ax.set_ylim(low - 0.1, low + 2.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SCALES), default="tiny")
    ap.add_argument("--out", default=None, help="results folder (default runs/compare_optim/<scale>)")
    ap.add_argument("--only", nargs="*", help="subset of optimizer names")
    ap.add_argument("--table", action="store_true", help="only print the table of finished runs")
    ap.add_argument("--plot", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}/compare_optim_<scale>.png")
    args = ap.parse_args()
    out = Path(args.out or f"runs/compare_optim/{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    if not args.table:
        for name in OPTIMIZERS:
            if (not args.only or name in args.only) and _available(name):
                sweep(name, SCALES[args.scale], out, results, save)
    print(table(results, args.scale))
    if args.plot:
        plot(results, args.scale, RESULTS / f"compare_optim_{args.scale}.png")


if __name__ == "__main__":
    main()
