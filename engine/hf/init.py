"""``train.init_from``: continued pretraining from a Hugging Face Llama-family folder (or Hub id)
or a leanlm run / checkpoint. Weights only: a fresh optimizer, step 0, a new run.

The model's shape comes from the source: its ``model.*`` keys are set from it, and a key the
config set to another value is a one-line error naming both. The tokenizer comes from the source
folder unless ``data.tokenizer`` is set. Weights are read one tensor at a time (safetensors,
memory-mapped) straight into the run's ``param_dtype``: a bf16 import never holds a float32 copy
or a second model. LOST converts after loading (its SVD init from the pretrained weights).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from leanlm.engine.config import RunConfig
from leanlm.engine.config.schema import ModelConfig
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.hf.files import is_hf_folder, iter_tensors, read_json
from leanlm.engine.hf.mapping import SHAPE_KEYS, model_keys_from_hf
from leanlm.engine.hf.weights import from_hf
from leanlm.engine.model import LLaMA
from leanlm.optim.lost_int8 import quantize_lost
from leanlm.optim.quantized import int8_modules

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(kw_only=True)
class InitSource:
    path: Path  # an HF folder, or a leanlm checkpoint folder
    kind: str  # "hf" or "leanlm"
    tokenizer: Path | None  # where the tokenizer comes from (None: data.tokenizer, or train one)


def locate(spec: str) -> tuple[Path, str]:
    """(folder, "hf" | "leanlm") for a local HF folder, a leanlm run/checkpoint, or a Hub id."""
    path = Path(spec)
    if path.is_dir():
        if is_hf_folder(path):
            return path, "hf"
        if any(path.glob("*.safetensors")) or (path / "tokenizer.json").is_file():
            raise ConfigError(
                f"train.init_from={spec}: no config.json in this folder (a Hugging Face model folder holds config.json "
                "beside its safetensors); copy it from the model's repository"
            )
        from leanlm.engine.trained import checkpoint_path

        return checkpoint_path(path), "leanlm"
    if path.exists():
        raise ConfigError(f"train.init_from={spec}: is a file; give a model folder, a run or a checkpoint")
    if not HUB_ID.match(spec):
        raise ConfigError(f"train.init_from={spec}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # offline, unknown repo, gated: one line
        raise ConfigError(
            f"train.init_from={spec}: not a local folder, and the Hub download failed ({type(e).__name__}); "
            "download the model folder and give its path"
        ) from None
    return Path(folder), "hf"


def _source_model_keys(path: Path, kind: str) -> tuple[dict, int]:
    """(model.* keys, the longest sequence the source allows; 0 = no limit) of the source."""
    if kind == "hf":
        keys, max_len, _ = model_keys_from_hf(read_json(path / "config.json", "the model config"), str(path))
        return keys, max_len
    from leanlm.engine.config import build_config, read_yaml

    src = build_config(read_yaml(path / "config.yaml"))
    return {k: getattr(src.model, k) for k in SHAPE_KEYS}, 0


def resolve(cfg: RunConfig) -> tuple[RunConfig, InitSource | None]:
    """The config with ``model.*`` taken from ``train.init_from``, and where weights and tokenizer
    come from; (cfg, None) without ``init_from``."""
    spec = cfg.train.init_from
    if not spec:
        return cfg, None
    path, kind = locate(spec)
    keys, max_len = _source_model_keys(path, kind)
    default = ModelConfig()
    for key, value in keys.items():
        mine = getattr(cfg.model, key)
        if key == "vocab_size" and mine == 0:
            continue
        if mine != getattr(default, key) and mine != value:
            raise ConfigError(
                f"model.{key}={mine} but train.init_from={spec} has {value}; remove model.{key} from the config "
                "(the shape comes from the model you start from)"
            )
    if max_len and cfg.train.seq_len > max_len:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is longer than {spec}'s max_position_embeddings={max_len}; "
            f"use train.seq_len<={max_len}"
        )
    if cfg.model.lost.enabled and kind == "leanlm" and _is_lost(path):
        raise ConfigError(f"train.init_from={spec} is already a LOST model; set model.lost.enabled=false")
    model = dataclasses.replace(cfg.model, **keys)
    tokenizer = None if cfg.data.tokenizer else path
    if tokenizer is not None and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"train.init_from={spec} has no tokenizer.json or tokenizer.model; set data.tokenizer")
    return dataclasses.replace(cfg, model=model), InitSource(path=path, kind=kind, tokenizer=tokenizer)


def _is_lost(path: Path) -> bool:
    from leanlm.engine.config import build_config, read_yaml

    return build_config(read_yaml(path / "config.yaml")).model.lost.enabled


@torch.no_grad()
def load_initial_weights(model: LLaMA, source: InitSource, device: torch.device) -> None:
    """Fill every weight of the dense ``model`` (built with ``restoring=True``) from the source."""
    if source.kind == "leanlm":
        from leanlm.engine.checkpoint.sharded import load_weights

        load_weights(source.path, model, device)
        return
    params = dict(model.state_dict(keep_vars=True))
    int8 = {f"{n}.weight": mod for n, mod in int8_modules(model)}  # dense: only Int8Linear
    for name, mod in int8.items():  # int8 layers take the float weight and quantize it
        params.pop(name + "_codes"), params.pop(name + "_scale")
        params[name] = mod.weight
    m = model.cfg
    filled: set[str] = set()
    for hf_name, tensor in iter_tensors(source.path):
        mapped = from_hf(hf_name, tensor, m) if _known(hf_name) else None
        if mapped is None:
            if _known(hf_name):
                continue  # derived (RoPE frequencies)
            raise CheckpointError(
                f"{source.path}: tensor {hf_name} has no place in a Llama model (biases, other architectures are "
                "not supported)"
            )
        name, value = mapped
        if m.tie_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints store the head too: the embedding is the tensor
        if name not in params:
            raise CheckpointError(f"{source.path}: tensor {hf_name} has no place in this model")
        dest = params[name]
        if tuple(dest.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source.path}: {hf_name} has shape {tuple(value.shape)}, the model built from config.json "
                f"expects {tuple(dest.shape)}; the folder's config.json and weights disagree"
            )
        if name in int8:
            int8[name].load_float_(value)
        else:
            dest.copy_(value)  # cast to the run's dtype one tensor at a time
        filled.add(name)
    expected = {n for n in params if not (m.tie_embeddings and n == "lm_head.weight")}
    missing = sorted(expected - filled)
    if missing:
        raise CheckpointError(f"{source.path}: the weights lack {missing[:3]} ({len(missing)} tensors missing)")


def _known(hf_name: str) -> bool:
    from leanlm.engine.hf.mapping import our_name

    try:
        our_name(hf_name)
    except KeyError:
        return False
    return True


def build_initialised(cfg: RunConfig, source: InitSource, vocab: int, device: torch.device) -> LLaMA:
    """The run's model with the source's weights, LOST-converted afterwards when asked."""
    from leanlm.engine.build import apply_lost, build_model

    dense = dataclasses.replace(cfg.model, lost=dataclasses.replace(cfg.model.lost, enabled=False))
    lost_int8 = cfg.model.lost.enabled and cfg.train.param_dtype == "int8"
    train = dataclasses.replace(cfg.train, param_dtype="bf16", int8_group=0) if lost_int8 else cfg.train
    model = build_model(dataclasses.replace(cfg, model=dense, train=train), vocab, device, restoring=True)
    load_initial_weights(model, source, device)
    if cfg.model.lost.enabled:
        model.cfg = cfg.model
        apply_lost(model, cfg)  # from the bf16 weights; an int8 LOST run quantizes the factors after
        if lost_int8:
            quantize_lost(model)
    return model
