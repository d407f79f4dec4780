"""Checkpoints: one folder per step, written atomically, verified by checksums, loaded safely.

Layout of ``<run>/checkpoints/step-00001000/``::

    model.pt        model state_dict
    optim.pt        optimizer state_dict
    train.pt        step, tokens seen, scheduler, data position, RNG states
    config.yaml     the resolved config of the run that wrote it
    tokenizer.model the sentencepiece model (so a checkpoint is self-contained)
    manifest.json   format version, step, and sha256 + size of every file above

Everything is written to ``.tmp-step-*`` first and renamed into place, so a crash mid-write never
leaves a folder that looks complete. Files are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from leanlm.engine import distributed as dist
from leanlm.engine.errors import CheckpointError

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, Any],
    files: dict[str, bytes],
    keep: int = 0,
    shared_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` (name -> object for torch.save) and raw ``files`` as checkpoint ``step``.

    ``shared_writer(tmp)``: a collective write that every rank joins (FSDP2's DCP shards, a
    DeepSpeed engine's files); then call this on every rank. Without it, call it on the main rank
    only. Returns the final folder. Older checkpoints beyond the newest ``keep`` are deleted
    afterwards (``keep=0`` keeps all).
    """
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    collective = shared_writer is not None and dist.is_initialized()
    # Every rank must name the same temp folder when they all write into it.
    tmp = root / (f".tmp-{step_name(step)}" + ("" if collective else f"-{os.getpid()}"))
    main = dist.is_main() or not collective
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if shared_writer is not None:
        dist.barrier()
        shared_writer(tmp)
        dist.barrier()
    if not main:
        dist.barrier()  # wait for the rename below
        return final
    entries = {}
    for name, obj in tensors.items():
        torch.save(obj, tmp / f"{name}.pt")
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        entries[path.relative_to(tmp).as_posix()] = {
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
        }
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": entries}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / "manifest.json")
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    if collective:
        dist.barrier()
    return final


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first (temp folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def verify(path: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and checksum; return the manifest."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no manifest.json (incomplete or not a leanlm checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: manifest.json is corrupt") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {manifest.get('format')} is not supported (expected {FORMAT_VERSION})"
        )
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is truncated or corrupt (checksum mismatch)")
    return manifest


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``none`` -> None; ``auto`` -> newest checkpoint that verifies (None if there is none);
    a path -> that checkpoint, verified. Corrupt newer checkpoints are reported and skipped."""
    if resume in ("", "none"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={resume!r}: no such checkpoint folder")
        verify(path)
        return path
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint at step {step}: {e}", stacklevel=2)
    return None


def load_file(path: str | Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    """Load ``name.pt`` from a checkpoint with ``weights_only=True``."""
    f = Path(path) / f"{name}.pt"
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {name}.pt is missing") from None
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(
            f"{path}: cannot load {name}.pt ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatched tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{where}: model does not match the checkpoint (missing {missing[:3]}, unexpected {extra[:3]}); "
            "use the config the checkpoint was trained with"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} in the model; "
                "use the config the checkpoint was trained with"
            )
    model.load_state_dict(state)
