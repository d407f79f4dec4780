"""Fira and APOLLO modes (``state_free="fira" | "apollo"``): the packages' updates reproduced, the
per-channel rule on every projection, the limiter, state round trips and refusals."""

from __future__ import annotations

import io
import math

import pytest
import torch

import leanlm.optim.projections as projections
from leanlm.optim import FRUGAL, apollo, apollo_mini, fira, state_bytes
from leanlm.optim.scaled import GROWTH_LIMIT, NORM_EPS

SHAPES = [(24, 16), (12, 20)]  # m >= n (rows are channels) and m < n (columns are channels)
RANK = 4
LR, EPS = 1e-2, 1e-8


def _weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) for shape in SHAPES] for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads) -> list[list[torch.Tensor]]:
    seen = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        seen.append([p.detach().clone() for p in params])
    return seen


def _assert_same(ours, theirs, atol: float = 1e-6) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x, y, atol=atol, rtol=0), f"step {step}: max diff {(x - y).abs().max():.3g}"


@pytest.mark.parametrize("alpha", [1.0])
def test_fira_matches_the_fira_package(alpha):
    """Same gradients, same svd bases (drawn from the same gradients), 7 steps with refreshes at
    0, 3 and 6: the weights agree to 1e-6 after every step (no weight decay: the package decays after)."""
    fira_pkg = pytest.importorskip("fira")
    grads = _grads(7)
    theirs_p = [torch.nn.Parameter(w) for w in _weights()]
    theirs = fira_pkg.FiraAdamW(
        [{"params": theirs_p, "rank": RANK, "update_proj_gap": 3, "alpha": alpha, "proj_type": "std"}],
        lr=LR,
        eps=EPS,
        weight_decay=0.0,
        no_deprecation_warning=True,
    )
    ours_p = [torch.nn.Parameter(w) for w in _weights()]
    ours = fira(ours_p, lr=LR, eps=EPS, betas=(0.9, 0.999), rank=RANK, update_gap=3, alpha=alpha)
    _assert_same(_run(ours, ours_p, grads), _run(theirs, theirs_p, grads))


@pytest.mark.parametrize("variant", ["channel", "tensor", "mini"])
def test_apollo_matches_apollo_torch_on_the_same_projection(variant, monkeypatch):
    """apollo-torch draws N(0, 1/r) projections from a per-parameter seed (1-based index, then
    ``next_seed`` at each refresh); ours are handed the same matrices. 5 steps, refreshes at 0, 2, 4."""
    pkg = pytest.importorskip("apollo_torch")
    from apollo_torch.random_projector import next_seed, stable_randn

    rank, scale = (1, 128.0) if variant == "mini" else (RANK, 2.0)
    scaling = "tensor" if variant != "channel" else "channel"
    seeds = {shape: i + 1 for i, shape in enumerate(SHAPES)}

    def same_as_apollo(shape, r, gen):
        m, n = shape
        size = (r, n) if m >= n else (m, r)
        basis = stable_randn(size, seed=seeds[shape]) / math.sqrt(r)
        seeds[shape] = next_seed(seeds[shape])
        return basis

    monkeypatch.setattr(projections, "gaussian_basis", same_as_apollo)
    grads = _grads(5)
    theirs_p = [torch.nn.Parameter(w) for w in _weights()]
    group = dict(rank=rank, proj="random", scale_type=scaling, scale=scale, update_proj_gap=2, proj_type="std")
    theirs = pkg.APOLLOAdamW([{"params": theirs_p, **group}], lr=LR, eps=EPS, weight_decay=0.0)
    theirs_steps = _run(theirs, theirs_p, grads)
    seeds.update({shape: i + 1 for i, shape in enumerate(SHAPES)})
    ours_p = [torch.nn.Parameter(w) for w in _weights()]
    if variant == "mini":
        ours = apollo_mini(ours_p, lr=LR, eps=EPS, betas=(0.9, 0.999), update_gap=2, scale=scale)
    else:
        ours = apollo(ours_p, lr=LR, eps=EPS, betas=(0.9, 0.999), rank=rank, update_gap=2, scale=scale, scaling=scaling)
    _assert_same(_run(ours, ours_p, grads), theirs_steps)


