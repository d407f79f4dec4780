"""bf16 weights that still learn (``leanlm.optim.PrecisionHooks``): unbiased stochastic rounding,
float32 step math, bf16 moments, reproducible noise."""

from __future__ import annotations

import pytest
import torch

from leanlm.optim import FRUGAL, PrecisionHooks, StepInBackward
from leanlm.optim.precision import stochastic_round_


def test_stochastic_rounding_is_unbiased():
    """1 + 2^-10 lies a quarter of the way between bf16 neighbours 1 and 1 + 2^-7."""
    x = torch.full((400_000,), 1.0 + 2**-10)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(out.float().mean().item() - x[0].item()) < 2e-5  # ~0.25 % of an ulp: unbiased
    x = torch.randn(100_000) * 1e-3
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(1))
    assert ((out.float() - x).mean() / x.abs().mean()).abs() < 1e-3


def test_representable_and_non_finite_values_pass_through():
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), 3.0e38, float("nan")])
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert out[:5].float().tolist() == [1.0, -2.5, 0.0, float("inf"), -float("inf")]
    assert torch.isfinite(out[5]) and torch.isnan(out[6])


def sgd_small_steps(rounding: str) -> float:
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = torch.optim.SGD([w], lr=1e-4)
    PrecisionHooks(opt, rounding=rounding, seed=3)
    for _ in range(200):
        w.grad = torch.full_like(w, -1.0)
        opt.step()
    return w.float().mean().item()


def test_small_updates_are_lost_to_nearest_and_kept_by_stochastic_rounding():
    """200 updates of 1e-4 each on 1.0 (under half a bf16 ulp, 2^-8): round-to-nearest never
    moves; stochastic rounding lands on 1.02 on average."""
    assert sgd_small_steps("nearest") == 1.0
    assert abs(sgd_small_steps("stochastic") - 1.02) < 1e-3


def bf16_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(torch.bfloat16)


def run(state_dtype, in_backward: bool, seed: int = 0) -> tuple[list[torch.Tensor], FRUGAL]:
    net = bf16_model()
    opt = FRUGAL(list(net.named_parameters()), lr=1e-2, density=0.5, update_gap=2)
    PrecisionHooks(opt, rounding="stochastic", state_dtype=state_dtype, seed=seed)
    hooks = StepInBackward(opt) if in_backward else None
    torch.manual_seed(1)
    for _ in range(5):
        loss = net(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean()
        loss.backward()
        if hooks is None:
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()], opt


def test_rounding_noise_is_reproducible_and_works_inside_backward():
    a, _ = run(None, False)
    b, _ = run(None, False)
    c, _ = run(None, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))  # in backward: the same step
    d, _ = run(None, False, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, d, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in a)


def test_moments_are_stored_in_the_state_dtype():
    _, opt32 = run(None, False)
    _, opt16 = run(torch.bfloat16, False)
    for opt, dtype in ((opt32, torch.float32), (opt16, torch.bfloat16)):
        moments = [st[k] for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st]
        assert moments and all(m.dtype == dtype for m in moments)


