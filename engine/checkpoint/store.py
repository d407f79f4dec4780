"""Checkpoints: one folder per step, written atomically, verified by checksums, loaded safely.

Layout of ``<run>/checkpoints/step-00001000/``::

    model.pt        model state_dict
    optim.pt        optimizer state_dict
    train.pt        step, tokens seen, scheduler, data position, RNG states
    config.yaml     the resolved config of the run that wrote it
    tokenizer.model the sentencepiece model, or tokenizer.json + tokenizer_config.json (so a checkpoint
                    is self-contained)
    manifest.json   format version, step, and sha256 + size of every file above

Everything is written to ``.tmp-step-*`` first and renamed into place, so a crash mid-write never
leaves a folder that looks complete. Files are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
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
from leanlm.engine.checkpoint.safe_load import scan_torch_files, torch_load
from leanlm.engine.errors import CheckpointError
from leanlm.engine.integrity import fsync_file, sha256_file
from leanlm.optim.quantized import dequantize_state, has_int8, int8_modules

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists (an estimate of a checkpoint's size)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _disk_full(error: BaseException, root: Path, need: int) -> bool:
    """Whether ``error`` came from a full disk or quota (torch.save's zip writer reports it only
    as "unexpected pos", so the free space decides when the error carries no errno)."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(root).free < max(need, 1 << 20)
    except OSError:
        return False


def _save_error(error: BaseException, root: Path, step: int) -> CheckpointError:
    """One line for a save that failed for another reason than a full disk: the OS's reason (a
    file-size limit, permissions, a read-only file system) and what is safe."""
    e: BaseException | None = error
    while e is not None and not (isinstance(e, OSError) and e.strerror):
        e = e.__cause__ or e.__context__
    if isinstance(e, OSError):
        why = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    else:  # torch.save's writer reports a short write without an errno ("unexpected pos ...")
        why = f"{str(error).strip().splitlines()[0][:120]}; a file-size limit (ulimit -f) or a quota?"
    return CheckpointError(
        f"cannot save checkpoint step {step} under {root} ({why}); fix that, then continue with "
        "train.resume=auto (earlier checkpoints are intact)"
    )


def check_writable(run_dir: str | Path) -> None:
    """Raise one ``CheckpointError`` now, before any step, when checkpoints cannot be written
    under ``run_dir`` (permissions, a read-only or immutable folder), instead of at the first save."""
    root = checkpoint_dir(run_dir)
    probe = root / f".probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints under {root} ({e.strerror}); make it writable or pick another train.out_dir"
        ) from None


def _write_files(tmp: Path, tensors: dict[str, Any], files: dict[str, bytes], step: int) -> None:
    """Write the tensors and files, fsync them, then the manifest (last: it marks completion)."""
    entries = {}
    for name, obj in tensors.items():
        torch.save(obj, tmp / f"{name}.pt")
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(path)
        entries[path.relative_to(tmp).as_posix()] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": entries}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    fsync_file(tmp / "manifest.json")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, Any],
    files: dict[str, bytes],
    *,
    keep: int = 0,
    shared_writer: Callable[[Path], None] | None = None,
    written: set[Path] | None = None,
) -> Path:
    """Write ``tensors`` (name -> object for torch.save) and raw ``files`` as checkpoint ``step``.

    ``shared_writer(tmp)``: a collective write that every rank joins (FSDP2's DCP shards, a
    DeepSpeed engine's files); then call this on every rank. Without it, call it on the main rank
    only. Returns the final folder. Older checkpoints beyond the newest ``keep`` are deleted
    afterwards (``keep=0`` keeps all). ``written``: the folders this run wrote (updated here); a
    folder of the same step not in it is moved aside, never replaced. A full disk removes the
    partial folder and raises one line.
    """
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    collective = shared_writer is not None and dist.is_initialized()
    # Every rank must name the same temp folder when they all write into it.
    tmp = root / (f".tmp-{step_name(step)}" + ("" if collective else f"-{os.getpid()}"))
    main = dist.is_main() or not collective
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            raise _save_error(e, root, step) from None
    if shared_writer is not None:
        dist.barrier()
        shared_writer(tmp)
        dist.barrier()
    if not main:
        dist.barrier()  # wait for the rename below
        return final
    try:
        _write_files(tmp, tensors, files, step)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = _tensor_bytes(tensors) + sum(len(d) for d in files.values())
        if _disk_full(e, root, need):
            raise CheckpointError(
                f"no space left on the device of {root} while saving step {step} (it needs about "
                f"{need / 2**20:.0f} MiB); free space or lower checkpoint.keep, then continue with "
                "train.resume=auto (earlier checkpoints are intact)"
            ) from None
        raise _save_error(e, root, step) from None
    try:
        _move_into_place(tmp, final, written)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(e, root, step) from None
    if written is not None:
        written.add(final.resolve())
    prune(root, keep, step)
    if collective:
        dist.barrier()
    return final


