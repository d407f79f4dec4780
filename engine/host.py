"""The host the run is on: free memory, and handing freed pages back to the kernel.

Plumbing the builders and ``leanlm memory`` ask of the machine; kept apart from the run's metrics.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

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


def file_mappings(folder: str | Path) -> list[tuple[int, int]] | None:
    """[start, end) addresses of this process's mappings of files under ``folder`` (Linux
    ``/proc/self/maps``); None where that cannot be read (any tensor may then be mapped)."""
    prefix = str(Path(folder).resolve()) + "/"
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


_MADV_DONTNEED = 4  # Linux
_PAGE = mmap.PAGESIZE


def is_mapped(t: torch.Tensor, mappings: list[tuple[int, int]] | None) -> bool:
    """Whether ``t``'s bytes may lie in one of ``mappings`` (always, when they are unknown)."""
    if mappings is None:
        return True
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return any(lo < end and start < hi for start, end in mappings)


def drop_mapped_pages(t: torch.Tensor, mappings: list[tuple[int, int]] | None) -> None:
    """Drop ``t``'s pages from the process where they lie in one of ``mappings`` (read-only uses
    of a private file mapping: a later read would fetch them from the file again), so copying a
    memory-mapped checkpoint into private memory holds one copy of the weights, not two. Only
    whole pages inside the given file mappings are touched: never the heap, never a neighbour's
    partial page."""
    if not mappings or t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    lo = t.data_ptr()  # the first element's address (the storage offset included)
    hi = lo + t.numel() * t.element_size()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for start, end in mappings:
        a, b = max(lo, start), min(hi, end)
        a, b = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE  # whole pages only, inward
        if a < b:
            libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)