def _first_direction(low: torch.Tensor) -> torch.Tensor:
    """D = m / (√v + ε) at step 1: m = 0.1·g, √v = √0.001·|g|."""
    return 0.1 * low / (math.sqrt(0.001) * low.abs() + EPS)


def _fira_reference(w: torch.Tensor, g: torch.Tensor, index: torch.Tensor, dim: int, lr: float) -> torch.Tensor:
    """Fira's first step by hand on a coordinate subspace: Adam's first step on the selected
    columns (dim 1) or rows (dim 0) is lr·sign; each channel (a row for columns, a column for rows)
    scales its unselected entries by ‖Adam direction‖ / ‖selected gradient‖ of that channel."""
    low = g.index_select(dim, index)
    d = _first_direction(low)
    step = math.sqrt(1 - 0.999) / (1 - 0.9)
    phi = d.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + NORM_EPS)  # over the selected
    resid = g.clone()
    resid.index_fill_(dim, index, 0.0)
    out = w - lr * step * resid * phi
    return out.index_add(dim, index, -lr * step * d)


@pytest.mark.parametrize("projection,dim", [("columns", 1), ("rows", 0)])
def test_fira_on_columns_and_rows_is_the_per_channel_rule(projection, dim):
    (w,) = _weights()[:1]
    g = _grads(1)[0][0]
    p = torch.nn.Parameter(w.clone())
    opt = FRUGAL([p], lr=LR, eps=EPS, betas=(0.9, 0.999), projection=projection, state_free="fira", density=0.25)
    p.grad = g.clone()
    opt.step()
    expected = _fira_reference(w, g, opt.state[p]["index"], dim, LR)
    assert torch.allclose(p.detach(), expected, atol=1e-6, rtol=0)


def test_fira_randk_channels_are_rows():
    """randk: each row's ratio comes from that row's selected entries."""
    w, g = _weights()[0], _grads(1)[0][0]
    p = torch.nn.Parameter(w.clone())
    opt = FRUGAL([p], lr=LR, eps=EPS, betas=(0.9, 0.999), projection="randk", state_free="fira", density=0.25)
    p.grad = g.clone()
    opt.step()
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[opt.state[p]["index"].long()] = True
    mask = mask.view_as(w)
    step = math.sqrt(1 - 0.999) / (1 - 0.9)
    d = torch.where(mask, _first_direction(g), 0.0)
    phi = d.norm(dim=1, keepdim=True) / ((g * mask).norm(dim=1, keepdim=True) + NORM_EPS)
    expected = w - LR * step * torch.where(mask, d, g * phi)
    assert torch.allclose(p.detach(), expected, atol=1e-6, rtol=0)


def test_growth_limiter_caps_the_scaled_norm_at_gamma_per_step():
    """Step 2 repeats the gradient on the selected columns (same ratios) but makes the rest 100x
    larger: the scaled residual's norm may grow by γ = 1.01 only, and the step moves the
    unselected entries by γ times step 1's move (up to the bias-correction factor's change)."""
    w = _weights()[0]
    p = torch.nn.Parameter(w.clone())
    opt = FRUGAL([p], lr=LR, projection="columns", state_free="fira", density=0.25, update_gap=100)
    g = _grads(1)[0][0]
    p.grad = g.clone()
    opt.step()
    first = float(opt.state[p]["growth_norm"])
    big = 100 * g
    big.index_copy_(1, opt.state[p]["index"], g.index_select(1, opt.state[p]["index"]))
    p.grad = big
    opt.step()
    assert float(opt.state[p]["growth_norm"]) == pytest.approx(first * GROWTH_LIMIT, rel=1e-5)
    # unlimited, it would have grown 100x
    assert first * 100 > float(opt.state[p]["growth_norm"]) * 50


