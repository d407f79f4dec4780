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
svd/random it is the dense orthogonal-complement residual. ``state_free="sgd"`` uses the raw
residual, ``"none"`` drops it (plain low-rank or block training: GaLore and BAdam are presets of
this class, see ``leanlm.optim.presets``). Non-projectable parameters (embeddings, head, norms,
1-D tensors) get plain AdamW. On a refresh the moments of the new subspace are zeroed and bias
correction restarts (``reset_on_refresh=True``, the paper's setting).

Optimizer state holds tensors only (moments, a step count, the refresh count, the subspace
indices or basis), so ``torch.load(weights_only=True)`` round-trips it; subspaces come from a
private generator seeded by (seed, parameter index, refresh count), so ranks agree without
communication and a resumed run picks the same subspaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from leanlm.optim.groups import frugal_param_groups, is_named_params
from leanlm.optim.projections import (
    BLOCK_ORDERS,
    PROJECTIONS,
    num_selected,
    project_down,
    project_up,
    random_basis,
    select_blocks,
    select_entries,
    select_indices,
    subspace_generator,
    svd_basis,
    svd_rank,
)

STATE_FREE = ("sign", "sgd", "none")


def _check_group(group: dict[str, Any]) -> None:
    """Reject bad hyperparameters at construction with a message that names the key."""
    problems = []
    if group["projection"] not in PROJECTIONS:
        problems.append(f"projection={group['projection']!r} (choose {', '.join(PROJECTIONS)})")
    if group["state_free"] not in STATE_FREE:
        problems.append(f"state_free={group['state_free']!r} (choose {', '.join(STATE_FREE)})")
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
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.25,
        projection: str = "columns",
        update_gap: int = 200,
        state_free: str = "sign",
        state_free_lr_scale: float = 1.0,
        proj_lr_scale: float = 1.0,
        reset_on_refresh: bool = True,
        block_order: str = "descending",
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, density=density,
            projection=projection, update_gap=update_gap, state_free=state_free,
            state_free_lr_scale=state_free_lr_scale, proj_lr_scale=proj_lr_scale,
            reset_on_refresh=reset_on_refresh, block_order=block_order, seed=seed, projectable=True,
        )  # fmt: skip
        super().__init__(_as_groups(params), defaults)
        for group in self.param_groups:
            _check_group(group)
        # Stable parameter index (construction order) for the subspace generator's seed.
        self._index = {
            id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])
        }
        self._scratch: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ bookkeeping + dispatch

    @staticmethod
    def is_projectable(group: dict[str, Any], p: torch.Tensor) -> bool:
        return bool(group["projectable"]) and p.ndim == 2

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse or p.grad.is_complex():
                    raise RuntimeError("FRUGAL does not support sparse or complex gradients")
            if not with_grad:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if wd:  # decoupled, before the update, on every parameter (FRUGAL's order)
                torch._foreach_mul_(with_grad, 1.0 - lr * wd)
            dense = [p for p in with_grad if not self.is_projectable(group, p)]
            proj = [p for p in with_grad if self.is_projectable(group, p)]
            if dense:
                self._adam_dense(group, dense)
            if proj:
                self._maybe_refresh(group, proj)
                for p in proj:
                    self._update_projectable(group, p)
        return loss

    # ------------------------------------------------------------------ state-full AdamW

    def _adam_dense(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p].update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p),
                )
        states = [self.state[p] for p in params]
        adam_foreach_(
            params, [p.grad for p in params], states, group["lr"], group["betas"], group["eps"]
        )

    # ------------------------------------------------------------------ subspace refresh

    def _maybe_refresh(self, group: dict[str, Any], proj: list[torch.Tensor]) -> None:
        """Group-wide cadence: refresh every projectable tensor once the group's age hits T."""
        ages = [int(self.state[p]["age"]) for p in proj if self.state[p]]
        if len(ages) == len(proj) and max(ages) < int(group["update_gap"]):
            return
        if group["projection"] == "blocks":
            self._refresh_blocks(group, proj)
        else:
            for p in proj:
                self._refresh(group, p)

    def _refresh(self, group: dict[str, Any], p: torch.Tensor) -> None:
        st = self.state[p]
        refresh = int(st["refresh"]) + 1 if st else 0
        gen = subspace_generator(group["seed"], self._index[id(p)], refresh)
        m, n, rho, kind = p.shape[0], p.shape[1], group["density"], group["projection"]
        if kind == "columns":
            st["index"] = select_indices(n, num_selected(rho, n), gen).to(p.device)
            shape, dtype = (m, st["index"].numel()), p.dtype
        elif kind == "rows":
            st["index"] = select_indices(m, num_selected(rho, m), gen).to(p.device)
            shape, dtype = (st["index"].numel(), n), p.dtype
        elif kind == "randk":
            st["index"] = select_entries(m * n, num_selected(rho, m * n), gen).to(p.device)
            shape, dtype = (st["index"].numel(),), p.dtype
        else:  # svd / random: a float32 basis on the shorter side
            r = svd_rank(rho, (m, n))
            basis = svd_basis(p.grad, r) if kind == "svd" else random_basis((m, n), r, gen)
            st["basis"] = basis.to(p.device)
            shape, dtype = ((m, r) if m >= n else (r, n)), torch.float32
        keep = "exp_avg" in st and not group["reset_on_refresh"] and st["exp_avg"].shape == shape
        if not keep:
            st["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
            st["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
            st["step"] = torch.zeros((), dtype=torch.float32)
        st["age"] = torch.zeros((), dtype=torch.int64)
        st["refresh"] = torch.tensor(refresh, dtype=torch.int64)

    def _refresh_blocks(self, group: dict[str, Any], proj: list[torch.Tensor]) -> None:
        """BAdam-style: ρ of the group's projectable tensors are state-full, whole."""
        tensors = [p for p in group["params"] if self.is_projectable(group, p)]
        first = self.state[tensors[0]]
        refresh = int(first["refresh"]) + 1 if first else 0
        gen = subspace_generator(group["seed"], self._index[id(tensors[0])], refresh)
        active = set(
            select_blocks(len(tensors), group["density"], refresh, group["block_order"], gen)
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

    def _update_projectable(self, group: dict[str, Any], p: torch.Tensor) -> None:
        st, g, kind = self.state[p], p.grad, group["projection"]
        lr_full = group["lr"] * group["proj_lr_scale"]
        lr_free = lr_full * group["state_free_lr_scale"]
        st["age"] += 1
        free = group["state_free"]
        if kind == "blocks" and not bool(st["active"]):
            if free != "none":
                p.add_(state_free_update(g, free, self._scratch_like(g)), alpha=-lr_free)
            return
        # Gather the state-full coordinates: low has the moments' shape.
        if kind == "columns":
            low = g.index_select(1, st["index"])
        elif kind == "rows":
            low = g.index_select(0, st["index"])
        elif kind == "randk":
            low = g.reshape(-1).index_select(0, st["index"].long())
        elif kind == "blocks":
            low = g
        else:
            low = project_down(g, st["basis"])
        upd = (
            adam_direction_(low, st, group["betas"], group["eps"], lr_full) if low.numel() else low
        )
        if kind in ("svd", "random"):
            shape = tuple(p.shape)
            if free != "none":  # residual G − P↑P↓G (float32), its state-free step applied first
                resid = self._scratch_like(g, torch.float32, slot=1)
                torch.sub(g, project_up(low, st["basis"], shape, out=resid), out=resid)
                p.add_(state_free_update(resid, free, resid), alpha=-lr_free)
            p.add_(
                project_up(
                    upd, st["basis"], shape, out=self._scratch_like(g, torch.float32, slot=2)
                )
            )
            return
        if kind == "blocks":
            p.add_(upd)
            return
        if free == "none":
            _scatter(p, kind, st["index"], upd, add=True)
            return
        # The complement: the state-free step everywhere, then the selected coordinates overwritten
        # with the Adam step, so each coordinate gets exactly one of the two.
        u = state_free_update(g, free, self._scratch_like(g)).mul_(-lr_free)
        _scatter(u, kind, st["index"], upd, add=False)
        p.add_(u)

    def _scratch_like(
        self, t: torch.Tensor, dtype: torch.dtype | None = None, slot: int = 0
    ) -> torch.Tensor:
        """A reusable buffer per (shape, dtype, device, slot): fresh full-size temporaries every
        step cost page faults on CPU and allocator churn on GPU. Not optimizer state (never saved)."""
        dtype = dtype or t.dtype
        key = (tuple(t.shape), dtype, t.device, slot)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(t.shape, dtype=dtype, device=t.device)
        return self._scratch[key]

    # ------------------------------------------------------------------ state round trip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like the base class, but keeps every saved tensor's dtype (the base class would cast
        integer subspace indices and float32 bases to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            if not isinstance(idx, int) or idx >= len(params):
                continue
            p = params[idx]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)


# ---------------------------------------------------------------------- free functions (the math)


def adam_foreach_(params, grads, states, lr: float, betas, eps: float) -> None:
    """Plain AdamW moments + update for same-role tensors (weight decay applied by the caller)."""
    b1, b2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    for s in states:
        s["step"] += 1
    torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
    steps = [float(s["step"]) for s in states]
    step_sizes = [-lr / (1 - b1**k) for k in steps]
    bc2_sqrt = [math.sqrt(1 - b2**k) for k in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def adam_direction_(
    low: torch.Tensor, st: dict[str, Any], betas, eps: float, lr: float
) -> torch.Tensor:
    """Update the moments with ``low`` and return the Adam step (already scaled by −lr/bc1)."""
    b1, b2 = betas
    st["step"] += 1
    k = float(st["step"])
    low = low.to(st["exp_avg"].dtype)
    st["exp_avg"].lerp_(low, 1 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(low, low, value=1 - b2)
    out = st["exp_avg_sq"].sqrt().div_(math.sqrt(1 - b2**k)).add_(eps)  # the denominator...
    return torch.div(st["exp_avg"], out, out=out).mul_(
        -lr / (1 - b1**k)
    )  # ...then the step, in place


def state_free_update(
    residual: torch.Tensor, rule: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The state-free direction (before −lr scaling): sign(residual) or the residual itself."""
    out = torch.empty_like(residual) if out is None else out
    return torch.sign(residual, out=out) if rule == "sign" else out.copy_(residual)


def _scatter(
    t: torch.Tensor, kind: str, index: torch.Tensor, values: torch.Tensor, add: bool
) -> None:
    """Write (``add=False``) or add ``values`` into the selected columns / rows / entries of ``t``."""
    dim, target, index = {"columns": (1, t, index), "rows": (0, t, index)}.get(
        kind, (0, t.view(-1), index.long())
    )
    (target.index_add_ if add else target.index_copy_)(dim, index, values.to(t.dtype))


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Tensors, (name, tensor) pairs or group dicts -> group dicts the base class accepts."""
    params = list(params)
    if not params:
        raise ValueError("FRUGAL got an empty parameter list")
    if isinstance(params[0], dict):
        groups = []
        for g in params:
            items = list(g["params"]) if not torch.is_tensor(g["params"]) else [g["params"]]
            if items and is_named_params(items) and "projectable" not in g:
                rest = {k: v for k, v in g.items() if k != "params"}
                groups += [{**sub, **rest} for sub in frugal_param_groups(items) if sub["params"]]
            else:
                groups.append(
                    {
                        **g,
                        "params": [t for t in (x[1] if isinstance(x, tuple) else x for x in items)],
                    }
                )
        return groups
    if is_named_params(params):
        return [g for g in frugal_param_groups(params) if g["params"]]
    return [{"params": params}]
