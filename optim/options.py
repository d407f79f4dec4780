"""FRUGAL's hyperparameters: the choices each takes and the check that names a bad one (their
defaults: ``leanlm.optim.defaults``)."""

from __future__ import annotations

from typing import Any

import torch

from leanlm.optim.projections import BLOCK_ORDERS, PROJECTIONS
from leanlm.optim.scaled import RULES, SCALINGS

STATE_FREE = ("sign", "sgd", "none", *RULES)


def check_lr(lr: Any) -> None:
    """torch's rule for ``lr``: a number, or a 1-element tensor."""
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_group(group: dict[str, Any]) -> None:
    """Reject bad hyperparameters at construction with a message that names the key."""
    check_lr(group["lr"])
    problems = []
    if group["projection"] not in PROJECTIONS:
        problems.append(f"projection={group['projection']!r} (choose {', '.join(PROJECTIONS)})")
    if group["state_free"] not in STATE_FREE:
        problems.append(f"state_free={group['state_free']!r} (choose {', '.join(STATE_FREE)})")
    if group["state_free"] in RULES and group["projection"] == "blocks":
        problems.append(
            f"state_free={group['state_free']!r} with projection='blocks' (the ratio is measured inside each "
            "matrix; blocks leaves inactive matrices no subspace: choose another projection or state_free)"
        )
    if group["state_free"] in RULES and group["density"] == 0 and not group["rank"]:
        problems.append(
            f"state_free={group['state_free']!r} with density=0 (its ratio is measured in the subspace: "
            "set density > 0 or rank)"
        )
    if group["scaling"] not in SCALINGS:
        problems.append(f"scaling={group['scaling']!r} (choose {', '.join(SCALINGS)})")
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.append(f"rank={rank!r} (None for density x min(m, n), or an int >= 1)")
    if group["block_order"] not in BLOCK_ORDERS:
        problems.append(f"block_order={group['block_order']!r} (choose {', '.join(BLOCK_ORDERS)})")
    if not 0.0 <= group["density"] <= 1.0:
        problems.append(f"density={group['density']} (must be in [0, 1])")
    if int(group["update_gap"]) < 1:
        problems.append(f"update_gap={group['update_gap']} (must be >= 1)")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        problems.append(f"betas={group['betas']} (must be in [0, 1))")
    if group["lr"] < 0 or group["eps"] < 0 or group["weight_decay"] < 0:
        problems.append("lr, eps and weight_decay must be >= 0")
    if problems:
        raise ValueError("FRUGAL: invalid " + "; ".join(problems))
