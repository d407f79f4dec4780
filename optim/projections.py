"""Subspace choices for FRUGAL: which coordinates of a gradient get the state-full optimizer.

Every choice is drawn from a private ``torch.Generator`` seeded by (seed, parameter index, refresh
count): all ranks draw the same subspace with no communication, and a resumed run draws the same
subspace as an uninterrupted one. Nothing here touches the global RNG.

Shapes: a projectable weight is W (m, n) = (out_features, in_features); "columns" are input
features (dim 1), "rows" output features (dim 0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

PROJECTIONS = ("columns", "rows", "randk", "blocks", "svd", "random", "gaussian")
BLOCK_ORDERS = ("descending", "ascending", "random")


def subspace_generator(seed: int, index: int, refresh: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, index, refresh)."""
    digest = hashlib.blake2b(f"leanlm-frugal:{seed}:{index}:{refresh}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))


def num_selected(density: float, size: int) -> int:
    """⌊ρ·size⌋, the count of columns / rows / entries a density selects (the paper's ``int(ρ·n)``)."""
    return int(density * size + 1e-9)


def svd_rank(density: float, shape: tuple[int, int], rank: int | None = None) -> int:
    """r = round(ρ·min(m, n)) for the basis projections (svd, random, gaussian), or the fixed
    ``rank`` when one is given (GaLore / APOLLO recipes name a rank), capped at min(m, n)."""
    return min(rank, min(shape)) if rank else round(density * min(shape))


def select_indices(size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices out of ``size``, sorted, int64 (for columns and rows)."""
    return torch.randperm(size, generator=gen)[:count].sort().values


def select_entries(numel: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat indices out of ``numel``, sorted, stored as int32 (4 B per entry).

    int32 flat indices cost half of what two int64 coordinate tensors would, and suffice for any
    matrix under 2^31 entries (checked).
    """
    if numel >= 2**31:
        raise ValueError(f"randk supports matrices under 2^31 entries, got {numel}")
    return torch.randperm(numel, generator=gen)[:count].sort().values.to(torch.int32)


def select_blocks(n_tensors: int, density: float, *, refresh: int, order: str, gen: torch.Generator) -> list[int]:
    """Which of a group's projectable tensors are state-full after this refresh.

    k = round(ρ·n) tensors, but at least one when ρ > 0: the official FRUGAL ``BlockOptimizer``
    rounds to zero blocks in a group of one or two matrices at ρ 0.25, so BAdam mode (no
    residual) silently never trained them; here every group with projectable tensors trains one.
    ``descending`` starts from the last tensor (the deepest layer) and moves k tensors towards the
    input at each refresh, wrapping around; ``ascending`` the reverse; ``random`` draws k from the
    generator.
    """
    k = max(1, round(density * n_tensors)) if density > 0 and n_tensors else 0
    if k == 0:
        return []
    if order == "random":
        return sorted(torch.randperm(n_tensors, generator=gen)[:k].tolist())
    start = (refresh * k) % n_tensors
    picks = [(start + j) % n_tensors for j in range(k)]
    if order == "descending":
        picks = [n_tensors - 1 - i for i in picks]
    return sorted(picks)


def residual_is_signal(residual: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0-d, in ``residual``'s dtype: 1 when the residual G − P↑P↓G of a basis projection is more
    than round-off, 0 when G lies inside the subspace (its rank at most the basis rank: few tokens
    per step, or a ``rank`` at or above the gradient's) and the residual is only the arithmetic's
    error. The test is the one ``torch.linalg.matrix_rank`` uses for a numerically zero singular
    value, on norms: ‖R‖ <= max(m, n)·eps·‖G‖, eps of the dtype the residual is computed in. No
    host sync (a tensor, multiplied into the step)."""
    eps = torch.finfo(residual.dtype).eps
    tol = max(residual.shape) * eps
    r = torch.linalg.vector_norm(residual)
    g = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, residual.dtype))
    return (r > tol * g).to(residual.dtype)


def svd_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's projector from the top-``rank`` singular vectors of the gradient, in float32.

    Projects the shorter side: m >= n gives B (rank, n) with low = G Bᵀ (m, rank); m < n gives
    A (m, rank) with low = Aᵀ G (rank, n).
    """
    g = grad.float()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    return Vh[:rank].contiguous() if g.shape[0] >= g.shape[1] else U[:, :rank].contiguous()


def random_basis(shape: tuple[int, int], rank: int, gen: torch.Generator) -> torch.Tensor:
    """A random semi-orthogonal projector of the same layout as ``svd_basis`` (QR of a Gaussian)."""
    m, n = shape
    side = n if m >= n else m
    q, r = torch.linalg.qr(torch.randn(side, rank, generator=gen))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # make the factorisation unique
    return q.T.contiguous() if m >= n else q.contiguous()


def gaussian_basis(shape: tuple[int, int], rank: int, gen: torch.Generator) -> torch.Tensor:
    """APOLLO's projector: i.i.d. N(0, 1/r) entries, not orthogonalised, same layout as
    ``svd_basis`` (rank, n) for m >= n, (m, rank) otherwise. It only estimates norms (APOLLO scales
    the full gradient), so it needs no orthogonality, and it costs no SVD or QR."""
    m, n = shape
    size = (rank, n) if m >= n else (m, rank)
    return torch.randn(size, generator=gen).div_(rank**0.5)


def project_down(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(m, n) -> (m, r) on the right or (r, n) on the left, in float32."""
    g = grad.float()
    return g @ basis.T if g.shape[0] >= g.shape[1] else basis.T @ g


def project_up(
    low: torch.Tensor, basis: torch.Tensor, shape: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The inverse map of ``project_down``: back to (m, n), in float32 (into ``out`` if given)."""
    m, n = shape
    return torch.matmul(low, basis, out=out) if m >= n else torch.matmul(basis, low, out=out)


# ----------------------------------------------------------------------------- the table

Grad = Callable[[], torch.Tensor]  # the whole gradient, fetched only by the kinds that need it


# What a kind lacks (a basis has no coordinates to put into, coordinates need no lift, blocks have
# no subspace inside a matrix): callers check ``coordinates`` / refuse blocks before reaching these.
def _no_put(values: torch.Tensor, st: dict, target: torch.Tensor, add: bool) -> None:
    raise NotImplementedError("a basis projection has no coordinates to put into: lift instead")


def _no_lift(values: torch.Tensor, st: dict, shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
    raise NotImplementedError("a coordinate projection needs no lift: put instead")


def _no_channels(x: torch.Tensor, st: dict, shape: tuple[int, int]) -> torch.Tensor:
    raise NotImplementedError("blocks have no subspace inside a matrix to measure channels in")


@dataclass(frozen=True)
class Projection:
    """One subspace kind, as FRUGAL's update uses it (all state is plain tensors in ``st``).

    ``draw(shape, density, gen, grad)`` -> (state tensors, the moments' shape, their dtype or None
    for the parameter's). ``down(g, st)`` -> the state-full part of ``g``, moment-shaped (P↓G).
    Coordinate kinds (a set of columns, rows, entries or a whole tensor) put values back with
    ``put(values, st, target, add)``, writing (``add=False``) or adding into ``target`` (m, n), and
    their state-free part is the exact complement. Basis kinds (svd, random) ``lift(values, st,
    shape, out)`` back to (m, n) instead, and their state-free part is the residual G − P↑P↓G.
    ``whole``: every coordinate is state-full (an active block). ``fused``: the kernels' columns /
    rows update (``leanlm.kernels.frugal_update``) does the whole step. ``channels(x, st, shape)``:
    per-channel sums of a moment-shaped ``x``, shaped to broadcast over (m, n) (see
    ``leanlm.optim.scaled``); it raises where there is no subspace inside the matrix (blocks).
    """

    # draw(shape, density, gen, grad, rank=None): rank, when given, fixes a basis kind's rank
    draw: Callable[..., tuple[dict, tuple[int, ...], torch.dtype | None]]
    down: Callable[[torch.Tensor, dict], torch.Tensor]
    put: Callable[[torch.Tensor, dict, torch.Tensor, bool], None] = _no_put
    lift: Callable[..., torch.Tensor] = _no_lift
    whole: bool = False
    fused: bool = False
    moment_dtype: torch.dtype | None = None  # what ``draw`` gives: None for the parameter's dtype
    channels: Callable[[torch.Tensor, dict, tuple[int, int]], torch.Tensor] = _no_channels

    @property
    def coordinates(self) -> bool:
        return self.put is not _no_put


def _put_index(dim: int) -> Callable[[torch.Tensor, dict, torch.Tensor, bool], None]:
    def put(values: torch.Tensor, st: dict, target: torch.Tensor, add: bool) -> None:
        (target.index_add_ if add else target.index_copy_)(dim, st["index"], values.to(target.dtype))

    return put


def _put_entries(values: torch.Tensor, st: dict, target: torch.Tensor, add: bool) -> None:
    flat = target.view(-1)
    (flat.index_add_ if add else flat.index_copy_)(0, st["index"].long(), values.to(target.dtype))


def _put_whole(values: torch.Tensor, st: dict, target: torch.Tensor, add: bool) -> None:
    target.add_(values) if add else target.copy_(values)


def _lift(values: torch.Tensor, st: dict, shape: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    return project_up(values, st["basis"], shape, out=out)


def _down_basis(g: torch.Tensor, st: dict) -> torch.Tensor:
    return project_down(g, st["basis"])


def _draw_columns(shape, density, gen, grad, rank=None):
    index = select_indices(shape[1], num_selected(density, shape[1]), gen)
    return {"index": index}, (shape[0], index.numel()), None


def _draw_rows(shape, density, gen, grad, rank=None):
    index = select_indices(shape[0], num_selected(density, shape[0]), gen)
    return {"index": index}, (index.numel(), shape[1]), None


def _draw_entries(shape, density, gen, grad, rank=None):
    numel = shape[0] * shape[1]
    index = select_entries(numel, num_selected(density, numel), gen)
    return {"index": index}, (index.numel(),), None


def _draw_basis(kind: str):
    def draw(shape, density, gen, grad, rank=None):
        (m, n), r = shape, svd_rank(density, shape, rank)
        if kind == "svd":
            basis = svd_basis(grad(), r)
        else:
            basis = (random_basis if kind == "random" else gaussian_basis)(shape, r, gen)
        return {"basis": basis}, ((m, r) if m >= n else (r, n)), torch.float32  # moments on the basis side

    return draw


def _draw_group(shape, density, gen, grad, rank=None):
    raise RuntimeError("blocks are drawn for the whole group at once (select_blocks)")


# Channels (Fira / APOLLO): a row of W when the subspace spans columns, else a column; for the basis
# kinds that is the side the basis does not project (GaLore's layout: rows when m >= n).
def _row_sums(x: torch.Tensor, st: dict, shape: tuple[int, int]) -> torch.Tensor:
    return x.sum(dim=1, keepdim=True)  # (m, 1)


def _column_sums(x: torch.Tensor, st: dict, shape: tuple[int, int]) -> torch.Tensor:
    return x.sum(dim=0, keepdim=True)  # (1, n)


def _entry_row_sums(x: torch.Tensor, st: dict, shape: tuple[int, int]) -> torch.Tensor:
    rows = st["index"].long().div(shape[1], rounding_mode="floor")  # each selected entry's row
    return torch.zeros(shape[0], 1, dtype=x.dtype, device=x.device).index_add_(0, rows, x.unsqueeze(1))


def _basis_sums(x: torch.Tensor, st: dict, shape: tuple[int, int]) -> torch.Tensor:
    return _row_sums(x, st, shape) if shape[0] >= shape[1] else _column_sums(x, st, shape)


def _basis_kind(kind: str) -> Projection:
    return Projection(_draw_basis(kind), _down_basis, lift=_lift, moment_dtype=torch.float32, channels=_basis_sums)


PROJECTORS: dict[str, Projection] = {
    "columns": Projection(
        _draw_columns, lambda g, st: g.index_select(1, st["index"]), _put_index(1), fused=True, channels=_row_sums
    ),
    "rows": Projection(
        _draw_rows, lambda g, st: g.index_select(0, st["index"]), _put_index(0), fused=True, channels=_column_sums
    ),
    "randk": Projection(
        _draw_entries,
        lambda g, st: g.reshape(-1).index_select(0, st["index"].long()),
        _put_entries,
        channels=_entry_row_sums,
    ),
    "blocks": Projection(_draw_group, lambda g, st: g, _put_whole, whole=True),
    "svd": _basis_kind("svd"),
    "random": _basis_kind("random"),
    "gaussian": _basis_kind("gaussian"),
}
assert tuple(PROJECTORS) == PROJECTIONS
