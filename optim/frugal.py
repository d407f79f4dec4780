"""FRUGAL (Zmushko et al., ICML 2025): AdamW on a state-full subspace, signSGD on the rest.

For each projectable matrix W (m, n) with gradient G, every ``update_gap`` steps (group-wide
cadence) a subspace is chosen: ⌊ρ·n⌋ columns, ⌊ρ·m⌋ rows, ⌊ρ·m·n⌋ entries (randk), ρ of the
group's tensors (blocks), or a rank-round(ρ·min(m, n)) basis (svd: top singular vectors of G;
random: semi-orthogonal). The step then is::

    W <- W·(1 − lr·λ)                                    decoupled weight decay, every parameter
    U  = AdamW(P↓G) lifted back by P↑, at lr·proj_lr_scale   the state-full part
    U += −lr·proj_lr_scale·state_free_lr_scale·sign(G − P↑P↓G)   the state-free part ("sign")
    W <- W + U

For columns/rows/randk/blocks the residual is exactly the complement (disjoint coordinates); for
svd/random/gaussian it is the dense orthogonal-complement residual, and the sign step is skipped when
that residual is round-off (``projections.residual_is_signal``). ``state_free="sgd"`` uses the
raw residual, ``"none"`` drops it (plain low-rank or block training: GaLore and BAdam are presets of
this class, see ``leanlm.optim.presets``). ``"fira"`` scales the residual per channel by the ratio
of the Adam direction's norm to the gradient's norm in the subspace, and ``"apollo"`` scales the
whole gradient so (no separate Adam step); both with Fira's norm-growth limiter, per channel or per
tensor (``scaling``); see ``leanlm.optim.scaled``. Non-projectable parameters (embeddings, head, norms,
1-D tensors) get plain AdamW. On a refresh the moments of the new subspace are zeroed and bias
correction restarts (``reset_on_refresh=True``, the paper's setting).

Optimizer state holds tensors only (moments, a step count, the refresh count, the subspace
indices or basis), so ``torch.load(weights_only=True)`` round-trips it; subspaces come from a
private generator seeded by (seed, parameter index, refresh count), so ranks agree without
communication and a resumed run picks the same subspaces.

Sharded parameters (see ``leanlm.optim.sharding``): under FSDP2 (``DTensor``, rows sharded) the
``columns`` and ``blocks`` updates run on the local rows with no communication and keep their
moments sharded like the parameter; ``rows``, ``randk``, ``svd`` and ``random`` gather the full
gradient (one all-gather per matrix per step), compute the update redundantly on every rank and
keep their state replicated (every rank holds all of it). Under DeepSpeed ZeRO-1/2/3 the optimizer
sees flat 1-D partitions; ``attach_flat_layout`` (or ``leanlm.optim.zero.attach_deepspeed``) maps
them back to the parameters' (offset, shape) so ``columns`` and ``randk`` become masks on the flat
slice with the same subspaces and the same moment memory as on whole matrices
(``leanlm.optim.flat``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch

from leanlm.kernels.frugal_update import (
    adam_direction_,
    adam_foreach_,
    frugal_update,
    inverse_index,
    state_free_update,
    use_triton,
)
from leanlm.optim.defaults import GROUP_DEFAULTS
from leanlm.optim.flat import FlatLayouts, FlatSegment
from leanlm.optim.groups import (
    BLOCK_LINEAR_KEYS,
    as_groups,
    check_naming,
    frugal_param_groups,
    is_named_params,
    short_list,
)
from leanlm.optim.memory import state_bytes
from leanlm.optim.options import check_group
from leanlm.optim.projections import (
    PROJECTORS,
    residual_is_signal,
    select_blocks,
    subspace_generator,
)
from leanlm.optim.scaled import RULES, same, scaled_update_
from leanlm.optim.sharding import (
    is_dtensor,
    local,
    local_view,
    mesh_sum,
    row_range,
    sharded_zeros,
    whole_grad,
)

_D = GROUP_DEFAULTS  # the constructor's defaults (one table: leanlm.optim.defaults)


class FRUGAL(torch.optim.Optimizer):
    """Drop-in ``torch.optim.Optimizer``; see the module docstring for the update rule.

    ``params``: tensors (2-D ones are projectable), ``(name, tensor)`` pairs such as
    ``model.named_parameters()`` (linear weights inside transformer blocks are projectable;
    embeddings, head, norms and 1-D tensors stay state-full), or group dicts, where
    ``projectable: bool`` and every keyword below may be set per group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = _D["lr"],
        betas: tuple[float, float] = _D["betas"],
        eps: float = _D["eps"],
        weight_decay: float = _D["weight_decay"],
        density: float = _D["density"],
        projection: str = _D["projection"],
        update_gap: int = _D["update_gap"],
        state_free: str = _D["state_free"],
        state_free_lr_scale: float = _D["state_free_lr_scale"],
        proj_lr_scale: float = _D["proj_lr_scale"],
        reset_on_refresh: bool = _D["reset_on_refresh"],
        block_order: str = _D["block_order"],
        seed: int = _D["seed"],
        scaling: str = _D["scaling"],
        rank: int | None = _D["rank"],
    ) -> None:
        # every keyword, by name (the signature is the table's keys; a new keyword without a table
        # entry is refused below, so every group key can be filled when an older state loads)
        given = {k: v for k, v in locals().items() if k not in ("self", "params", "__class__")}
        given["betas"] = tuple(betas)
        if given.keys() - GROUP_DEFAULTS.keys():  # a keyword added without a default to fill old states
            raise RuntimeError(f"FRUGAL: {sorted(given.keys() - GROUP_DEFAULTS.keys())} missing from GROUP_DEFAULTS")
        defaults = {**GROUP_DEFAULTS, **given}
        check_group(defaults)  # hyperparameters before parameters, as torch's optimizers check them
        # Stable parameter index (the order parameters joined) for the subspace generator's seed;
        # filled by add_param_group, which the base class calls for each group.
        self._index: dict[int, int] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        # DeepSpeed ZeRO-1/2/3: the flat partitions stepped instead of matrices (leanlm.optim.flat).
        self._flat = FlatLayouts()
        # Fused kernel: parameter -> (the index it was built from, its inverse map).
        self._inverses: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        groups = as_groups(params, who="FRUGAL")
        super().__init__(groups, defaults)
        self._warn_unsplit()

    def _warn_unsplit(self) -> None:
        """Say so when names were given but nothing (or a fused 3-D tensor) will be split."""
        if any("param_names" in g for g in self.param_groups) and not self.projectable_names():
            warnings.warn(
                "FRUGAL: no parameter name matched the projectable rule (linear weights inside transformer "
                "blocks: q_proj, mlp, attention, ...), so every tensor gets plain AdamW; pass group dicts "
                'with "projectable": True for the matrices to split (see FRUGAL.describe())',
                stacklevel=3,
            )
        fused = [
            (n, p) for n, p, _ in self._described() if p.ndim > 2 and any(k in n.lower() for k in BLOCK_LINEAR_KEYS)
        ]
        if fused:
            dims = "/".join(sorted({str(p.ndim) for _, p in fused}))
            warnings.warn(
                f"FRUGAL: {short_list([n for n, _ in fused])} are {dims}-D "
                "(fused MoE experts?) and get plain AdamW; to split them, register each expert's 2-D weight as its "
                "own parameter (or view them per expert) and pass them in a projectable group",
                stacklevel=3,
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base class's, plus FRUGAL's own bookkeeping: hyperparameters checked (a bad one
        leaves the optimizer as it was), each new tensor given its subspace-seed index, and
        ``(name, tensor)`` pairs split by the name rule into a projectable and a state-full group
        (names kept in ``param_names``, as torch's optimizers keep them)."""
        group = dict(param_group)
        if torch.is_tensor(group.get("params")):
            group["params"] = [group["params"]]
        items = list(group.get("params", []))
        if items and is_named_params(items) and "projectable" not in group:
            rest = {k: v for k, v in group.items() if k != "params"}
            for sub in frugal_param_groups(items, names=True):
                if sub["params"]:
                    self.add_param_group({**rest, **sub})
            return
        if items and is_named_params(items):
            group["param_names"] = [name for name, _ in items]
            group["params"] = [t for _, t in items]
        elif self.param_groups and "param_names" in self.param_groups[0] and "param_names" not in group:
            start = len(self._index)  # unnamed tensors joining named groups: names by position
            group["param_names"] = [f"param.{start + i}" for i in range(len(items))]
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        check_group(group)
        super().add_param_group(group)
        for p in self.param_groups[-1]["params"]:
            self._index.setdefault(id(p), len(self._index))

    def projectable_names(self) -> list[str]:
        """Names of the tensors FRUGAL splits (positions ``param.<i>`` when it was given no names)."""
        return [name for name, _, split in self._described() if split]

    def _names(self, group: dict[str, Any]) -> list[str]:
        return group.get("param_names") or [f"param.{self._index[id(p)]}" for p in group["params"]]

    def _described(self) -> list[tuple[str, torch.Tensor, bool]]:
        """(name, tensor, split?) for every tensor, group by group."""
        return [
            (n, p, self.is_projectable(g, p))
            for g in self.param_groups
            for n, p in zip(self._names(g), g["params"], strict=True)
        ]

    def describe(self) -> str:
        """One line per group and a total: what is split (AdamW on a subspace + the state-free
        rule on the rest) and what gets plain AdamW, by name, with the state each holds now."""
        lines = []
        for i, group in enumerate(self.param_groups):
            rows = [
                (n, self.is_projectable(group, p)) for n, p in zip(self._names(group), group["params"], strict=True)
            ]
            split = [n for n, s in rows if s]
            dense = [n for n, s in rows if not s]
            what = (
                f"split ({group['projection']}, density {group['density']:g}, state-free {group['state_free']}, "
                f"refresh every {group['update_gap']})"
            )
            if split:
                lines.append(f"group {i}: {len(split)} {what}: {short_list(split)}")
            if dense:
                lines.append(f"group {i}: {len(dense)} plain AdamW: {short_list(dense)}")
        n_split, n_all, state = len(self.projectable_names()), len(self._index), state_bytes(self)
        lines.append(f"total: {n_split} of {n_all} tensors split; optimizer state now {state:,} bytes")
        return "\n".join(lines)

    def param_index(self, p: torch.Tensor) -> int:
        """The parameter's position at construction: it seeds the subspace generator."""
        return self._index[id(p)]

    def attach_flat_layout(self, flat: torch.Tensor, segments: list[FlatSegment], group: dict | None = None) -> None:
        """Declare that ``flat`` (a 1-D partition that replaced a group's parameters) holds
        ``segments`` of the original parameters. Only ``columns`` and ``randk`` have a flat form.
        ``group``: the parameter group it steps in, when it is not in ``group["params"]`` now
        (ZeRO-3 puts each sub-group's buffer there only for its step)."""
        if group is None:
            group = next((g for g in self.param_groups if any(p is flat for p in g["params"])), None)
        if group is None:
            raise ValueError("attach_flat_layout: the tensor is not in any parameter group")
        self._flat.attach(flat, segments, group)

    # ------------------------------------------------------------------ bookkeeping + dispatch

    def is_projectable(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return bool(group["projectable"]) and (p.ndim == 2 or p in self._flat)

    def elementwise(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s update is elementwise (its state-full AdamW part, not a projected one):
        ``PrecisionHooks`` may then step it a slice of rows at a time."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return not self.is_projectable(group, p)

    # torch.compile: the step runs eagerly. Its per-tensor bookkeeping (subspace indices, refresh
    # counters, Python step counts) would make dynamo guard on every parameter and recompile each
    # step; its math is already batched (foreach) or fused (leanlm.kernels.frugal_update on CUDA).
    # Compile the model; `torch.compile(opt.step)` is then a no-op that never recompiles.
    # (torch._disable_dynamo imports dynamo at the first step, not at import, as torch.optim does.)
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()  # every refusal before any tensor is touched
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            if torch.is_tensor(group["lr"]):  # a tensor lr (a scheduler may change it): its value now
                group = {**group, "lr": float(group["lr"])}  # a view for this step; param_groups untouched
            lr, wd = group["lr"], group["weight_decay"]
            dense = [p for p in with_grad if not self.is_projectable(group, p)]
            proj = [p for p in with_grad if self.is_projectable(group, p)]
            # The fused kernel applies weight decay itself; everything else gets it here.
            fused = {id(p) for p in proj if self._fused(group, p)}
            decayed = [local(p) for p in with_grad if id(p) not in fused]
            if wd and decayed:  # decoupled, before the update, on every parameter (FRUGAL's order)
                torch._foreach_mul_(decayed, 1.0 - lr * wd)
            if dense:
                self._adam_dense(group, dense)
            if proj:
                self._maybe_refresh(group, proj)
                for p in proj:
                    self._update(group, p, decay=1.0 - lr * wd if id(p) in fused else 1.0)
        return loss

    def _check_before_step(self) -> None:
        """Refuse a step that would fail half-way (some tensors updated, then an error)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.grad.is_complex():
                    raise RuntimeError("FRUGAL does not support sparse or complex gradients")
                moment = self.state[p].get("exp_avg") if p in self.state else None
                if moment is not None and not self.is_projectable(group, p) and moment.dtype != p.dtype:
                    raise RuntimeError(
                        f"FRUGAL: a {p.dtype} parameter has {moment.dtype} moments (state set by hand?); "
                        "load states with load_state_dict, which casts them"
                    )

    def _fused(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """columns / rows on a whole (unsharded, contiguous) matrix on the Triton path."""
        return (
            PROJECTORS[group["projection"]].fused
            and group["state_free"] not in RULES
            and p not in self._flat
            and not is_dtensor(p)
            and p.is_contiguous()
            and use_triton(p)
        )

    # ------------------------------------------------------------------ state-full AdamW

    def _adam_dense(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p),
                )
        states = [local_view(self.state[p]) for p in params]
        adam_foreach_(
            [local(p) for p in params],
            [local(_grad(p)) for p in params],
            states,
            group["lr"],
            group["betas"],
            group["eps"],
        )

    # ------------------------------------------------------------------ subspace refresh

    def _maybe_refresh(self, group: dict[str, Any], proj: list[torch.Tensor]) -> None:
        """Every ``update_gap`` updates of a tensor its subspace is redrawn. Tensors that train
        together keep one cadence; a tensor whose first gradient comes late gets its first subspace
        then, without refreshing (and resetting the moments of) the others. ``blocks`` chooses
        among the group's tensors, so the whole group refreshes together."""
        gap = int(group["update_gap"])
        if group["projection"] == "blocks":
            ages = [int(self.state[p]["age"]) for p in proj if self.state[p]]
            if len(ages) < len(proj) or max(ages) >= gap:
                self._refresh_blocks(group, proj)
            return
        for p in proj:
            if not self.state[p] or int(self.state[p]["age"]) >= gap:
                if p in self._flat:
                    self._flat.refresh(group, p, self.state[p])
                else:
                    self._refresh(group, p)

    def _refresh(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Draw this matrix's next subspace (``PROJECTORS[kind].draw``) and reset its moments."""
        st = self.state[p]
        refresh = int(st["refresh"]) + 1 if st else 0
        gen = subspace_generator(group["seed"], self._index[id(p)], refresh)
        kind = group["projection"]

        def all_of_g() -> torch.Tensor:  # svd needs all of G (fetched only by the kinds that use it)
            return whole_grad(p)

        drawn, shape, dtype = PROJECTORS[kind].draw(tuple(p.shape), group["density"], gen, all_of_g, rank=group["rank"])
        st.update({name: t.to(p.device) for name, t in drawn.items()})
        dtype = dtype or p.dtype
        keep = "exp_avg" in st and not group["reset_on_refresh"] and st["exp_avg"].shape == shape
        if not keep:
            if kind == "columns" and is_dtensor(p):  # rows stay local: shard the moments like p
                st["exp_avg"] = sharded_zeros(p, shape, dtype)
                st["exp_avg_sq"] = sharded_zeros(p, shape, dtype)
            else:
                st["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
                st["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
            st["step"] = torch.zeros((), dtype=torch.float32)
        st["age"] = torch.zeros((), dtype=torch.int64)
        st["refresh"] = torch.tensor(refresh, dtype=torch.int64)
        if group["state_free"] in RULES and "growth_norm" not in st:  # kept across refreshes, as in Fira
            st["growth_norm"] = torch.full((), -1.0, dtype=torch.float32, device=p.device)

    def _refresh_blocks(self, group: dict[str, Any], proj: list[torch.Tensor]) -> None:
        """BAdam-style: ρ of the group's projectable tensors are state-full, whole."""
        tensors = [p for p in group["params"] if self.is_projectable(group, p)]
        first = self.state[tensors[0]]
        refresh = int(first["refresh"]) + 1 if first else 0
        gen = subspace_generator(group["seed"], self._index[id(tensors[0])], refresh)
        active = set(
            select_blocks(len(tensors), group["density"], refresh=refresh, order=group["block_order"], gen=gen)
        )
        for i, p in enumerate(tensors):
            st = self.state[p]
            st.clear()  # frees the moments of tensors leaving the active set
            st["active"] = torch.tensor(i in active)
            if i in active:
                st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            st.update(
                step=torch.zeros((), dtype=torch.float32),
                age=torch.zeros((), dtype=torch.int64),
                refresh=torch.tensor(refresh, dtype=torch.int64),
            )

    # ------------------------------------------------------------------ the split update

    def _update(self, group: dict[str, Any], p: torch.Tensor, decay: float = 1.0) -> None:
        """Route to the whole-matrix math: directly, on the local shard, gathered, or flat.
        ``decay``: weight decay still to apply (only the fused kernel's path gets one)."""
        if p in self._flat:
            self._flat.update(group, p, self.state[p], self._combine)
        elif not is_dtensor(p):
            self._update_projectable(group, self.state[p], p, _grad(p), decay=decay)
        elif group["projection"] in ("columns", "blocks"):  # whole columns / tensors are local
            self._update_projectable(group, local_view(self.state[p]), local(p), local(_grad(p)), key=p)
        else:  # rows / randk / svd / random need all of G: gather, update redundantly, keep ours
            g = whole_grad(p)  # (m, n) on every rank
            upd = self._scratch_like(g, slot=3).zero_()
            self._update_projectable(group, self.state[p], upd, g, key=p)
            lo, hi = row_range(p)
            local(p).add_(upd[lo:hi])

    def _update_projectable(
        self,
        group: dict[str, Any],
        st: dict[str, Any],
        p: torch.Tensor,
        g: torch.Tensor,
        *,
        decay: float = 1.0,
        key: torch.Tensor | None = None,
    ) -> None:
        """The split update of one matrix ``p`` (m, n) from its gradient ``g``, adding into ``p``.
        ``st`` is the parameter's state (local views under FSDP2); ``key`` the parameter itself
        when ``p`` is a per-step stand-in (a shard's local tensor, a gathered buffer)."""
        kind, free = group["projection"], group["state_free"]
        proj = PROJECTORS[kind]
        lr_full = group["lr"] * group["proj_lr_scale"]
        lr_free = lr_full * group["state_free_lr_scale"]
        st["age"] += 1
        if free in RULES:  # fira / apollo: leanlm.optim.scaled
            scaled_update_(
                p,
                g,
                st,
                proj,
                rule=free,
                scaling=group["scaling"],
                lr=lr_full,
                free_scale=group["state_free_lr_scale"],
                betas=group["betas"],
                eps=group["eps"],
                scratch=self._scratch_like(g, torch.float32, slot=1),
                allsum=mesh_sum(key) if is_dtensor(key) and kind == "columns" else same,
            )
            return
        if proj.fused:  # columns / rows: leanlm.kernels does the whole step (fused on CUDA)
            dim = 1 if kind == "columns" else 0
            frugal_update(
                p,
                g,
                st,
                dim=dim,
                lr=lr_full,
                lr_free=lr_free,
                betas=group["betas"],
                eps=group["eps"],
                free=free,
                decay=decay,
                scratch=None if use_triton(p) else self._scratch_like(g),
                inv=self._inverse(p if key is None else key, p, st, dim),
            )
            return
        if proj.whole and not bool(st["active"]):  # a block outside the state-full set
            if free != "none":
                p.add_(state_free_update(g, free, self._scratch_like(g)), alpha=-lr_free)
            return
        low = proj.down(g, st)  # P↓G, shaped like the moments
        upd = adam_direction_(low, st, group["betas"], group["eps"], lr_full) if low.numel() else low
        if not proj.coordinates:  # svd / random: the state-free step takes the residual G − P↑P↓G
            shape = tuple(p.shape)
            if free != "none":
                resid = self._scratch_like(g, torch.float32, slot=1)
                torch.sub(g, proj.lift(low, st, shape, out=resid), out=resid)
                # sign() would turn a round-off residual (G inside the subspace) into ±lr everywhere
                keep = residual_is_signal(resid, g) if free == "sign" else None
                step = state_free_update(resid, free, resid)
                p.add_(step if keep is None else step.mul_(keep), alpha=-lr_free)
            p.add_(proj.lift(upd, st, shape, out=self._scratch_like(g, torch.float32, slot=2)))
            return

        # an active block has no complement: every coordinate is state-full
        def put(values: torch.Tensor, target: torch.Tensor, add: bool) -> None:
            proj.put(values, st, target, add)

        self._combine(p, g, upd, free="none" if proj.whole else free, lr_free=lr_free, put=put)

    def _combine(
        self, p: torch.Tensor, g: torch.Tensor, upd: torch.Tensor, *, free: str, lr_free: float, put: Callable
    ) -> None:
        """p += the Adam step ``upd`` on the state-full coordinates (``put`` scatters them) and the
        state-free step on their complement: the state-free step is taken everywhere, then the
        selected coordinates are overwritten with the Adam step, so each gets exactly one of the two.
        (``leanlm.kernels.frugal_update`` does the same for columns / rows, fused.)"""
        if free == "none":
            put(upd, p, True)
            return
        u = state_free_update(g, free, self._scratch_like(g)).mul_(-lr_free)
        put(upd, u, False)
        p.add_(u)

    def _inverse(self, key: torch.Tensor, p: torch.Tensor, st: dict[str, Any], dim: int) -> torch.Tensor | None:
        """The fused kernel's inverse index map of ``st["index"]`` for the matrix ``p``, cached per
        parameter ``key`` until the index changes (a refresh); None off the Triton path."""
        if not use_triton(p):
            return None
        cached = self._inverses.get(id(key))
        if cached is None or cached[0] is not st["index"]:
            cached = self._inverses[id(key)] = (
                st["index"],
                inverse_index(st["index"], p.shape[dim]),
            )
        return cached[1]

    def _scratch_like(self, t: torch.Tensor, dtype: torch.dtype | None = None, slot: int = 0) -> torch.Tensor:
        """A reusable buffer per (shape, dtype, device, slot): fresh full-size temporaries every
        step cost page faults on CPU and allocator churn on GPU. Not optimizer state (never saved)."""
        dtype = dtype or t.dtype
        key = (tuple(t.shape), dtype, t.device, slot)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(t.shape, dtype=dtype, device=t.device)
        return self._scratch[key]

    # ------------------------------------------------------------------ state round trip

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and ``load_state_dict`` end here: every group key a saved state lacks (it
        was written before the key existed) gets this optimizer's default, as torch's optimizers
        fill theirs, instead of a ``KeyError`` at the next refresh."""
        super().__setstate__(state)
        for key, value in GROUP_DEFAULTS.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key in GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])
        loading = self.__dict__.pop("_loading", None)
        if loading is not None:  # inside load_state_dict: before its post-hooks (PrecisionHooks') run
            self._restore_dtypes(loading)

    def _restore_dtypes(self, state_dict: dict[str, Any]) -> None:
        """Undo the base class's cast of every saved tensor to the parameter's dtype: indices and
        bases keep their saved dtype, moments get the dtype this optimizer creates them in."""
        groups = [(g, p) for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            if not isinstance(idx, int) or idx >= len(groups):
                continue
            group, p = groups[idx]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    dtype = self._moment_dtype(group, p) if key in ("exp_avg", "exp_avg_sq") else value.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like the base class, but keeps the saved dtype of the subspace indices and bases (the
        base class would cast them to the parameter's dtype); the moments are cast to the dtype
        this optimizer would create them in (the parameter's, or the projection's), as torch's
        AdamW does, so a state saved with float32 weights loads into bf16 ones and back. A state
        saved by a FRUGAL built with parameter names into one built without (or the reverse) is
        refused with the way to build the matching optimizer: names decide what is split."""
        check_naming(state_dict["param_groups"], self.param_groups)
        self._loading = state_dict  # __setstate__, which the base class ends with, restores dtypes
        try:
            super().load_state_dict(state_dict)
        finally:
            self.__dict__.pop("_loading", None)
        self._flat.forget_positions()

    def _moment_dtype(self, group: dict[str, Any], p: torch.Tensor) -> torch.dtype:
        """The dtype ``_refresh`` / ``_adam_dense`` create moments in for ``p``."""
        if self.is_projectable(group, p) and p not in self._flat:
            return PROJECTORS[group["projection"]].moment_dtype or p.dtype
        return p.dtype


# ---------------------------------------------------------------------- free functions (the math)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` of a tensor the step updates (the step skips those whose gradient is None)."""
    return cast(torch.Tensor, p.grad)
