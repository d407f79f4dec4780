"""Scaling-law records: one row per evaluation in ``<run>/scaling.jsonl``, ColPret-compatible.

Rows carry the IBM/ColPret columns (``model_name, model_type, scaled_set, tokens_seen, flops,
num_params, data, checkpoint, loss_cols, original_paper, seed, epochs, arch``) plus ours (step,
val_loss, train_loss, lr, optimizer, density, LOST rank/density, non-embedding parameters, wall
time, tokens/s). Losses are in nats and only ``val_loss`` is listed in ``loss_cols``; metadata
names avoid the substrings ColPret uses to detect metric columns (loss, acc, ppl, perp).

``flops`` holds the exact training FLOPs (6 x matmul parameters + attention, per token, as in the
Chinchilla paper's appendix F, times tokens seen); ``flops_6nd`` holds 6·N·D.

The fitter lives in ``leanlm.engine.scaling.fitter``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanlm.engine import __version__
from leanlm.engine.config import RunConfig
from leanlm.engine.errors import DataError
from leanlm.engine.run_files import append_no_follow
from leanlm.engine.scaling.fitter import FitResult, absolute_relative_error, fit
from leanlm.optim.registry import REGISTRY

COLPRET_COLUMNS = (
    "model_name",
    "model_type",
    "scaled_set",
    "tokens_seen",
    "flops",
    "num_params",
    "data",
    "checkpoint",
    "loss_cols",
    "original_paper",
    "seed",
    "epochs",
    "arch",
)


@dataclass
class ScalingRecorder:
    """Appends rows to ``scaling.jsonl``; constant fields are fixed at construction."""

    path: Path
    static: dict[str, Any]  # model_name, scaled_set, num_params, ... (same for every row)
    flops_per_token: float
    train_tokens_per_epoch: int | None = None

    def record(
        self,
        *,
        step: int,
        tokens_seen: int,
        val_loss: float,
        train_loss: float | None,
        lr: float,
        wall_s: float,
        tokens_per_s: float,
        checkpoint: str = "",
        phase: str = "",
    ) -> dict[str, Any]:
        row = dict(self.static)
        row.update(
            tokens_seen=int(tokens_seen),
            flops=self.flops_per_token * tokens_seen,
            flops_6nd=6.0 * self.static["num_params"] * tokens_seen,
            checkpoint=checkpoint,
            epochs=tokens_seen / self.train_tokens_per_epoch if self.train_tokens_per_epoch else 1.0,
            step=step,
            val_loss=val_loss,
            train_loss=train_loss,
            lr=lr,
            wall_s=wall_s,
            tokens_per_s=tokens_per_s,
            phase=phase,
        )
        with append_no_follow(self.path) as fh:
            fh.write(json.dumps(row) + "\n")
        return row


def recorder_for(
    cfg: RunConfig,
    run_dir: Path,
    *,
    num_params: int,
    non_embedding_params: int,
    flops_per_token: float,
    train_sequences: int | None,
) -> ScalingRecorder:
    """The run's ``scaling.jsonl`` writer with its constant columns filled in."""
    o, lost = cfg.optim, cfg.model.lost
    projection, _ = REGISTRY[o.name].rule(dataclasses.asdict(o))  # None: AdamW splits nothing
    static = {
        "model_name": cfg.log.model_name or run_dir.resolve().name,
        "model_type": "leanlm-llama",
        "scaled_set": cfg.log.scaled_set or run_dir.resolve().parent.name,
        "num_params": num_params,
        "non_embedding_params": non_embedding_params,
        "data": cfg.data.source,
        "loss_cols": ["val_loss"],
        "original_paper": f"leanlm {__version__}",
        "seed": str(cfg.train.seed),
        "arch": "dec",
        "domain": "LM",
        "optimizer": o.name,
        "density": None if projection is None else o.density,
        "projection": projection,
        "lost_rank": lost.rank_for(cfg.model.d_model) if lost.enabled else None,
        "lost_density": lost.channel_density if lost.enabled else None,
        "seq_len": cfg.train.seq_len,
        "global_batch_tokens": cfg.train.tokens_per_step(),
        "flops_per_token": flops_per_token,
        "schedule": o.schedule,
    }
    per_epoch = (train_sequences or 0) * cfg.train.seq_len or None
    return ScalingRecorder(run_dir / "scaling.jsonl", static, flops_per_token, per_epoch)


