"""Run metrics: TensorBoard event files and ``metrics.jsonl`` with the same scalars, main rank only.

(Named ``metrics`` rather than ``logging`` so it can never shadow the standard library module.)
Tags: ``train/loss``, ``train/grad_norm``, ``val/loss``, ``val/ppl``, ``optim/lr``,
``perf/tokens_per_s``, ``perf/mfu`` (CUDA), ``mem/peak_gib``, ``reweight/*``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from leanlm.engine.run_files import append_no_follow, write_no_follow

# Dense bf16 peak FLOP/s by device name substring, for MFU (datasheet numbers, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 2**62  # a torn last line from a crash: drop it


class Throughput:
    """Tokens per second over a logging window, with eval and checkpoint time left out."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._start, self._tokens, self._paused = time.perf_counter(), 0, 0.0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> float:
        """Tokens per second since the last ``reset``."""
        return self._tokens / max(time.perf_counter() - self._start - self._paused, 1e-9)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count (evaluation, checkpoints)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0


def trim_records(path: Path, last_step: int) -> None:
    """Drop the records of a JSON-lines log whose step is after ``last_step`` (and torn lines),
    atomically: what a resumed run will log again must not appear twice."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line for line in text.splitlines(keepends=True) if line.strip() and _step_of(line) <= last_step]
    if "".join(kept) == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    write_no_follow(tmp, "".join(kept).encode("utf-8"))
    tmp.replace(path)  # a rename replaces a link itself, never its target


class MetricsLogger:
    """Writes scalars to TensorBoard and ``metrics.jsonl``; a no-op on non-main ranks."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = True,
        resume_step: int | None = None,
        trackers: list[Any] | None = None,
    ) -> None:
        """``resume_step``: the run restarts from this step's checkpoint; records logged after it by
        the interrupted attempt are dropped (from metrics.jsonl, and purged in TensorBoard) so the
        logs read as one uninterrupted run."""
        self.enabled = enabled
        self.trackers = list(trackers or []) if enabled else []  # leanlm.engine.trackers.Tracker
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            trim_records(path, resume_step)
        self.jsonl = append_no_follow(path)  # line-buffered: survives crashes; closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), max_queue=100, purge_step=purge)

    def log(self, step: int, scalars: dict[str, float], **extra: Any) -> None:
        if not self.enabled or self.jsonl is None:
            return
        for tag, value in scalars.items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **extra, **scalars}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
