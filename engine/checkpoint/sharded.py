"""Checkpoint contents that every rank writes: FSDP2 through ``torch.distributed.checkpoint`` (DCP),
DeepSpeed through its engine's own ``save_checkpoint``.

A checkpoint folder (see ``leanlm.engine.checkpoint.store``) then holds, next to ``train.pt``,
``config.yaml`` and the tokenizer, either ``model.pt`` + ``optim.pt`` (backends none and ddp),
``dcp/`` (fsdp2) or ``deepspeed/`` (deepspeed); the manifest covers every file in all of them.

DCP layout: ``{"model": model.state_dict(), "optim": {"<param fqn>::<state key>": tensor}}``.
Optimizer state is keyed by parameter name (not position) so it survives any regrouping, and it is
stored as the optimizer holds it: DTensors (FRUGAL's column moments, AdamW's moments under FSDP2)
are saved shard by shard and resharded on load, on any world size, including one process; plain
tensors must be identical on every rank (DCP keeps one copy), which FRUGAL guarantees for what it
keeps replicated. ``optim_layout.json`` records which keys are sharded, so a loader can allocate
the right destination before reading.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.engine import distributed as dist
from leanlm.engine.checkpoint import store
from leanlm.engine.checkpoint.safe_load import dcp_reader_and_planner, read_dcp_metadata, scan_torch_files, torch_load
from leanlm.engine.errors import CheckpointError
from leanlm.optim.sharding import is_dtensor, local, sharded_zeros

DCP_DIR = "dcp"
DS_DIR = "deepspeed"
DS_TAG = "state"
LAYOUT_FILE = "optim_layout.json"


def checkpoint_format(path: Path) -> str:
    """``dcp``, ``deepspeed`` or ``torch`` (model.pt / optim.pt)."""
    if (path / DCP_DIR).is_dir():
        return "dcp"
    if (path / DS_DIR).is_dir():
        return "deepspeed"
    return "torch"


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optim_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer's tensor state keyed ``"<fqn>::<key>"``, and each key's layout
    (``shard0`` for DTensors, ``replicated`` otherwise)."""
    names = _names(model)
    state, layout = {}, {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if not torch.is_tensor(value):
                raise CheckpointError(f"optimizer state {names[id(p)]}::{key} is not a tensor; cannot save it with DCP")
            state[f"{names[id(p)]}::{key}"] = value
            layout[f"{names[id(p)]}::{key}"] = "shard0" if is_dtensor(value) else "replicated"
    return state, layout


def save_dcp(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of the model and optimizer state under ``folder``."""
    import torch.distributed.checkpoint as dcp

    optim_state, layout = optim_state_by_name(model, optimizer)
    dcp.save({"model": model.state_dict(), "optim": optim_state}, checkpoint_id=str(folder))
    if dist.is_main():
        (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=0, sort_keys=True))


def load_dcp(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a DCP checkpoint into ``model`` (sharded or not) and, if given, ``optimizer``'s state.
    The world size may differ from the one that saved it."""
    import torch.distributed.checkpoint as dcp

    meta = read_dcp_metadata(folder).state_dict_metadata  # before DCP reads it (allowlisted)
    model_sd = model.state_dict()
    dest: dict[str, Any] = {"model": model_sd}
    placed: dict[str, tuple[nn.Parameter, str]] = {}
    if optimizer is not None:
        layout = _read_layout(folder)
        params = dict(model.named_parameters())
        optim_dest: dict[str, torch.Tensor] = {}
        for key, kind in layout.items():
            fqn, _, name = key.rpartition("::")
            if fqn not in params or f"optim.{key}" not in meta:
                raise CheckpointError(
                    f"{folder}: optimizer state {key} does not match the model; resume with the "
                    "model config the checkpoint was trained with"
                )
            p, md = params[fqn], meta[f"optim.{key}"]
            if kind == "shard0" and is_dtensor(p):
                optim_dest[key] = sharded_zeros(p, tuple(md.size), md.properties.dtype)
            else:
                optim_dest[key] = torch.zeros(md.size, dtype=md.properties.dtype, device=local(p).device)
            placed[key] = (p, name)
        dest["optim"] = optim_dest
    reader, planner = dcp_reader_and_planner(folder)
    with warnings.catch_warnings():  # "loading in a single process" is what we mean without torchrun
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        try:
            dcp.load(dest, storage_reader=reader, planner=planner)
        except CheckpointError:
            raise
        except Exception as e:  # DCP wraps rank failures in its own exception types
            failures = getattr(e, "failures", None)
            if isinstance(failures, dict):
                inner = next(iter(failures.values()), None)
                if isinstance(inner, CheckpointError):
                    raise inner from None
            raise CheckpointError(
                f"{folder.parent}: cannot load dcp/ ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:200]})"
            ) from None
    model.load_state_dict(model_sd)
    if optimizer is not None:
        optimizer.state.clear()
        for key, (p, name) in placed.items():
            value = dest["optim"][key]
            if name == "step" and not is_dtensor(value):
                value = value.cpu()  # torch optimizers keep step counters on the CPU
            optimizer.state[p][name] = value


def _read_layout(folder: Path) -> dict[str, str]:
    try:
        layout = json.loads((folder / LAYOUT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder.parent}: cannot read dcp/{LAYOUT_FILE} ({e})") from None
    if not isinstance(layout, dict) or not all(isinstance(v, str) for v in layout.values()):
        raise CheckpointError(f"{folder.parent}: dcp/{LAYOUT_FILE} is not a layout mapping")
    return layout


def save_deepspeed(folder: Path, engine: Any) -> None:
    """Collective: DeepSpeed writes its model and (ZeRO-partitioned) optimizer files."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)


def load_deepspeed(folder: Path, engine: Any) -> None:
    """Resume a DeepSpeed engine; DeepSpeed unpickles without an allowlist, so every file is
    opened through ours first (``scan_torch_files``)."""
    scan_torch_files(folder, str(folder.parent))
    path, _ = engine.load_checkpoint(
        str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load the checkpoint")


def load_weights(path: Path, model: nn.Module, device: torch.device) -> None:
    """Load only the model weights of a checkpoint of any format into an unsharded ``model``
    (for eval and generate)."""
    fmt = checkpoint_format(path)
    if fmt == "torch":
        store.load_model_state(model, store.load_file(path, "model", device), str(path))
    elif fmt == "dcp":
        load_dcp(path / DCP_DIR, model)
    else:
        folder = path / DS_DIR
        scan_torch_files(folder, str(path))  # before DeepSpeed's weights_only=False loads
        if not list((folder / DS_TAG).glob("*optim_states.pt")):
            # ZeRO-0: no partitioned optimizer files; the model file holds every weight ("module")
            model_file = folder / DS_TAG / "mp_rank_00_model_states.pt"
            state = torch_load(model_file, str(path), map_location=device, deepspeed=True)["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # ZeRO 1-3: the float32 master weights from the optimizer partitions (stage 3 keeps
            # only partitions in the model file).
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
        store.load_model_state(model, {k: v.to(device) for k, v in state.items()}, str(path))