def load_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Rows from run folders (their ``scaling.jsonl``), ``.jsonl`` files, or ColPret-style CSVs."""
    rows: list[dict[str, Any]] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            p = p / "scaling.jsonl"
        if not p.is_file():
            raise DataError(f"{spec}: no scaling.jsonl here (train with eval.every > 0) and not a file")
        if p.suffix == ".csv":
            with open(p, newline="") as fh:
                for r in csv.DictReader(fh):
                    rows.append(_from_csv(r, p))
        else:
            rows += _jsonl_rows(p)
    if not rows:
        raise DataError(f"no scaling records in {', '.join(map(str, paths))}")
    # A resumed run re-records the evaluations it repeats: keep the newest row per (run, step).
    latest = {(r.get("model_name"), r.get("step", i)): r for i, r in enumerate(rows)}
    return list(latest.values())


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of ``path``; a torn line (a crash mid-append) or any other line that
    is not a JSON object is skipped with a warning, as ``metrics.jsonl`` readers do."""
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} line(s) that are not JSON records (line {', '.join(map(str, bad[:5]))})",
            stacklevel=3,
        )
    return rows


def _from_csv(r: dict[str, str], path: Path) -> dict[str, Any]:
    cols = r.get("loss_cols") or "('val_loss',)"
    names = [c.strip(" '\"") for c in cols.strip("()[]").split(",") if c.strip(" '\"")]
    try:
        loss = float(np.mean([float(r[c]) for c in names]))
        return {
            **r,
            "num_params": float(r["num_params"]),
            "tokens_seen": float(r["tokens_seen"]),
            "val_loss": loss,
        }
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: needs num_params, tokens_seen and the loss columns {names} ({e})") from None


def trajectory_points(
    rows: list[dict[str, Any]], drop_fraction: float = 0.1, all_points: bool = False
) -> tuple[np.ndarray, ...]:
    """(N, D, L, run ids) from checkpoint records, dropping each run's checkpoints before
    ``drop_fraction`` of its final tokens (the Hitchhiker's Guide's advice: early checkpoints
    mislead the fit). Rows of WSD runs count only once cooled down (their lr decayed: the
    compute-optimal point of that length), unless ``all_points``."""
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("val_loss") is None:
            continue
        if not all_points and r.get("schedule") == "wsd" and r.get("phase") != "cooled":
            continue  # mid-run WSD points sit above the curve (their lr has not decayed)
        by_run.setdefault(str(r.get("model_name", "run")), []).append(r)
    N, D, L, G = [], [], [], []
    for name, rs in by_run.items():
        try:
            rs = [
                dict(
                    r,
                    num_params=float(r["num_params"]),
                    tokens_seen=float(r["tokens_seen"]),
                    val_loss=float(r["val_loss"]),
                )
                for r in rs
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"run {name}: a record lacks a numeric num_params, tokens_seen or val_loss ({e!r})"
            ) from None
        last = max(float(r["tokens_seen"]) for r in rs)
        for r in rs:
            if float(r["tokens_seen"]) >= drop_fraction * last:
                N.append(float(r["num_params"]))
                D.append(float(r["tokens_seen"]))
                L.append(float(r["val_loss"]))
                G.append(name)
    return np.array(N), np.array(D), np.array(L), np.array(G)


def export_colpret_csv(rows: list[dict[str, Any]], path: str | Path) -> int:
    """Write records as a ColPret CSV (``loss_cols`` as a tuple literal). Returns the row count."""
    extra = sorted({k for r in rows for k in r} - set(COLPRET_COLUMNS))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLPRET_COLUMNS, *extra])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "loss_cols": str(tuple(r.get("loss_cols") or ("val_loss",)))})
    return len(rows)


def holdout_are(
    rows: list[dict[str, Any]], last_fraction: float = 0.3, drop_fraction: float = 0.1, **fit_kwargs: Any
) -> tuple[FitResult, float, int]:
    """Fit on every model but the largest; ARE on the largest's last ``last_fraction`` of checkpoints."""
    N, D, L, _ = trajectory_points(rows, drop_fraction=0.0)
    target = N.max()
    tgt = N == target
    last = D[tgt].max()
    sel = tgt & (D >= (1 - last_fraction) * last)
    Nt, Dt, Lt, Gt = trajectory_points([r for r in rows if float(r["num_params"]) != target], drop_fraction)
    result = fit(Nt, Dt, Lt, groups=Gt, **fit_kwargs)
    return result, absolute_relative_error(result, N[sel], D[sel], L[sel]), int(sel.sum())


def plot_fit(result: FitResult, N, D, L, *, path: str | Path) -> None:
    """Loss vs tokens per model size: data as points, the fitted law as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = np.unique(N)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for n, c in zip(sizes, colors):
        m = N == n
        ax.scatter(D[m], L[m], s=10, color=c, label=f"N={n:.3g}")
        d = np.geomspace(D[m].min(), D[m].max() * 2, 50)
        ax.plot(d, result.predict(np.full_like(d, n), d), color=c, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"L = {result.E:.3g} + {result.A:.3g}/N^{result.alpha:.3f} + {result.B:.3g}/D^{result.beta:.3f}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
