import io
import math

import pytest
import torch
from torch import nn

from leanlm.optim import FRUGAL, badam, frugal_param_groups, galore, state_bytes
from leanlm.optim.projections import PROJECTIONS, project_down, project_up

SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (8, 8)}


def make_params(shape=(12, 5), seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=g)) for _ in range(n)]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()


def test_columns_with_full_density_matches_adamw():
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 3))
    ref = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 3))
    ref.load_state_dict(model.state_dict())
    ours = FRUGAL(
        model.parameters(),
        lr=1e-2,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        density=1.0,
        projection="columns",
    )
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    torch.manual_seed(0)
    for _ in range(20):
        x = torch.randn(7, 6)
        for m, opt in ((model, ours), (ref, adamw)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_density_zero_with_sign_is_signsgd():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = FRUGAL(params, lr=0.1, weight_decay=0.5, density=0.0)
    set_grads(params, 0)
    opt.step()
    for p, p0 in zip(params, before):
        expected = p0 * (1 - 0.1 * 0.5) - 0.1 * torch.sign(p.grad)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert state_bytes(opt) < 100  # no moments at density 0


@pytest.mark.parametrize("projection", ["columns", "rows", "randk", "blocks"])
def test_state_full_and_state_free_coordinates_are_disjoint(projection):
    # Adam's first step moves a coordinate by lr·|g|/(|g|+eps) ≈ lr; the state-free step by
    # exactly lr·0.5. So the two sets are told apart by the step size.
    params = make_params((12, 8), n=4)
    before = [p.detach().clone() for p in params]
    lr = 0.1
    opt = FRUGAL(params, lr=lr, density=0.25, projection=projection, state_free_lr_scale=0.5)
    set_grads(params, 0)
    opt.step()
    n_full = 0
    for p, p0 in zip(params, before):
        delta = (p.detach() - p0).abs()
        full = (delta - lr).abs() < 1e-4
        free = (delta - 0.5 * lr).abs() < 1e-7
        assert torch.all(full ^ free), "every coordinate is exactly one of state-full / state-free"
        st = opt.state[p]
        mask = torch.zeros(p.shape, dtype=torch.bool)
        if projection == "columns":
            mask[:, st["index"]] = True
        elif projection == "rows":
            mask[st["index"]] = True
        elif projection == "randk":
            mask.view(-1)[st["index"].long()] = True
        else:
            mask[:] = bool(st["active"])
        assert torch.equal(full, mask)
        n_full += int(mask.sum())
    expected = {"columns": 4 * 12 * 2, "rows": 4 * 3 * 8, "randk": 4 * 24, "blocks": 12 * 8}[projection]
    assert n_full == expected


@pytest.mark.parametrize("projection", ["svd", "random"])
def test_low_rank_projections_use_the_orthogonal_complement_residual(projection):
    (p,) = make_params((10, 6), n=1)
    p0 = p.detach().clone()
    lr = 0.05
    opt = FRUGAL([p], lr=lr, density=0.5, projection=projection)
    set_grads([p], 0)
    opt.step()
    basis = opt.state[p]["basis"]
    assert basis.shape == (3, 6) and basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    low = project_down(p.grad, basis)
    adam = -lr * low / (low.abs() + 1e-8)  # Adam's first step
    resid = p.grad - project_up(low, basis, (10, 6))
    expected = p0 + project_up(adam, basis, (10, 6)) - lr * torch.sign(resid)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    if projection == "svd":
        _, _, Vh = torch.linalg.svd(p.grad)
        torch.testing.assert_close((basis.T @ basis), Vh[:3].T @ Vh[:3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_every_projection_trains_tall_wide_and_square(projection, shape):
    params = make_params(shape, n=3)
    opt = FRUGAL(params, lr=1e-2, density=0.4, projection=projection, update_gap=2)
    run(opt, params, 5)
    assert all(torch.isfinite(p).all() for p in params)
    st = opt.state[params[0]]
    m, n = shape
    if projection in ("columns", "rows", "randk"):
        k = {"columns": int(0.4 * n), "rows": int(0.4 * m), "randk": int(0.4 * m * n)}[projection]
        assert (
            st["index"].numel() == k and st["exp_avg"].numel() == k * {"columns": m, "rows": n, "randk": 1}[projection]
        )
        assert torch.equal(st["index"], st["index"].unique())  # sorted, unique
    if projection in ("svd", "random"):
        r = round(0.4 * min(shape))
        assert st["exp_avg"].shape == ((m, r) if m >= n else (r, n))


def test_refresh_zeroes_moments_and_restarts_bias_correction():
    params = make_params((12, 8), n=2)
    opt = FRUGAL(params, lr=1e-2, density=0.5, update_gap=3)
    run(opt, params, 3)
    st = opt.state[params[0]]
    first_index = st["index"].clone()
    assert float(st["step"]) == 3 and int(st["refresh"]) == 0
    run(opt, params, 1, start=3)
    assert float(st["step"]) == 1 and int(st["refresh"]) == 1 and int(st["age"]) == 1
    assert not torch.equal(st["index"], first_index)
    # one step from zero moments: exp_avg = (1 − β1)·g on the new columns
    torch.testing.assert_close(st["exp_avg"], 0.1 * params[0].grad[:, st["index"]])


def test_galore_mode_keeps_moments_across_refresh():
    params = make_params((12, 8), n=1)
    opt = galore(params, lr=1e-2, density=0.5, update_gap=2)
    run(opt, params, 2)
    m_before = opt.state[params[0]]["exp_avg"].clone()
    run(opt, params, 1, start=2)
    st = opt.state[params[0]]
    assert float(st["step"]) == 3 and int(st["refresh"]) == 1
    torch.testing.assert_close(st["exp_avg"], 0.9 * m_before + 0.1 * project_down(params[0].grad, st["basis"]))


def test_badam_mode_rotates_whole_tensors_descending():
    params = make_params((4, 4), n=8)
    opt = badam(params, lr=1e-2, density=0.25, update_gap=1)
    active = []
    for s in range(4):
        run(opt, params, 1, start=s)
        active.append([i for i, p in enumerate(params) if bool(opt.state[p]["active"])])
    assert active == [[6, 7], [4, 5], [2, 3], [0, 1]]
    assert "exp_avg" not in opt.state[params[7]]  # inactive tensors hold no moments


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_state_round_trip_is_bitwise_including_across_a_refresh(projection):
    params = make_params((9, 7), n=3)
    opt = FRUGAL(params, lr=1e-2, density=0.3, projection=projection, update_gap=3, weight_decay=0.01)
    run(opt, params, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = FRUGAL(clones, lr=1e-2, density=0.3, projection=projection, update_gap=3, weight_decay=0.01)
    fresh.load_state_dict(saved)
    for k, v in opt.state[params[0]].items():
        assert fresh.state[clones[0]][k].dtype == v.dtype, k
    run(opt, params, 5, start=4)  # crosses the refresh at step 6
    run(fresh, clones, 5, start=4)
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_subspaces_come_from_a_private_generator():
    def indices(seed, global_seed):
        torch.manual_seed(global_seed)
        params = make_params((6, 20), n=2)
        opt = FRUGAL(params, density=0.25, seed=seed)
        set_grads(params, 0)
        opt.step()
        return [opt.state[p]["index"].tolist() for p in params]

    assert indices(0, 1) == indices(0, 2)  # the global RNG plays no part
    assert indices(0, 1) != indices(1, 1)
    a = indices(0, 1)
    assert a[0] != a[1]  # parameters differ by index


def test_named_parameters_split_linear_weights_from_the_rest():
    from leanlm.engine.config import ModelConfig
    from leanlm.engine.model import LLaMA

    model = LLaMA(ModelConfig(d_model=16, n_layers=2, n_heads=2, ffn_dim=32), vocab_size=40, max_seq_len=8)
    proj, rest = frugal_param_groups(model)
    assert len(proj["params"]) == 2 * 7 and all(p.ndim == 2 for p in proj["params"])
    rest_ids = {id(p) for p in rest["params"]}
    assert id(model.embed_tokens.weight) in rest_ids and id(model.lm_head.weight) in rest_ids
    opt = FRUGAL(model.named_parameters(), density=0.25)
    assert [g["projectable"] for g in opt.param_groups] == [True, False]


def test_group_dicts_override_defaults_per_group():
    a, b = make_params((6, 6), n=2)
    opt = FRUGAL([{"params": [a], "density": 0.5}, {"params": [b], "projectable": False}], lr=1e-2)
    set_grads([a, b], 0)
    opt.step()
    assert opt.state[a]["index"].numel() == 3 and opt.state[b]["exp_avg"].shape == (6, 6)


def test_contract_closure_none_grads_and_schedulers():
    params = make_params((6, 4), n=2)
    opt = FRUGAL(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    params[1].grad = None
    params[0].grad = torch.ones(6, 4)
    before = params[1].detach().clone()
    loss = opt.step(lambda: torch.tensor(3.0))  # closure passed positionally
    assert loss.item() == 3.0 and torch.equal(params[1].detach(), before)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    keys = set(opt.param_groups[0])
    opt.step()
    assert set(opt.param_groups[0]) == keys  # step never mutates param_groups


def test_sparse_gradients_are_rejected():
    p = nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse or complex"):
        FRUGAL([p]).step()


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(ValueError, match="projection='colums'"):
        FRUGAL(make_params(), projection="colums")
    with pytest.raises(ValueError, match="density=1.5"):
        FRUGAL(make_params(), density=1.5)


def test_works_with_grad_scaler():
    model = nn.Linear(8, 8)
    opt = FRUGAL(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w0 = model.weight.detach().clone()
    scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, w0)
    model.weight.grad.fill_(math.inf)  # an overflow: the step is skipped
    w1 = model.weight.detach().clone()
    scaler.step(opt)
    assert torch.equal(model.weight, w1)


PRESET_EXPECTED = {  # AdamW state: 8 bytes per parameter; FRUGAL columns ρ=0.25 keeps m, v for ⌊ρ·n⌋ columns
    "llama_60m": (58_073_600, 0.673),  # 78.2M of 116.1M moment elements (the FRUGAL brief, §1.12)
    "llama_130m": (134_105_856, 0.525),  # 140.8M of 268.2M
}


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTED))
def test_state_bytes_hit_the_analytic_minimum_on_presets(name):
    from pathlib import Path

    from leanlm.engine.config import load_config
    from leanlm.engine.model import LLaMA

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = LLaMA(cfg.model, 32000, cfg.train.seq_len)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = FRUGAL(model.named_parameters(), density=0.25, projection="columns")
    opt.step()
    proj = sum(p.numel() for p in opt.param_groups[0]["params"])
    full = sum(p.numel() for p in opt.param_groups[1]["params"])
    assert full + proj == PRESET_EXPECTED[name][0]
    analytic = 8 * (full + 0.25 * proj)
    measured = state_bytes(opt)
    assert analytic <= measured <= 1.01 * analytic
    assert measured / (8 * (full + proj)) == pytest.approx(PRESET_EXPECTED[name][1], abs=0.002)
