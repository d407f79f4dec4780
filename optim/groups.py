"""Which parameters FRUGAL may split: linear weights inside transformer blocks, by name.

Works for our LLaMA (``layers.3.mlp.up_proj.weight``), Hugging Face models
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``,
``encoder.layer.0.attention.self.query.weight``) and any module tree that follows those names.
Embeddings, the output head, norms, biases and every 1-D tensor stay state-full (plain AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# A 2-D weight is projectable when its module path contains one of these...
BLOCK_LINEAR_KEYS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "attn",
    "attention",
    "mlp",
    "query",
    "key",
    "value",
    "dense",
    "fc1",
    "fc2",
    "c_fc",
    "c_proj",
    "lowrank_in",
    "lowrank_out",
    "sparse",
)
# ...and none of these (they are always state-full, as in the FRUGAL paper).
STATE_FULL_KEYS = (
    "embed",
    "wte",
    "wpe",
    "lm_head",
    "norm",
    "ln_",
    "layernorm",
    "classifier",
    "pooler",
)


def is_projectable_name(name: str, tensor: torch.Tensor) -> bool:
    lowered = name.lower()
    if tensor.ndim != 2 or any(k in lowered for k in STATE_FULL_KEYS):
        return False
    return any(k in lowered for k in BLOCK_LINEAR_KEYS)


def is_named_params(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items)


def frugal_param_groups(
    model_or_named: nn.Module | Iterable[tuple[str, torch.Tensor]], names: bool = False, **projectable_options: Any
) -> list[dict[str, Any]]:
    """Two groups: ``{"params": projectable, "projectable": True, **projectable_options}`` and
    ``{"params": the rest, "projectable": False}``. Frozen parameters are left out. ``names``:
    the groups hold ``(name, tensor)`` pairs (torch >= 2.6 optimizers and FRUGAL keep the names)."""
    named = model_or_named.named_parameters() if isinstance(model_or_named, nn.Module) else model_or_named
    proj, rest = [], []
    for name, p in named:
        if p.requires_grad:
            (proj if is_projectable_name(name, p) else rest).append((name, p) if names else p)
    return [
        {"params": proj, "projectable": True, **projectable_options},
        {"params": rest, "projectable": False},
    ]
