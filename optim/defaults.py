"""FRUGAL's group keys and their defaults: one table.

The constructor's signature reads its defaults from ``GROUP_DEFAULTS`` (and refuses a keyword the
table lacks), the presets take theirs from it, the optimizer registry derives FRUGAL's settings
from it, and ``FRUGAL.__setstate__`` (which ``load_state_dict`` ends in) fills every key a saved
group lacks from it, so a state saved before a key existed resumes, as torch's optimizers fill
theirs. A new group key is one line here. Torch-free: the registry (which the config reads) and
the config read it without torch.
"""

from __future__ import annotations

from typing import Any

GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "density": 0.25,  # state-full fraction of columns / rows / entries / rank / tensors
    "projection": "columns",
    "update_gap": 200,  # steps between subspace refreshes
    "state_free": "sign",
    "state_free_lr_scale": 1.0,
    "proj_lr_scale": 1.0,
    "reset_on_refresh": True,
    "block_order": "descending",
    "seed": 0,
    "scaling": "channel",
    "rank": None,  # None: density x min(m, n)
    "projectable": True,  # per group: whether its 2-D tensors are split
}