@pytest.mark.parametrize("projection", ["columns", "rows", "randk", "svd", "random", "gaussian"])
@pytest.mark.parametrize("rule", ["fira", "apollo"])
def test_state_round_trips_and_resume_is_bitwise(projection, rule):
    """Tensor-only state (weights_only load); a run resumed from step 3 equals the whole run."""
    grads = _grads(6)

    def make(params):
        return FRUGAL(params, lr=LR, projection=projection, state_free=rule, density=0.25, update_gap=2, seed=3)

    whole_p = [torch.nn.Parameter(w) for w in _weights()]
    whole = _run(make(whole_p), whole_p, grads)[-1]
    first_p = [torch.nn.Parameter(w) for w in _weights()]
    first = make(first_p)
    _run(first, first_p, grads[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again_p = [torch.nn.Parameter(p.detach().clone()) for p in first_p]
    again = make(again_p)
    again.load_state_dict(saved)
    resumed = _run(again, again_p, grads[3:])[-1]
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)
    assert all(torch.is_tensor(v) for st in again.state.values() for v in st.values())


def test_state_is_frugal_state_plus_one_scalar_per_matrix():
    """Exact bytes: columns at ρ 0.25 on (24, 16) and (12, 20): two fp32 moments of (24, 4) and
    (12, 5), int64 indices, and per matrix step, age, refresh and the limiter's norm."""
    params = [torch.nn.Parameter(w) for w in _weights()]
    opt = FRUGAL(params, lr=LR, projection="columns", state_free="fira", density=0.25)
    _run(opt, params, _grads(1))
    moments = 2 * 4 * (24 * 4 + 12 * 5)
    indices = 8 * (4 + 5)
    scalars = 2 * (4 + 8 + 8 + 4)  # step (fp32), age, refresh (int64), growth_norm (fp32)
    assert state_bytes(opt) == moments + indices + scalars


def test_blocks_and_flat_partitions_are_refused():
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="blocks"):
        FRUGAL([p], projection="blocks", state_free="fira")
    with pytest.raises(ValueError, match="scaling='rowwise'"):
        FRUGAL([p], state_free="apollo", scaling="rowwise")
    with pytest.raises(ValueError, match="density=0"):
        FRUGAL([p], state_free="fira", density=0.0)
    with pytest.raises(ValueError, match="rank=0"):
        FRUGAL([p], projection="svd", rank=0)
    opt = FRUGAL([p], state_free="fira")
    from leanlm.optim.flat import FlatSegment

    flat = torch.nn.Parameter(torch.randn(64))
    opt.add_param_group({"params": [flat]})
    with pytest.raises(ValueError, match="whole matrices"):
        opt.attach_flat_layout(flat, [FlatSegment(index=0, shape=(8, 8), start=0, length=64, offset=0)])


def test_fixed_rank_overrides_density():
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = FRUGAL([p], projection="gaussian", state_free="apollo", rank=3, density=0.5)
    p.grad = torch.randn(32, 16)
    opt.step()
    assert opt.state[p]["basis"].shape == (3, 16)
    assert opt.state[p]["exp_avg"].shape == (32, 3)


def test_fira_and_apollo_train_a_small_regression():
    """Both reduce a least-squares loss as AdamW does (a sanity check of signs and scales)."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    target = x @ torch.randn(24, 16).T + 0.1 * torch.randn(256, 24)
    for make in (
        lambda ps: fira(ps, lr=3e-2, density=0.25, update_gap=20),
        lambda ps: apollo(ps, lr=3e-2, density=0.25, update_gap=20),
        lambda ps: FRUGAL(ps, lr=3e-2, projection="columns", state_free="fira"),
    ):
        w = torch.nn.Parameter(torch.zeros(24, 16))
        opt = make([w])
        losses = []
        for _ in range(60):
            loss = ((x @ w.T - target) ** 2).mean()
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert losses[-1] < 0.2 * losses[0]