def test_stepping_one_tensor_at_a_time_is_the_same_update():
    """``hooks.step()`` makes float32 copies of one tensor at a time and equals ``opt.step()``."""
    results = []
    for per_tensor in (False, True):
        net = bf16_model()
        opt = FRUGAL(list(net.named_parameters()), lr=1e-2, density=0.5, update_gap=2)
        hooks = PrecisionHooks(opt, rounding="stochastic", seed=0)
        widest, real_before = [], hooks._before

        def before(*args, _real=real_before, _net=net, _widest=widest):
            _real(*args)
            _widest.append(sum(p.dtype == torch.float32 for p in _net.parameters()))

        opt._optimizer_step_pre_hooks.clear()
        opt.register_step_pre_hook(before)
        torch.manual_seed(1)
        for _ in range(4):
            net(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean().backward()
            if per_tensor:
                hooks.step()
            else:
                opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in net.parameters()])
        assert max(widest) == (1 if per_tensor else len(list(net.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def chunk_run(make_opt, chunk_bytes: int, rounding: str = "nearest", state_dtype=None, in_backward=False):
    """A bf16 embedding + linear stepped 3 times; returns weights, state and the widest float32
    tensor any optimizer step saw."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(64, 24), torch.nn.Linear(24, 24)).to(torch.bfloat16)
    opt = make_opt(net)
    hooks = PrecisionHooks(opt, rounding=rounding, state_dtype=state_dtype, seed=0, chunk_bytes=chunk_bytes)
    widest = []
    opt.register_step_pre_hook(
        lambda o, a, k: widest.append(
            max((p.numel() for g in o.param_groups for p in g["params"] if p.grad is not None), default=0)
        )
    )
    sib = StepInBackward(opt) if in_backward else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 64, (8,), generator=gen)
        net(x).float().pow(2).mean().backward()
        if sib is None:
            hooks.step()
    return [p.detach().clone() for p in net.parameters()], opt, max(widest)


def adamw(net):
    return torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)


def frugal(net):
    return FRUGAL(
        [("embed", net[0].weight), ("layers.0.mlp.up_proj.weight", net[1].weight), ("bias", net[1].bias)],
        lr=1e-2,
        density=0.5,
        update_gap=2,
        weight_decay=0.1,
    )


@pytest.mark.parametrize("make_opt", [adamw, frugal])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_elementwise_updates_stepped_in_slices_are_the_same_update(make_opt, state_dtype):
    """A big bf16 tensor is stepped a few rows at a time in float32 (the 7B recipe's embedding and
    head): with round-to-nearest the weights and every state tensor equal the whole-tensor step,
    bitwise, from the first step (state created) on; each float32 copy is one slice."""
    whole, opt_w, widest_w = chunk_run(make_opt, 0, state_dtype=state_dtype)
    sliced, opt_s, widest_s = chunk_run(make_opt, 4 * 24 * 5, state_dtype=state_dtype)  # 5 rows of 24
    # AdamW: every matrix goes in 5-row slices; FRUGAL: the embedding, while the projected linear is whole
    assert widest_w == 64 * 24 and widest_s == (5 * 24 if make_opt is adamw else 24 * 24)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced, strict=True))
    for p_w, p_s in zip(opt_w.state, opt_s.state, strict=True):
        st_w, st_s = opt_w.state[p_w], opt_s.state[p_s]
        assert st_w.keys() == st_s.keys()
        for k in st_w:
            assert torch.equal(st_w[k], st_s[k]), k
            assert st_w[k].dtype == st_s[k].dtype


def test_slices_with_stochastic_rounding_are_reproducible_and_equal_in_backward():
    a, _, _ = chunk_run(frugal, 4 * 24 * 5, rounding="stochastic")
    b, _, _ = chunk_run(frugal, 4 * 24 * 5, rounding="stochastic", in_backward=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_projected_weights_are_not_stepped_in_slices():
    """FRUGAL's projected update mixes a matrix's elements: it is stepped whole."""
    net = torch.nn.Sequential(torch.nn.Embedding(64, 24), torch.nn.Linear(24, 24))
    opt = frugal(net)
    assert opt.elementwise(net[0].weight) and not opt.elementwise(net[1].weight)
    assert opt.elementwise(net[1].bias)


def test_rounding_and_norms_of_big_tensors_go_in_slices(monkeypatch):
    """Stochastic rounding and the in-backward gradient norm take big tensors a slice at a time
    (bounded float32 / int32 buffers): still unbiased, non-finite values still pass through, and
    the sliced norm equals the whole one."""
    import leanlm.optim.in_backward as in_backward
    import leanlm.optim.precision as precision

    monkeypatch.setattr(precision, "SR_CHUNK", 1000)
    x = torch.full((50_000,), 1.0 + 2**-10)
    x[7], x[4321] = float("inf"), float("nan")
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    finite = torch.isfinite(x)
    assert abs(out[finite].float().mean().item() - (1.0 + 2**-10)) < 2e-4
    assert out[7].item() == float("inf") and torch.isnan(out[4321])
    monkeypatch.setattr(in_backward, "NORM_CHUNK", 100)
    g = torch.randn(37, 91).to(torch.bfloat16)
    assert abs(in_backward._norm(g) - torch.linalg.vector_norm(g.float()).item()) < 1e-4
