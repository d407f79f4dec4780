"""Loading checkpoint files without running their code.

A checkpoint folder may come from anywhere, and its manifest proves nothing (whoever wrote the
files wrote the checksums too). So nothing in it is ever unpickled without an allowlist:

* ``.pt`` files (ours, DeepSpeed's): ``torch.load(weights_only=True)``, admitting only the few
  DeepSpeed classes its optimizer files hold (``DEEPSPEED_GLOBALS``). DeepSpeed's own loaders use
  ``weights_only=False``, so ``scan_torch_files`` opens every serialized file of a folder this way
  (memory-mapped: no tensor is read) before DeepSpeed is allowed to touch it.
* DCP's ``.metadata`` (plain ``pickle`` in torch): read by ``read_dcp_metadata``, an unpickler that
  admits only DCP's own metadata classes, ``torch.Size``, dtypes and paths; and DCP's byte items
  (``torch.load(weights_only=False)`` in torch's planner) are refused: we only ever save tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from leanlm.engine.errors import CheckpointError

# DeepSpeed's ZeRO optimizer files pickle these (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0..3 checkpoints, deepspeed 0.19).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_PICKLE_MAGIC = (b"\x80",)  # legacy torch.save / raw pickle protocols 2+


def _deepspeed_globals() -> list[Any]:
    found = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # no deepspeed here: its files then cannot be resumed anyway
    return found


@contextlib.contextmanager
def _allowed(extra: list[Any]):
    if not extra:
        yield
    elif hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: scoped
        with torch.serialization.safe_globals(extra):
            yield
    else:  # torch 2.4: process-wide, and only ever these few DeepSpeed classes
        torch.serialization.add_safe_globals(extra)
        yield


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what is wrong (torch's weights-only errors
    bury the offending global under a paragraph of advice)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split("(")[0].strip()
    return lines[0][:200] if lines else type(e).__name__


def torch_load(path: Path, where: str, map_location: Any = "cpu", deepspeed: bool = False, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; any failure is a ``CheckpointError`` naming ``path``."""
    extra = _deepspeed_globals() if deepspeed else []
    try:
        with _allowed(extra), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" on a foreign file
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path.name} is missing") from None
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(
            f"{where}: refusing to load {path} (not a plain tensor file: {type(e).__name__}: {_first_line(e)})"
        ) from None


def is_serialized(path: Path) -> bool:
    """Whether ``path`` starts like a torch.save / pickle file (whatever its name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(_ZIP_MAGIC) or head[:1] in _PICKLE_MAGIC


def scan_torch_files(folder: Path, where: str) -> None:
    """Open every serialized file under ``folder`` through an allowlist before anything else may:
    DCP's ``.metadata`` with ``read_dcp_metadata``, anything else that starts like a torch.save or
    pickle file with ``torch_load`` (zip files memory-mapped, so only their pickles are read).
    DCP's ``.distcp`` shards are skipped: DCP reads them with ``weights_only=True`` itself."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == ".metadata":
            read_dcp_metadata(path.parent, where)
        elif path.suffix != ".distcp" and is_serialized(path):
            with open(path, "rb") as fh:
                mmap = fh.read(4) == _ZIP_MAGIC
            # DeepSpeed's classes are admitted (and deepspeed imported) only for DeepSpeed's own files
            in_deepspeed = "deepspeed" in path.relative_to(folder).parts or folder.name == "deepspeed"
            torch_load(path, where, deepspeed=in_deepspeed, mmap=mmap)


# ----------------------------------------------------------------------------- DCP metadata

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _DCPUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses and the plain values they hold, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_dcp_metadata(folder: Path, where: str | None = None) -> Any:
    """DCP's ``.metadata`` of ``folder``, unpickled through the allowlist; tensor entries only."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = folder / ".metadata"
    where = where or str(folder.parent)
    try:
        meta = _DCPUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path} is missing") from None
    except Exception as e:
        raise CheckpointError(
            f"{where}: refusing to load {path} ({type(e).__name__}: {_first_line(e)[:200]})"
        ) from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(f"{where}: {path} is not DCP metadata")
    odd = [k for k, v in meta.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if odd:  # DCP would torch.load(weights_only=False) these
        raise CheckpointError(f"{where}: refusing to load {path}: it declares non-tensor entries ({odd[0]}, ...)")
    return meta


def dcp_reader_and_planner(folder: Path) -> tuple[Any, Any]:
    """A ``FileSystemReader`` whose metadata goes through ``read_dcp_metadata`` and a load planner
    that refuses pickled byte items."""
    import torch.distributed.checkpoint.metadata
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta = read_dcp_metadata(folder)
            storage_meta = getattr(torch.distributed.checkpoint.metadata, "StorageMeta", None)
            if storage_meta is not None and getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = storage_meta()  # what torch's own reader does
            if getattr(meta, "storage_meta", None) is not None and hasattr(self, "load_id"):
                meta.storage_meta.load_id = self.load_id
            return meta

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"{folder.parent}: refusing to unpickle {read_item.dest_index.fqn} from dcp/")

    return SafeReader(str(folder)), TensorOnlyPlanner()
