"""The fitter on the public reference data in tests/data/scaling, with the full 4,500-start grid.

1. Chinchilla (Hoffmann et al. Fig. 4, 240 points after dropping the 5 highest losses): compare
   with Besiroglu et al.'s replication (objective 0.0010182740, A 477.84, B 2143.86, E 1.8172,
   α 0.34731, β 0.36718) and the tokens per parameter at the Gopher budget.
2. OPT checkpoint trajectories: fit sizes up to 30B, predict the 175B model's last 30% of
   checkpoints (ARE), for both methods and with/without dropping each run's first 10%.

    python scripts/fit_reference.py [--data tests/data/scaling]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np

from leanlm.engine.scaling import holdout_are
from leanlm.engine.scaling.fitter import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "scaling"))
    ap.add_argument("--grid", default="full", choices=["full", "small"])
    args = ap.parse_args()
    data = Path(args.data)
    with open(data / "chinchilla_hoffmann_fig4.csv") as fh:
        rows = list(csv.DictReader(fh))
    N = np.array([float(r["Model Size"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    D = np.array([float(r["Training FLOP"]) for r in rows]) / (6 * N)
    keep = L < np.sort(L)[-5]
    t0 = time.perf_counter()
    r = fit(N[keep], D[keep], L[keep], grid=args.grid)
    n_opt, d_opt = r.compute_optimal(5.76e23)
    print(f"## Chinchilla ({keep.sum()} points, {args.grid} grid, {time.perf_counter() - t0:.1f}s)\n{r.table()}")
    print(f"  compute-optimal at 5.76e23 FLOPs: N={n_opt:.4g}, D={d_opt:.4g}, D/N={d_opt / n_opt:.2f}\n")

    def size(s: str) -> float:
        return float(s[:-1]) * (1e9 if s[-1] in "bB" else 1e6)

    with open(data / "opt_checkpoint_trajectories.csv") as fh:
        opt = [
            {
                "model_name": "OPT-" + r["model_size"],
                "num_params": size(r["model_size"]),
                "tokens_seen": 10 ** float(r["num_token"]),
                "val_loss": math.log(float(r["ppl"])),
            }
            for r in csv.DictReader(fh)
        ]
    print("## OPT: fit on 125m-30b, predict the 175b model's last 30% of checkpoints (loss = ln ppl)\n")
    print("| method | early checkpoints | points | ARE | E | A | B | alpha | beta | bounds hit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in ("chinchilla", "colpret"):
        for drop in (0.1, 0.0):
            res, are, _ = holdout_are(opt, method=method, grid=args.grid, drop_fraction=drop)
            label = f"first {drop:.0%} of each run dropped" if drop else "all kept"
            print(
                f"| {method} | {label} | {res.n_points} | {are * 100:.2f}% | {res.E:.4g} | {res.A:.4g} | {res.B:.4g} | "
                f"{res.alpha:.4f} | {res.beta:.4f} | {', '.join(res.bounds_hit) or 'none'} |"
            )


if __name__ == "__main__":
    main()
