"""``profile.steps=[a, b]``: a torch.profiler trace of optimizer steps a..b (Chrome / Perfetto
JSON: open it at https://ui.perfetto.dev or chrome://tracing) and, on CUDA, a memory snapshot of
the same steps (open it at https://pytorch.org/memory_viz), written to ``<run>/profile/``, one
file per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leanlm.engine import distributed as dist


class StepProfiler:
    """Starts before step ``first`` and writes its files after step ``last`` (1-based)."""

    def __init__(self, steps: list[int], run_dir: Path, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.folder, self.device = run_dir / "profile", device
        self.prof: Any = None
        self.files: list[Path] = []

    def before(self, step: int) -> None:
        """Called before optimizer step ``step`` runs."""
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        """Called after optimizer step ``step``: the last one writes the files."""
        if step != self.last or self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        tag = f"steps-{self.first}-{self.last}-rank{dist.rank()}"
        trace = self.folder / f"trace-{tag}.json"
        self.prof.export_chrome_trace(str(trace))
        self.files.append(trace)
        if self.device.type == "cuda":
            snapshot = self.folder / f"memory-{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.files.append(snapshot)
        self.prof = None
        if dist.is_main():
            print(f"leanlm: profile of steps {self.first}-{self.last}: {', '.join(str(f) for f in self.files)}")
