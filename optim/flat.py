"""FRUGAL on DeepSpeed ZeRO's flat partitions: the layout, and the update it allows.

ZeRO-1/2/3 hands the optimizer flat 1-D partitions instead of matrices (ZeRO-1/2: one per group;
ZeRO-3: one per sub-group). A ``FlatSegment`` says which slice of which parameter sits where in
a partition (``leanlm.optim.zero`` reads them off DeepSpeed); ``flat_positions`` turns a subspace
choice on whole matrices into the positions of the partition it covers. ``FlatLayouts`` is what
FRUGAL keeps of them: for ``columns`` and ``randk`` the update on a partition is the randk-style
update at those positions, with the same subspaces and the same moment memory as on whole
matrices. The positions are recomputed from the subspace generator, never saved: they cost no
more state than the subspace indices of whole matrices would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from leanlm.kernels.frugal_update import adam_direction_
from leanlm.optim.projections import num_selected, select_entries, select_indices, subspace_generator
from leanlm.optim.scaled import RULES

FLAT_PROJECTIONS = ("columns", "randk")


@dataclass(frozen=True, kw_only=True)
class FlatSegment:
    """``length`` elements of parameter ``index`` (construction order in the optimizer; shape
    ``shape``), starting at element ``start`` of its flattened form, stored at ``offset`` of the
    flat partition."""

    index: int
    shape: tuple[int, ...]
    start: int
    length: int
    offset: int


def flat_positions(
    segments: list[FlatSegment], *, projection: str, density: float, seed: int, refresh: int
) -> torch.Tensor:
    """Sorted int64 positions of a flat partition that are state-full after ``refresh``.

    For each 2-D segment the subspace is drawn exactly as for the whole matrix (same generator,
    same (seed, index, refresh)), then restricted to the segment: ``columns`` keeps the elements
    whose column is selected, ``randk`` the selected flat entries.
    """
    parts = []
    for s in segments:
        span = torch.arange(s.start, s.start + s.length)  # element ids within the parameter
        m, n = s.shape
        gen = subspace_generator(seed, s.index, refresh)
        if projection == "columns":
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[select_indices(n, num_selected(density, n), gen)] = True
            keep = span[chosen[span % n]]
        elif projection == "randk":
            entries = select_entries(m * n, num_selected(density, m * n), gen).long()
            keep = entries[(entries >= s.start) & (entries < s.start + s.length)]
        else:
            raise ValueError(f"no flat form for projection {projection!r}; use columns or randk")
        parts.append(keep - s.start + s.offset)
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


# combine(p, g, upd, free=..., lr_free=..., put=...): FRUGAL's Adam step on the state-full
# positions plus the state-free step on the rest (``FRUGAL._combine``).
Combine = Callable[..., None]


class FlatLayouts:
    """The flat partitions a FRUGAL optimizer steps, each with its segments (``attach``), and the
    cached state-full positions of each (per refresh)."""

    def __init__(self) -> None:
        self._segments: dict[int, list[FlatSegment]] = {}
        self._positions: dict[int, tuple[int, torch.Tensor]] = {}

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._segments

    def attach(self, flat: torch.Tensor, segments: list[FlatSegment], group: dict[str, Any]) -> None:
        """Declare that ``flat`` holds ``segments`` and steps in ``group``; refuses, in one line,
        the settings that have no flat form."""
        if group["projectable"] and group["state_free"] in RULES:
            raise ValueError(
                f"FRUGAL state_free={group['state_free']!r} needs whole matrices (per-channel norms); on flat "
                "(ZeRO) partitions use state_free='sign', or shard with FSDP2"
            )
        if group["projectable"] and group["projection"] not in FLAT_PROJECTIONS:
            raise ValueError(
                f"FRUGAL on flat (ZeRO) partitions supports projection columns or randk, not {group['projection']!r}"
            )
        if group["projectable"] and any(len(s.shape) != 2 for s in segments):
            raise ValueError(
                "FRUGAL on flat partitions: a projectable group may hold only matrices; put 1-D "
                "tensors in a non-projectable group (frugal_param_groups does)"
            )
        self._segments[id(flat)] = list(segments)
        self._positions.pop(id(flat), None)

    def forget_positions(self) -> None:
        """Drop the cached positions (a loaded state may be at another refresh)."""
        self._positions.clear()

    def positions(self, group: dict[str, Any], p: torch.Tensor, refresh: int) -> torch.Tensor:
        """The state-full positions of partition ``p`` after ``refresh`` (cached until the next)."""
        cached = self._positions.get(id(p))
        if cached is None or cached[0] != refresh:
            pos = flat_positions(
                self._segments[id(p)],
                projection=group["projection"],
                density=group["density"],
                seed=group["seed"],
                refresh=refresh,
            )
            cached = self._positions[id(p)] = (refresh, pos.to(p.device))
        return cached[1]

    def refresh(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]) -> None:
        """The next subspace of partition ``p``: moments for its positions (zeroed unless kept)."""
        refresh = int(st["refresh"]) + 1 if st else 0
        count = self.positions(group, p, refresh).numel()
        if "exp_avg" not in st or group["reset_on_refresh"]:
            st["exp_avg"] = torch.zeros(count, dtype=p.dtype, device=p.device)
            st["exp_avg_sq"] = torch.zeros(count, dtype=p.dtype, device=p.device)
            st["step"] = torch.zeros((), dtype=torch.float32)
        st["age"] = torch.zeros((), dtype=torch.int64)
        st["refresh"] = torch.tensor(refresh, dtype=torch.int64)

    def update(self, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any], combine: Combine) -> None:
        """The randk-style split update of partition ``p`` (1-D) at its state-full positions."""
        g = p.grad
        if g is None:  # FRUGAL steps only tensors with a gradient
            return
        pos = self.positions(group, p, int(st["refresh"]))
        lr_full = group["lr"] * group["proj_lr_scale"]
        st["age"] += 1
        low = g.index_select(0, pos)
        upd = adam_direction_(low, st, group["betas"], group["eps"], lr_full) if low.numel() else low

        def put(values: torch.Tensor, target: torch.Tensor, add: bool) -> None:
            (target.index_add_ if add else target.index_copy_)(0, pos, values.to(target.dtype))

        combine(p, g, upd, free=group["state_free"], lr_free=lr_full * group["state_free_lr_scale"], put=put)
