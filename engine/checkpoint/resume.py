"""Resuming a run from a checkpoint: what may change, what may not, and restoring the state.

A resume continues the *same* run, so the keys that define its model, optimizer state, data
order or tokenizer must match the checkpoint's config (``FIXED_KEYS``): a change is refused with
one line naming the key. Everything else may change and takes effect from the resume step: the
peak lr and schedule (``optim.lr=3e-4`` rescales the schedule from there), the optimizer's other
hyperparameters (betas, eps, weight decay, FRUGAL's lr scales), ``train.steps``, batch size,
clipping, reweighting, evaluation, logging and checkpoint cadence, device and threads. The run's
``config.yaml`` records the config actually in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leanlm.engine import distributed as dist
from leanlm.engine.checkpoint import sharded, store
from leanlm.engine.config import RunConfig, leaves, load_config
from leanlm.engine.errors import CheckpointError
from leanlm.engine.host import drop_mapped_pages, file_mappings, is_mapped

# Keys a resume must keep (dotted, as in ``leanlm keys``); a prefix ending in "." covers a section.
FIXED_KEYS = (
    # the model's shape (activation checkpointing and the init-only LOST keys may change)
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.ffn_dim",
    "model.vocab_size",
    "model.rope_theta",
    "model.rope_scaling",
    "model.rope_scaling_factor",
    "model.rope_low_freq_factor",
    "model.rope_high_freq_factor",
    "model.rope_original_max_len",
    "model.tie_embeddings",
    "model.norm_eps",
    "model.lost.enabled",
    "model.lost.rank",
    "model.lost.channel_density",
    "model.lost.phi",
    "model.lost.support",
    # the optimizer's state and subspaces
    "optim.name",
    "optim.projection",
    "optim.density",
    "optim.update_gap",
    "optim.block_order",
    # the data, its order and its tokenizer (a checkpoint carries its own tokenizer)
    "data.source",
    "data.text_field",
    "data.hf_split",
    "data.hf_data_files",
    "data.val_fraction",
    "data.tokenizer",
    "data.vocab_size",
    "data.tokenizer_sample_mb",
    "data.shuffle",
    "train.seq_len",
    "train.seed",
    "train.param_dtype",
    "train.int8_group",  # the scales' shape
)

EXPECTED_FORMAT = {"fsdp2": "dcp", "deepspeed": "deepspeed", "ddp": "torch", "none": "torch"}


def check_resume_config(cfg: RunConfig, path: Path) -> None:
    """Refuse a resume whose config changes a key in ``FIXED_KEYS``, naming the first such key."""
    try:
        saved = load_config(path / "config.yaml")
    except Exception as e:  # a checkpoint's config that no longer validates is not resumable
        raise CheckpointError(f"{path}: its config.yaml cannot be read ({e})") from None
    now = {key: value for sname in cfg.to_dict() for key, _, value in leaves(getattr(cfg, sname), sname)}
    then = {key: value for sname in saved.to_dict() for key, _, value in leaves(getattr(saved, sname), sname)}
    for key in FIXED_KEYS:
        if now[key] != then[key]:
            raise CheckpointError(
                f"{path}: {key}={now[key]!r} differs from the checkpoint's {then[key]!r}, which a "
                f"resume cannot change; set {key}={then[key]} or start a new train.out_dir"
            )


def zero_stage_of(net: Any) -> int:
    """The ZeRO stage of a DeepSpeed engine; 0 for any other module."""
    return int(net.zero_optimization_stage()) if dist.is_deepspeed(net) else 0


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_state(
    path: Path,
    *,
    backend: str,
    model: torch.nn.Module,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    weights_loaded: bool = False,
) -> dict:
    """Restore model and optimizer state from checkpoint ``path`` for ``backend``; return train.pt.
    ``weights_loaded``: ``preload_weights`` already put the model weights in place.

    The optimizer's hyperparameters stay those of the current config (they are not state)."""
    state = store.load_file(path, "train")
    if not isinstance(state, dict) or "step" not in state or "scheduler" not in state:
        raise CheckpointError(f"{path}: train.pt is not a leanlm train state")
    fmt = sharded.checkpoint_format(path)
    # DCP reshards onto anything; the other formats need the backend that wrote them.
    if fmt != EXPECTED_FORMAT[backend] and not (fmt == "dcp" and backend in ("none", "ddp")):
        raise CheckpointError(
            f"{path}: written by distributed.backend={state.get('backend', 'none/ddp')} ({fmt} format); "
            f"resume it with that backend, not {backend}"
        )
    fresh = hyperparameters(optimizer)
    if fmt == "torch":
        if not weights_loaded:
            store.load_model_state(model, store.load_file(path, "model", device), str(path))
        try:
            optimizer.load_state_dict(store.load_file(path, "optim", device))
        except (ValueError, KeyError, RuntimeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(
                f"{path}: the optimizer state does not fit this optimizer ({msg}); resume with the "
                "optim.* settings the checkpoint was trained with"
            ) from None
        own_state_memory(optimizer, path)  # the loaded moments may alias the memory-mapped optim.pt
    elif fmt == "dcp":
        sharded.load_dcp(path / sharded.DCP_DIR, model, optimizer)
    else:
        saved = (state.get("world_size"), state.get("zero_stage"))
        if saved != (dist.world_size(), zero_stage_of(net)):
            raise CheckpointError(
                f"{path}: DeepSpeed checkpoint written with (world size, ZeRO stage) = {saved}; "
                f"resume with the same, not {(dist.world_size(), zero_stage_of(net))}"
            )
        sharded.load_deepspeed(path / sharded.DS_DIR, net)
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)  # the config's lr, betas, eps, weight decay, ... win over the saved ones
    return state


