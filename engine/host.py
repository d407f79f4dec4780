"""The host the run is on: free memory, and handing freed pages back to the kernel.

Plumbing the builders and ``leanlm memory`` ask of the machine; kept apart from the run's metrics.
"""

from __future__ import annotations

import ctypes
import sys

import torch


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``). Building a model
    frees many float32 temporaries below glibc's 32 MiB mmap threshold (the float32 init of a bf16
    model, a LOST conversion's per-layer float32 factors); without this their pages stay in the
    process's resident set for the whole run. Returns whether it could (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now: CUDA's free bytes, or the kernel's MemAvailable on CPU
    (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
