"""The one table between leanlm's LLaMA and Hugging Face's ``LlamaForCausalLM``, used by export and
import alike (so the two cannot drift): config fields, tensor names, and the RoPE row permutation.

Our rotary embedding rotates interleaved pairs (x[2i], x[2i+1]) (Meta's layout); transformers
rotates halves (x[i], x[i + hd/2]). The two compute the same attention when the rows of q_proj and
k_proj (and anything else indexed by their output rows) are permuted per head: leanlm's rows
[re0, im0, re1, im1, ...] are transformers' [re0, re1, ..., im0, im1, ...]. ``to_hf`` applies that
permutation, ``from_hf`` its inverse; both are exact (a gather), so a round trip is bitwise.

Torch-free apart from the tensor transforms: the config half runs without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from leanlm.engine.config.schema import ModelConfig
from leanlm.engine.errors import ConfigError

# Model keys that an HF config.json sets (the shape); a run's other model.* keys are its own.
SHAPE_KEYS = (
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
    "norm_eps",
    "tie_embeddings",
)

# HF architectures that are this model when their config says so (the rest is refused by name).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class Special:
    """The special token ids a config.json carries (None: the tokenizer has no such token)."""

    bos: int | None
    eos: int | None
    pad: int | None = None


def hf_config(
    m: ModelConfig, *, vocab_size: int, seq_len: int, dtype: str, special: Special, lost: dict | None = None
) -> dict[str, Any]:
    """config.json for ``LlamaForCausalLM``: every field written explicitly, in the keys both
    transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5.x
    (``rope_parameters``, ``dtype``) read, so neither falls back to a default of its own."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    scaling = None
    if m.rope_scaling == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len,
        }
        rope = {**scaling, "rope_theta": m.rope_theta}
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": m.tie_embeddings,
        "vocab_size": vocab_size,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if lost:  # restored by leanlm.optim.lost.from_pretrained
        out["leanlm_lost"] = lost
    return out


def _refuse(path: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {what}; train.init_from takes Llama-family models (LlamaForCausalLM, Mistral)")


def model_keys_from_hf(config: dict[str, Any], path: str = "config.json") -> tuple[dict[str, Any], int, Special]:
    """(model.* keys, max_position_embeddings, special ids) of an HF config.json; anything this
    model does not compute the same way is refused in one line naming the field."""
    mtype = config.get("model_type")
    if mtype not in ARCHITECTURES:
        raise _refuse(path, f"model_type={mtype!r} is not supported")
    archs = config.get("architectures") or [ARCHITECTURES[mtype]]
    if archs != [ARCHITECTURES[mtype]]:
        raise _refuse(path, f"architectures={archs} is not supported")
    if mtype == "mistral" and config.get("sliding_window") is not None:
        raise _refuse(path, f"sliding_window={config['sliding_window']} is not supported (only full attention)")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ok) != ok:
            raise _refuse(path, f"{key}={config[key]!r} is not supported (leanlm's LLaMA has {key}={ok!r})")
    for key in ("num_local_experts", "num_experts", "moe_intermediate_size"):
        if config.get(key):
            raise _refuse(path, f"{key}={config[key]!r}: mixture-of-experts models are not supported")
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != d:
        raise _refuse(path, f"head_dim={head_dim} is not hidden_size / num_attention_heads = {d // heads}")
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    keys: dict[str, Any] = {
        "d_model": d,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "ffn_dim": int(config["intermediate_size"]),
        "vocab_size": int(config["vocab_size"]),
        "rope_theta": float(theta),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "rope_scaling": "none",
    }
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise _refuse(path, f"rope_scaling type {kind!r} is not supported (default and llama3 are)")
        keys.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    if keys["n_heads"] % keys["n_kv_heads"]:
        raise _refuse(path, f"num_attention_heads={heads} is not a multiple of num_key_value_heads")

    def first(v: Any) -> int | None:
        return int(v[0]) if isinstance(v, list) and v else (int(v) if isinstance(v, int) else None)

    special = Special(
        first(config.get("bos_token_id")), first(config.get("eos_token_id")), first(config.get("pad_token_id"))
    )
    return keys, int(config.get("max_position_embeddings") or 0), special


# ----------------------------------------------------------------------------- tensor names

# (leanlm name, HF name) patterns; ``{i}`` is the layer index. Our module names were chosen to be
# HF's without the "model." prefix, so the table is mostly that prefix, but it is the one place
# that says so. ``lm_head`` is absent from a tied HF file.
_NAMES = (
    ("embed_tokens.{rest}", "model.embed_tokens.{rest}"),
    ("layers.{i}.{rest}", "model.layers.{i}.{rest}"),
    ("norm.{rest}", "model.norm.{rest}"),
    ("lm_head.{rest}", "lm_head.{rest}"),
)
_PATTERNS = [
    (
        re.compile(
            "^" + ours.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)").replace("{rest}", r"(?P<rest>.+)") + "$"
        ),
        hf,
    )
    for ours, hf in _NAMES
]
_HF_PATTERNS = [
    (
        re.compile("^" + hf.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)").replace("{rest}", r"(?P<rest>.+)") + "$"),
        ours,
    )
    for ours, hf in _NAMES
]

# HF files of older transformers versions store the RoPE frequencies: derived, never loaded.
IGNORED_HF = re.compile(r"\.rotary_emb\.inv_freq$")


def hf_name(name: str) -> str:
    """Our tensor name -> the HF name."""
    for pattern, hf in _PATTERNS:
        m = pattern.match(name)
        if m:
            return hf.format(**m.groupdict())
    raise KeyError(name)


def our_name(name: str) -> str | None:
    """An HF tensor name -> ours (None for tensors HF stores that we derive)."""
    if IGNORED_HF.search(name):
        return None
    for pattern, ours in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return ours.format(**m.groupdict())
    raise KeyError(name)


# Tensors whose dim ``axis`` runs over q_proj's or k_proj's output rows: the rows of a dense weight,
# a LOST layer's low-rank output factor B (r, m) and sparse values W_s (m, k).
_ROTATED = re.compile(r"self_attn\.(?P<proj>q_proj|k_proj)\.(?P<param>weight|lowrank_out|sparse)$")


def rotary_axis(name: str) -> tuple[str, int] | None:
    """('q_proj' | 'k_proj', the axis of output rows) when ``name`` needs the RoPE permutation."""
    m = _ROTATED.search(name)
    if m is None:
        return None
    return m.group("proj"), 1 if m.group("param") == "lowrank_out" else 0