def preload_weights(path: Path, model: torch.nn.Module, backend: str, device: torch.device) -> bool:
    """Before the optimizer exists: give ``model`` (built with ``restoring=True``) the checkpoint's
    weights as its own tensors, memory-mapped copy-on-write (``load_state_dict(assign=True)``).
    Copying them into freshly allocated weights instead would hold the model twice while it loads
    (the file's mapped pages and the copy: 25 GiB of resident memory for a bf16 7B). Only for
    the single-file format of backends none / ddp; returns whether it loaded."""
    if backend not in ("none", "ddp") or sharded.checkpoint_format(path) != "torch":
        return False
    store.load_model_state(model, store.load_file(path, "model", device), str(path), assign=True)
    own_model_memory(model, path)
    return True


# A training run must not keep the checkpoint it resumed from memory-mapped: writing into that
# file (rsync --inplace, truncate) would crash it with SIGBUS or change weights not yet updated, and
# pruning it would not free its disk space until the run ends. So the loaded tensors are copied into
# the process's own memory one tensor at a time, each copied tensor's mapped pages dropped at once
# (madvise): the weights are held once, plus one tensor. `leanlm eval` and `generate` keep the
# zero-copy path.


def _own(t: torch.Tensor, mappings: list[tuple[int, int]] | None) -> torch.Tensor:
    """``t``, or a private copy of it when it lies in the checkpoint's mapped pages."""
    if not is_mapped(t, mappings):  # already the process's own (FRUGAL and PrecisionHooks copy on load)
        return t
    copy = t.clone()
    drop_mapped_pages(t, mappings)
    return copy


@torch.no_grad()
def own_model_memory(model: torch.nn.Module, checkpoint: Path) -> None:
    """Give every parameter and buffer of ``model`` its own memory instead of ``checkpoint``'s
    mapped pages (parameters stay the same objects, so references to them stay valid)."""
    mappings = file_mappings(checkpoint)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.data = _own(p.data, mappings)
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[name] = _own(b, mappings)


def own_state_memory(optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Give every tensor of ``optimizer``'s state its own memory (dtype, device and values kept)."""
    mappings = file_mappings(checkpoint)
    for st in optimizer.state.values():
        for key, value in st.items():
            if torch.is_tensor(value):
                st[key] = _own(value, mappings)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a freshly built schedule at ``step``: its peak lr and shape are the current config's,
    so an ``optim.lr`` or ``optim.schedule`` change takes effect from the resume step. With an
    unchanged config this gives the same lr, bit for bit, as the uninterrupted run."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    scheduler.last_epoch = step
    lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
