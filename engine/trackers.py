"""Experiment trackers beside TensorBoard and metrics.jsonl (which stay the record): trackio
(local-first) and Weights & Biases (``WANDB_MODE=offline`` works without a network), optional
extras imported only when ``log.trackers`` names them. Main rank only; the same scalars as
metrics.jsonl and the run's config. Each tracker's run id is kept in the checkpoints' train state,
so a resume logs into the same tracker run."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from leanlm.engine.config import RunConfig
from leanlm.engine.errors import ConfigError

TRACKERS = ("trackio", "wandb")
EXTRA = {"trackio": "pip install trackio", "wandb": "pip install wandb"}


class Tracker:
    name = ""
    run_id = ""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.run_id = run_id or uuid.uuid4().hex[:8]  # wandb run ids: 8 characters [a-z0-9]
        self.run = wandb.init(
            project=cfg.log.tracker_project,
            name=run_dir.resolve().name,
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            config=cfg.to_dict(),
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str | None) -> None:
        import trackio

        self.trackio = trackio
        self.run_id = run_id or f"{run_dir.resolve().name}"
        self.run = trackio.init(
            project=cfg.log.tracker_project,
            name=self.run_id,
            config=cfg.to_dict(),
            resume="allow" if run_id else "never",
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def finish(self) -> None:
        self.run.finish()


def open_trackers(cfg: RunConfig, run_dir: Path, ids: dict[str, str]) -> list[Tracker]:
    """The trackers ``log.trackers`` names, continuing the runs in ``ids`` (from a checkpoint)."""
    out: list[Tracker] = []
    for name in cfg.log.trackers:
        cls: Any = {"wandb": WandbTracker, "trackio": TrackioTracker}[name]
        try:
            out.append(cls(cfg, run_dir, ids.get(name)))
        except ImportError:
            raise ConfigError(f"log.trackers names {name}, which is not installed: {EXTRA[name]}") from None
    return out


def check_installed(names: list[str]) -> None:
    """Before any work: each named tracker's package imports (one line naming the fix otherwise)."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log.trackers names {name}, which is not installed: {EXTRA[name]}")
