"""Which parameters FRUGAL may split: linear weights inside transformer blocks, by name.

The rule: a 2-D tensor whose path contains one of ``BLOCK_LINEAR_KEYS`` and none of
``STATE_FULL_KEYS``, and none of whose path components is one of ``STATE_FULL_PARTS``. It knows
our LLaMA (``layers.3.mlp.up_proj.weight``), the Hugging Face decoder and encoder families
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``,
``encoder.layer.0.attention.self.query.weight``), ``nn.TransformerEncoderLayer`` (``linear1``,
``in_proj_weight``) and Mamba's projections. It leaves state-full: embeddings, output and task
heads, norms, biases, 1-D tensors, MoE routers (a component named ``gate`` or ``router``),
relative-position tables (T5's ``relative_attention_bias``) and 3-D fused expert weights (see
``FRUGAL``'s warning). For any other tree pass a ``rule`` to ``frugal_param_groups`` (or group
dicts with ``"projectable"``): that is the supported way to choose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    "linear1",
    "linear2",
    "in_proj",
    "out_proj",
    "x_proj",
    "dt_proj",
    "experts",
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


# ...and no path component equal to one of these (routers, position tables, task heads).
STATE_FULL_PARTS = (
    "gate",
    "router",
    "relative_attention_bias",
    "relative_position_bias",
    "rel_pos",
    "cls",
    "head",
    "score",
    "qa_outputs",
)


def is_projectable_name(name: str, tensor: torch.Tensor) -> bool:
    """The default rule (module docstring): may FRUGAL split ``tensor``, called ``name``?"""
    lowered = name.lower()
    if tensor.ndim != 2 or any(k in lowered for k in STATE_FULL_KEYS):
        return False
    if any(part in STATE_FULL_PARTS for part in lowered.split(".")):
        return False
    return any(k in lowered for k in BLOCK_LINEAR_KEYS)


def is_named_params(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items)


def frugal_param_groups(
    model_or_named: nn.Module | Iterable[tuple[str, torch.Tensor]],
    names: bool = False,
    rule: Callable[[str, torch.Tensor], bool] = is_projectable_name,
    **projectable_options: Any,
) -> list[dict[str, Any]]:
    """Two groups: ``{"params": projectable, "projectable": True, **projectable_options}`` and
    ``{"params": the rest, "projectable": False}``. Frozen parameters are left out. ``names``:
    the groups hold ``(name, tensor)`` pairs (torch >= 2.6 optimizers and FRUGAL keep the names).
    ``rule(name, tensor)``: which tensors are projectable (default: ``is_projectable_name``), e.g.
    ``lambda n, p: p.ndim == 2 and ".mixer." in n`` for a tree the default does not know."""
    named = model_or_named.named_parameters() if isinstance(model_or_named, nn.Module) else model_or_named
    proj: list[Any] = []  # tensors, or (name, tensor) pairs with ``names``
    rest: list[Any] = []
    for name, p in named:
        if p.requires_grad:
            (proj if rule(name, p) else rest).append((name, p) if names else p)
    return [
        {"params": proj, "projectable": True, **projectable_options},
        {"params": rest, "projectable": False},
    ]


def short_list(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` names and how many more (for one-line messages)."""
    return ", ".join(names[:shown]) + (f", ... (+{len(names) - shown})" if len(names) > shown else "")


def as_groups(params: Iterable[Any], who: str) -> list[dict[str, Any]]:
    """Tensors, (name, tensor) pairs or group dicts -> group dicts (``add_param_group`` splits
    named ones by the name rule unless they say ``projectable``)."""
    if torch.is_tensor(params):  # torch's message: a bare tensor would be iterated row by row
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    params = list(params)
    if not params:
        raise ValueError(f"{who} got an empty parameter list")
    if isinstance(params[0], dict):
        return [dict(g) for g in params]
    return [{"params": params}]


def check_naming(saved: list[dict[str, Any]], mine: list[dict[str, Any]]) -> None:
    """Refuse, in one line, a state whose groups come from the other way of passing parameters."""
    saved_named, mine_named = (any("param_names" in g for g in groups) for groups in (saved, mine))
    if saved_named == mine_named or len(saved) == len(mine):
        return
    how = "model.named_parameters()" if saved_named else "model.parameters() (bare tensors)"

    def kind(named: bool, n: int) -> str:
        return f"{'named' if named else 'unnamed'} parameters ({n} group{'' if n == 1 else 's'})"

    raise ValueError(
        f"FRUGAL: this state was saved by a FRUGAL built from {kind(saved_named, len(saved))}, this one from "
        f"{kind(mine_named, len(mine))}; with names the embedding, head and norms stay state-full, without them "
        f"every 2-D tensor is split: build it from {how} to load it"
    )
