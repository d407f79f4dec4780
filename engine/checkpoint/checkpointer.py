"""What a run saves and when: the train state (step, tokens, schedule, data position, RNG) and the
checkpointer that owns the save cadence, the format per backend, resume lookup and pruning.

The files themselves are written by ``leanlm.engine.checkpoint`` (atomic folders, manifests) and
``leanlm.engine.checkpoint.sharded`` (DCP, DeepSpeed); what may change on resume is decided in
``leanlm.engine.checkpoint.resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanlm.engine import distributed as dist
from leanlm.engine.checkpoint import sharded, store
from leanlm.engine.checkpoint.resume import (
    check_resume_config,
    hyperparameters,
    load_state,
    resume_schedule,
    zero_stage_of,
)
from leanlm.engine.config import RunConfig
from leanlm.engine.errors import ConfigError


@dataclass
class TrainState:
    """The loop's position: everything besides weights and optimizer state that a resume restores."""

    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: Any  # the training stream (``leanlm.engine.data.TrainStream``)
    device: torch.device
    step: int = 0
    tokens_seen: int = 0
    trackers: dict[str, str] = field(default_factory=dict)  # tracker name -> its run id (log.trackers)

    def advance(self, tokens: int) -> None:
        """One optimizer step of ``tokens`` tokens (all ranks) is done."""
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tokens

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "trackers": dict(self.trackers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position. The schedule is the current config's, placed at the saved
        step (``leanlm.engine.checkpoint.resume.resume_schedule``), so lr changes take effect."""
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        resume_schedule(self.scheduler, self.step)
        self.data.load_state_dict(state["data"])
        self.trackers = dict(state.get("trackers") or {})
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint ``train.resume`` names (verified, config compatible), or None for a fresh
    start; a fresh start into a folder that holds checkpoints is refused."""
    run_dir, resume = Path(cfg.train.out_dir), cfg.train.resume
    path = store.resolve_resume(run_dir, resume)
    if path is None and store.list_checkpoints(run_dir) and resume != "auto":
        raise ConfigError(
            f"train.out_dir={cfg.train.out_dir!r} already holds checkpoints; pass train.resume=auto to continue it "
            "or pick a new train.out_dir"
        )
    if path is not None:
        check_resume_config(cfg, path)
    return path


@dataclass(kw_only=True)
class Checkpointer:
    """Saves and restores a run's checkpoints for its backend.

    ``last``: the newest checkpoint this run has (saved, or resumed from). ``good``: the newest one
    known to train finitely, i.e. a finite step ran from its weights (what a NaN stop points to).
    """

    cfg: RunConfig
    backend: str
    model: torch.nn.Module  # unwrapped (its state_dict is the checkpoint's model)
    net: torch.nn.Module  # what the loop calls (DDP / DeepSpeed engine / the model)
    optimizer: torch.optim.Optimizer
    tokenizer_files: dict[str, bytes]  # the tokenizer's files by name (tokenizer.model, or tokenizer.json + config)
    last: Path | None = None
    good: Path | None = None
    written: set[Path] = field(default_factory=set)  # folders of this run: the only ones a save may replace

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def due(self, step: int, stopping: bool) -> bool:
        """Save every ``checkpoint.every`` steps, at the last step, and when stopping."""
        every = self.cfg.checkpoint.every
        return stopping or step == self.cfg.train.steps or bool(every and step % every == 0)

    def confirm(self) -> None:
        """A finite step just ran from the newest checkpoint's weights."""
        self.good = self.last

    def restore(self, path: Path, state: TrainState, device: torch.device, weights_loaded: bool = False) -> None:
        """Weights (unless ``weights_loaded``), optimizer state and train state from checkpoint ``path``."""
        saved = load_state(
            path,
            backend=self.backend,
            model=self.model,
            net=self.net,
            optimizer=self.optimizer,
            device=device,
            weights_loaded=weights_loaded,
        )
        state.load_state_dict(saved)
        self.last = path

    def save(self, state: TrainState) -> None:
        """Backends none/ddp: the main rank writes model.pt + optim.pt. fsdp2 / deepspeed: every
        rank writes its shards (DCP / DeepSpeed files), the main rank the rest."""
        writer = {
            "fsdp2": lambda tmp: sharded.save_dcp(tmp / sharded.DCP_DIR, self.model, self.optimizer),
            "deepspeed": lambda tmp: sharded.save_deepspeed(tmp / sharded.DS_DIR, self.net),
        }.get(self.backend)
        main = dist.is_main()
        if writer is None and not main:
            return
        train_state = {
            **state.state_dict(),
            "backend": self.backend,
            "world_size": dist.world_size(),
            "zero_stage": zero_stage_of(self.net),
            "param_groups": hyperparameters(self.optimizer),
        }
        files = {
            "config.yaml": (self.run_dir / "config.yaml").read_bytes() if main else b"",
            **self.tokenizer_files,
        }
        tensors: dict[str, Any] = {"train": train_state}
        if writer is None:
            tensors.update(model=self.model.state_dict(), optim=self.optimizer.state_dict())
        path = store.save_checkpoint(
            self.run_dir,
            state.step,
            tensors,
            files,
            keep=self.cfg.checkpoint.keep,
            shared_writer=writer,
            written=self.written,
        )
        if main:
            self.last = path
