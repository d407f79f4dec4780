"""Optimizer-state bytes and step time: AdamW vs FRUGAL (every projection and rule) vs the peer packages.

On LLaMA-60m and -130m parameter shapes (vocab 32000), with fixed random gradients, one run,
side by side, as ratios to AdamW. Step time is the median over ``--steps`` steady-state steps (the
first step, which draws the subspaces or runs GaLore's SVDs, is reported separately as "refresh").

    python scripts/bench_optim.py --sizes 60m 130m --steps 10 --threads 2

The peers (``pip install --no-deps galore-torch apollo-torch fira bitsandbytes transformers``) are
optional: a package that does not import is skipped. ``--only fira apollo`` keeps the rows whose
name contains one of the words (AdamW, the baseline, is always kept).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from leanlm.engine.config import load_config
from leanlm.engine.model import LLaMA
from leanlm.optim import FRUGAL, apollo, apollo_mini, fira, frugal_param_groups, galore, state_bytes

ROOT = Path(__file__).resolve().parents[1]


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from optimizer state, including projector objects
    (galore-torch keeps a Python GaLoreProjector holding its basis)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def make_peer(model, density: float, module: str, cls: str, **extra):
    """A peer package's optimizer with its low-rank group holding the matrices FRUGAL splits."""
    try:
        optimizer = getattr(__import__(module), cls)
    except Exception:  # not installed, or a dependency missing: skip the row
        return None
    proj, rest = frugal_param_groups(model)
    extra.setdefault("rank", round(density * model.cfg.d_model))  # = round(ρ·min(m, n)) for LLaMA matrices
    groups = [{"params": rest["params"]}, {"params": proj["params"], "update_proj_gap": 200, **extra}]
    return optimizer(groups, lr=1e-3, weight_decay=0.0)


PEERS = {
    "galore-torch GaLoreAdamW": ("galore_torch", "GaLoreAdamW", dict(scale=0.25, proj_type="std")),
    "fira (package) FiraAdamW": ("fira", "FiraAdamW", dict(alpha=1.0, proj_type="std")),
    "apollo-torch APOLLOAdamW": (
        "apollo_torch",
        "APOLLOAdamW",
        dict(proj="random", scale_type="channel", scale=1.0, proj_type="std"),
    ),
    "apollo-torch APOLLO-Mini": (
        "apollo_torch",
        "APOLLOAdamW",
        dict(rank=1, proj="random", scale_type="tensor", scale=128.0, proj_type="std"),
    ),
}


def optimizers(model, density: float):
    named = list(model.named_parameters())
    yield (
        "AdamW (torch, foreach)",
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True),
    )
    for proj in ("columns", "rows", "randk", "blocks", "svd", "random"):
        yield f"FRUGAL {proj}", FRUGAL(named, lr=1e-3, density=density, projection=proj)
    yield "FRUGAL ρ=0 (sign only)", FRUGAL(named, lr=1e-3, density=0.0)
    yield "GaLore mode (FRUGAL svd, no state-free)", galore(named, lr=1e-3, density=density)
    yield "FRUGAL fira (columns)", FRUGAL(named, lr=1e-3, density=density, state_free="fira")
    yield "Fira preset (FRUGAL svd + fira)", fira(named, lr=1e-3, density=density)
    yield "APOLLO preset (FRUGAL gaussian + apollo)", apollo(named, lr=1e-3, density=density)
    yield "APOLLO-Mini preset", apollo_mini(named, lr=1e-3)
    for name, (module, cls, extra) in PEERS.items():
        opt = make_peer(model, density, module, cls, **extra)
        if opt is not None:
            yield name, opt


def bench(size: str, steps: int, density: float, only: list[str]) -> list[tuple[str, int, float, float]]:
    cfg = load_config(ROOT / "configs" / f"llama_{size}.yaml")
    torch.manual_seed(0)
    model = LLaMA(cfg.model, 32000, cfg.train.seq_len)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]
    rows = []
    for name, opt in optimizers(model, density):
        if only and rows and not any(w.lower() in name.lower() for w in only):
            continue
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        t0 = time.perf_counter()
        opt.step()
        refresh = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        nbytes = state_bytes(opt) if isinstance(opt, FRUGAL) else tensor_bytes(opt.state)
        rows.append((name, nbytes, statistics.median(times), refresh))
        del opt
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["60m", "130m"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=[], help="keep rows whose name contains one of these words")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, density {args.density}, "
        f"median of {args.steps} steps"
    )
    for size in args.sizes:
        rows = bench(size, args.steps, args.density, args.only)
        base_bytes, base_time = rows[0][1], rows[0][2]
        print(f"\n### LLaMA-{size}\n")
        print("| optimizer | state (MiB) | vs AdamW | step (ms) | vs AdamW | refresh step (ms) |")
        print("|---|---|---|---|---|---|")
        for name, nbytes, t, refresh in rows:
            print(
                f"| {name} | {nbytes / 2**20:,.1f} | {nbytes / base_bytes:.3f} | {t * 1e3:,.1f} | "
                f"{t / base_time:.2f} | {refresh * 1e3:,.0f} |"
            )


if __name__ == "__main__":
    main()
