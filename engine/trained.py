"""A trained model back from a run or checkpoint folder: config, tokenizer, weights (any backend's
format), for the tools that use one (``leanlm eval``, ``generate``, ``export``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from leanlm.engine.config import RunConfig
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.model import LLaMA


@dataclass(kw_only=True)
class Trained:
    cfg: RunConfig
    model: LLaMA
    tokenizer: Tokenizer
    path: Path  # the checkpoint folder
    device: torch.device


def checkpoint_path(spec: str | Path) -> Path:
    """A checkpoint folder (verified), or a run folder's newest valid checkpoint."""
    from leanlm.engine import checkpoint as ckpt
    from leanlm.engine.errors import CheckpointError

    path = Path(spec)
    if (path / "manifest.json").is_file():
        ckpt.verify(path)
        return path
    found = ckpt.resolve_resume(path, "auto") if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{str(spec)!r} is neither a checkpoint folder nor a run folder with a valid checkpoint")
    return found


def load_trained(
    spec: str | Path, overrides: list[str] | None = None, device: str | None = None, *, mapped: bool = False
) -> Trained:
    """The model of checkpoint (or run) ``spec`` in its training dtype, with data.* / eval.* /
    train.device / train.threads overrides. Data is tokenized with the checkpoint's own tokenizer.
    ``mapped``: a single-file (``model.pt``) checkpoint's weights stay memory-mapped, read-only
    (copy-on-write), instead of being copied: for tools that only read them (export)."""
    from leanlm.engine.build import build_model, pick_device
    from leanlm.engine.checkpoint import store
    from leanlm.engine.checkpoint.sharded import checkpoint_format, load_weights
    from leanlm.engine.config import build_config, merge, parse_overrides, read_yaml
    from leanlm.engine.errors import ConfigError

    path = checkpoint_path(spec)
    over = parse_overrides(overrides or [])
    if set(over) - {"data", "eval", "train"} or set(over.get("train", {})) - {"device", "threads"}:
        raise ConfigError("only data.*, eval.*, train.device and train.threads can be overridden here")
    cfg = build_config(merge(read_yaml(path / "config.yaml"), over))
    dev = pick_device(device or cfg.train.device)
    tok = Tokenizer.load(path)
    model = build_model(cfg, tok.vocab_size, dev, restoring=True)  # the weights come from the checkpoint
    model.set_document_boundary(tok.bos_id, tok.eos_id)  # evaluated as it was trained (model.doc_masking)
    if mapped and checkpoint_format(path) == "torch" and dev.type == "cpu":
        store.load_model_state(model, store.load_file(path, "model", dev), str(path), assign=True)
    else:
        load_weights(path, model, dev)
    return Trained(cfg=cfg, model=model, tokenizer=tok, path=path, device=dev)
