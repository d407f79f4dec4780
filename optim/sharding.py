"""How FRUGAL sees FSDP2's sharded parameters (``DTensor`` shards; ZeRO's flat partitions are
``leanlm.optim.flat``'s).

FSDP2 (``fully_shard``) shards every parameter on dim 0 (``Shard(0)``, torch.chunk sizes): a rank
holds whole rows, so it holds every column of its rows. Column-wise state (the ``columns``
projection's moments, shape (m, k)) is therefore sharded exactly like the parameter and needs no
communication; we keep it as a ``DTensor`` with the parameter's placement so that
``torch.distributed.checkpoint`` saves each rank's rows (plain per-rank tensors would be taken as
replicated and collapsed to one rank's copy) and reshards it on a different world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor, Shard
else:
    try:  # torch >= 2.5
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch 2.4
        try:
            from torch.distributed._tensor import DTensor, Shard
        except ImportError:  # a build without distributed support
            DTensor, Shard = None, None


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (shares storage: in-place ops update the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def local_view(state: dict[str, Any]) -> dict[str, Any]:
    """The same state with DTensors replaced by their local tensors (scalars stay the same objects,
    so in-place step counters still update the real state)."""
    return {k: local(v) if torch.is_tensor(v) else v for k, v in state.items()}


def _check_row_sharded(p: DTensor) -> None:
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"FRUGAL supports parameters sharded on dim 0 over a 1-D mesh (FSDP2), got {placements} "
            f"on a {mesh.ndim}-D mesh"
        )


def row_range(p: DTensor) -> tuple[int, int]:
    """[lo, hi): the global rows this rank holds of a ``Shard(0)`` DTensor (torch.chunk layout)."""
    _check_row_sharded(p)
    m, world = p.shape[0], p.device_mesh.size()
    chunk = -(-m // world)
    lo = min(p.device_mesh.get_local_rank() * chunk, m)
    return lo, lo + p.to_local().shape[0]


def sharded_zeros(p: DTensor, shape: tuple[int, ...], dtype: torch.dtype) -> DTensor:
    """Zeros of global ``shape`` whose rows are sharded like the DTensor ``p``'s rows."""
    _check_row_sharded(p)
    lo, hi = row_range(p)
    local_t = torch.zeros((hi - lo, *shape[1:]), dtype=dtype, device=p.to_local().device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local_t,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def mesh_sum(p: DTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """For one rank's rows of the sharded matrix ``p``: partial sums -> the sum over its mesh
    (in place, one all-reduce)."""
    import torch.distributed as tdist

    def total(t: torch.Tensor) -> torch.Tensor:
        tdist.all_reduce(t, group=p.device_mesh.get_group())
        return t

    return total


def whole_grad(p: torch.Tensor) -> torch.Tensor:
    """All of ``p``'s gradient: gathered from the shards of a DTensor (every rank gets all of it)."""
    g = cast(torch.Tensor, p.grad)  # called for tensors with a gradient
    return g.full_tensor() if is_dtensor(g) else g