def _move_into_place(tmp: Path, final: Path, written: set[Path] | None) -> None:
    """Rename the finished temp folder to its step's name (an earlier attempt's folder of that
    step is moved aside, one of this run's own is replaced)."""
    if final.exists():
        if written is not None and final.resolve() in written:  # re-saving a step (interrupted right after a save)
            shutil.rmtree(final)
        else:  # written by an earlier attempt: keep it, out of the way of resume=auto
            aside = final.with_name(f"{final.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, aside)
            warnings.warn(f"checkpoint {final} of an earlier attempt moved to {aside}", stacklevel=2)
    os.replace(tmp, final)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first (temp folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def prune(root: Path, keep: int, newest: int) -> None:
    """Keep the newest ``keep`` checkpoints up to step ``newest`` (the one just written and
    verified); folders of later steps are never pruned."""
    if keep <= 0:
        return
    older = [(s, p) for s, p in list_checkpoints(root.parent) if s < newest]
    for _, path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete ``.tmp-step-*`` folders left by crashed saves. Call it only while holding the run's
    lock (``leanlm.engine.run_lock``): then no other process can be writing them."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-step-") and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _file_entries(path: Path, manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table, checked for shape (a hostile or damaged manifest must give
    a ``CheckpointError``, not a ``KeyError``) and for names that stay inside the folder."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: manifest.json is corrupt (no file table)")
    for name, info in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not name:
            raise CheckpointError(f"{path}: manifest.json names a file outside the folder ({name!r})")
        ok = isinstance(info, dict) and isinstance(info.get("sha256"), str)
        if not ok or not isinstance(info.get("bytes"), int) or isinstance(info["bytes"], bool):
            raise CheckpointError(f"{path}: manifest.json is corrupt (bad entry for {name!r})")
    return files


def verify(path: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and checksum, and open every serialized file
    through the allowlist (``leanlm.engine.checkpoint.safe_load``); return the manifest."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no manifest.json (incomplete or not a leanlm checkpoint)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (ValueError, OSError):  # JSON, UTF-8 and read errors alike
        raise CheckpointError(f"{path}: manifest.json is corrupt") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest.json is corrupt (not a JSON object)")
    if manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format")
        raise CheckpointError(f"{path}: checkpoint format {found} is not supported (expected {FORMAT_VERSION})")
    for name, info in _file_entries(path, manifest).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is truncated or corrupt (checksum mismatch)")
    scan_torch_files(path, str(path))  # no file in it may run code when unpickled
    return manifest


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``none`` -> None; ``auto`` -> newest checkpoint that verifies (None when the run has no
    checkpoint folder at all); a path -> that checkpoint, verified. Corrupt newer checkpoints are
    reported and skipped; when folders exist but none verifies, the run must not start over: a
    ``CheckpointError`` lists each folder and why."""
    if resume in ("", "none"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={resume!r}: no such checkpoint folder")
        verify(path)
        return path
    failures = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint at step {step}: {e}", stacklevel=2)
            failures.append(str(e))
            continue
        return path
    if failures:
        raise CheckpointError(
            f"train.resume=auto: no checkpoint in {checkpoint_dir(run_dir)} verifies ("
            + "; ".join(failures)
            + "); nothing was changed: repair or move them, or pick a new train.out_dir"
        )
    return None


def load_file(path: str | Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    """Load ``name.pt`` from a checkpoint with ``weights_only=True``, memory-mapped (a 7B model's
    weights are read into the live model without a second in-memory copy; copy-on-write, so the
    file is never modified)."""
    return torch_load(Path(path) / f"{name}.pt", str(path), map_location, mmap=True)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatched tensor. ``assign``:
    the module takes the loaded tensors themselves (memory-mapped ones: no second copy at all).
    Int8 weights convert where a run starts from another run's weights (``train.init_from``): int8
    codes load into float layers dequantized, float weights into int8 layers quantized."""
    own = {k: v.shape for k, v in model.state_dict().items()}
    if has_int8(state) and not has_int8(own):
        state = dequantize_state(state, next(p.dtype for p in model.parameters() if p.is_floating_point()))
    elif has_int8(own) and not has_int8(state):  # float weights for int8 layers: Int8Linear quantizes
        for name, module in int8_modules(model):
            for tensor in module.int8_names:
                key = f"{name}.{tensor}"
                own.pop(f"{key}_codes"), own.pop(f"{key}_scale")
                own[key] = module.storage(tensor)[0].shape
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{where}: model does not match the checkpoint (missing {missing[:3]}, unexpected {extra[:3]}); "
            "use the config the checkpoint was trained with"
        )
    for k, v in state.items():
        if own[k] != v.shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)} in the checkpoint but {tuple(own[k])} in the model; "
                "use the config the checkpoint was trained with"
            )
    model.load_state_dict(state, assign=assign)
    tie = getattr(model, "tie_weights", None)
    if assign and callable(tie):  # assign gave each module its own Parameter object: share again
        tie()
