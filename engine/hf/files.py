"""Reading and writing Hugging Face model folders: config.json, safetensors (sharded or not, with
the index), generation_config.json. JSON and safetensors only: nothing here unpickles, so loading
a foreign folder runs no code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from leanlm.engine.errors import CheckpointError
from leanlm.engine.host import drop_mapped_pages, file_mappings

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# transformers' own default shard size for save_pretrained (4.x): files a hub and a server take.
MAX_SHARD_BYTES = 5 * 10**9


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what}); give a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (the index's shards, or model.safetensors)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        weight_map = read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / SAFE_SINGLE).is_file():
        files = [folder / SAFE_SINGLE]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = (
            f" (it has {others[0]}: pickle files are not loaded; re-save it with safe_serialization=True)"
            if others
            else ""
        )
        raise CheckpointError(f"{folder}: no model.safetensors or {SAFE_INDEX}{hint}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{folder}: shard {f.name} named by {SAFE_INDEX} is missing")
    return files


def iter_tensors(folder: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's safetensors files, one at a time (each read
    from the file when asked for: memory holds one tensor, not the model)."""
    from safetensors import safe_open

    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt", device=device) as handle:
                mappings = file_mappings(folder)
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = handle.get_tensor(name)
                    yield name, tensor
                    # read once: its pages of the file leave this process (a 7B import holds the
                    # model once, not also the file's pages); a later read fetches them again
                    drop_mapped_pages(tensor, mappings)
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError: truncated, corrupt header, bad offsets
            raise CheckpointError(
                f"{f}: not a readable safetensors file ({str(e).strip().splitlines()[0][:160]}); "
                "download or export it again"
            ) from None


def write_tensors(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    written: Callable[[list[torch.Tensor]], None] | None = None,
) -> list[str]:
    """Write ``tensors`` (HF names, contiguous) as safetensors: one ``model.safetensors`` when they
    fit in one shard, else ``model-0000i-of-0000n.safetensors`` plus the index. At most one shard
    is held in memory; ``written`` is called with each shard's tensors once they are on disk.
    Returns the files written."""
    from safetensors.torch import save_file

    shards: list[str] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            shards.append(f"shard-{len(shards):05d}.tmp")
            save_file(pending, str(folder / shards[-1]), metadata={"format": "pt"})
            if written is not None:
                written(list(pending.values()))
            pending, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t
        weight_map[name] = len(shards)
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(folder / shards[0], folder / SAFE_SINGLE)
        return [SAFE_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for tmp, final in zip(shards, names):
        os.replace(folder / tmp, folder / final)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, SAFE_INDEX]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
