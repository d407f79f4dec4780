"""Int8 weights that learn (leanlm.optim.quantized) and their step through PrecisionHooks: the
invariants of memory-r2-anchors §2/§6 (zero update is a no-op, rounding is unbiased, sub-grid
updates accumulate, a scale is refitted only when its group overflows, resumes are bitwise)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.optim import PrecisionHooks
from leanlm.optim.quantized import (
    INT8_MAX,
    Int8Linear,
    dequantize,
    dequantize_linears,
    dequantize_state,
    int8_bytes,
    quantize,
    requantize_,
)


def weight(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("group", [0, 128, 64])
def test_round_to_nearest_error_is_at_most_half_a_grid_step(group):
    w = weight()
    codes, scale = quantize(w, group)
    g = group or w.shape[1]
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64, 256 // g)
    assert int(codes.abs().max()) == INT8_MAX  # each group's absmax lands on the last code
    step = scale.repeat_interleave(g, dim=1)
    assert bool(((dequantize(codes, scale) - w).abs() <= step / 2 + 1e-9).all())


@pytest.mark.parametrize("group", [0, 128])
def test_a_zero_update_leaves_every_code_and_scale_bit_identical(group):
    codes, scale = quantize(weight(), group)
    before = codes.clone(), scale.clone()
    refit = requantize_(codes, scale, dequantize(codes, scale), torch.Generator().manual_seed(3))
    assert torch.equal(codes, before[0]) and torch.equal(scale, before[1]) and not bool(refit.any())


def test_stochastic_rounding_is_unbiased():
    codes, scale = quantize(weight(8, 128), 0)
    x = dequantize(codes, scale) + 0.3 * scale  # 0.3 of a grid step above each stored value
    total, n = torch.zeros_like(x), 2000
    for i in range(n):
        c, s = codes.clone(), scale.clone()
        requantize_(c, s, x, torch.Generator().manual_seed(i))
        total += dequantize(c, s)
    err = (total / n - x) / scale  # in grid steps; each mean has std sqrt(0.21 / n) ~ 0.01
    assert float(err.abs().mean()) < 0.015 and float(err.abs().max()) < 0.06
    assert abs(float(err.mean())) < 0.003


def test_sub_grid_updates_accumulate():
    """100 updates of a tenth of a grid step move a weight by ~10 grid steps (not 0, as round to
    nearest would)."""
    codes, scale = quantize(weight(16, 128), 0)
    start = dequantize(codes, scale)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        requantize_(codes, scale, dequantize(codes, scale) + 0.1 * scale, gen)
    moved = ((dequantize(codes, scale) - start) / scale)[:, :100]  # away from the clamped maxima
    assert 9.0 < float(moved.mean()) < 11.0


def test_a_scale_is_refitted_only_where_an_update_leaves_its_range():
    codes, scale = quantize(weight(4, 256), 128)
    before = scale.clone()
    x = dequantize(codes, scale)
    x[1, 200] = 2 * float(x[1, 128:].abs().max())  # row 1, second group, beyond 127 steps
    refit = requantize_(codes, scale, x, torch.Generator().manual_seed(0))
    assert refit.tolist() == [[False, False], [False, True], [False, False], [False, False]]
    changed = scale != before
    assert torch.equal(changed, refit)
    assert int(codes[1, 200]) == INT8_MAX and torch.allclose(scale[1, 1], x[1, 200] / INT8_MAX)


def test_group_must_divide_the_row():
    with pytest.raises(ValueError, match="int8 group 100 must divide the row length 256"):
        quantize(weight(), 100)


def test_int8_linear_matches_a_float_linear_forward_and_backward():
    torch.manual_seed(0)
    dense = nn.Linear(256, 64, bias=False)
    q = Int8Linear.from_linear(dense, group=128)
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = q(x)
    w = q.dequantized().requires_grad_()
    ref = F.linear(x, w)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    x_grad = x.grad.clone()
    x.grad = None
    ref.backward(g)
    assert torch.allclose(x_grad, x.grad, atol=1e-6)
    assert q.weight.grad.dtype == torch.bfloat16 and q.weight.grad.shape == (64, 256)
    assert torch.allclose(q.weight.grad.float(), w.grad, rtol=1e-2, atol=1e-2)


def test_int8_linear_storage_state_dict_and_casts():
    q = Int8Linear.from_linear(nn.Linear(256, 64, bias=False), group=0)
    assert q.weight.stride() == (0, 0) and q.weight.untyped_storage().nbytes() == 2  # no weight storage
    assert list(q.state_dict()) == ["weight_codes", "weight_scale"]
    assert int8_bytes(q) == 64 * 256 + 64 * 4
    q.to(torch.bfloat16).to(torch.float64)
    assert q.weight_codes.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert q.weight.stride() == (0, 0)
    # a state dict loads (copy or assign), also saved with weights_only
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other = Int8Linear(256, 64, group=0)
    other.load_state_dict(state)
    assert torch.equal(other.dequantized(), q.dequantized())
    other2 = Int8Linear(256, 64, group=0)
    other2.load_state_dict(state, assign=True)
    assert other2.weight_codes is state["weight_codes"]
    # a float weight is quantized on load; int8 state dequantizes to a float one
    w = weight()
    other.load_state_dict({"weight": w})
    assert torch.equal(other.weight_codes, quantize(w, 0)[0])
    assert torch.equal(dequantize_state(state, torch.bfloat16)["weight"], q.dequantized(torch.bfloat16))


def test_dequantize_linears_gives_plain_linears():
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(128, 32, bias=False)))
    w = model[0].dequantized(torch.bfloat16)
    assert dequantize_linears(model, torch.bfloat16) == 1
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, w)


class TwoLayers(nn.Module):
    def __init__(self, group: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(16, 256, bias=False)  # a float (bf16) tensor beside the int8 ones
        self.up = Int8Linear.from_linear(nn.Linear(256, 512, bias=False), group)
        self.down = Int8Linear.from_linear(nn.Linear(512, 256, bias=False), group)
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.emb(x))))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_zero_steps_change_nothing():
    model = TwoLayers(group=128)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    PrecisionHooks(opt, seed=0)
    before = snapshot(model)
    train_steps(model, opt, 3)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(opt.state[model.up.weight]["sr_count"]) == 3


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 64 * 1024])  # whole tensors; slices of 32 rows
def test_int8_training_is_reproducible_and_resumes_bitwise(chunk_bytes):
    def run(steps: int, state: dict | None = None) -> tuple[TwoLayers, torch.optim.Optimizer]:
        model = TwoLayers()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        PrecisionHooks(opt, seed=7, chunk_bytes=chunk_bytes)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
        return model, opt

    straight, opt = run(0)
    train_steps(straight, opt, 4)
    first, opt1 = run(0)
    train_steps(first, opt1, 2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed, opt2 = run(0, saved)
    gen_state = torch.Generator().manual_seed(0)
    for _ in range(2):  # the batches the straight run drew first, then the same later ones
        torch.randn(8, 16, generator=gen_state)
    for _ in range(2):
        x = torch.randn(8, 16, generator=gen_state).to(torch.bfloat16)
        resumed(x).float().pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    a, b = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["up.weight_codes"], TwoLayers().state_dict()["up.weight_codes"])  # it learned


def test_int8_step_follows_the_float32_update_within_a_grid_step():
    model = TwoLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    PrecisionHooks(opt, seed=0, chunk_bytes=64 * 1024)
    w0 = model.up.dequantized()
    x = torch.randn(8, 16).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    expected = w0 - 0.5 * model.up.weight.grad.float()
    opt.step()
    step = model.up.weight_scale  # (512, 1): no refit expected for this small update
    assert bool(((model.up.dequantized() - expected).abs() <= step * 1.0001).all())


def test_two_big_tensors_stepped_in_slices_are_each_stepped_once():
    """Regression: a plain ``opt.step()`` over two tensors big enough to be stepped in slices
    stepped the first one a second time (its gradient was back while the second's slices ran).
    bf16 weights rounded to nearest: slices must give exactly the whole-tensor step."""

    def run(chunk_bytes: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        PrecisionHooks(opt, rounding="nearest", state_dtype=torch.float32, chunk_bytes=chunk_bytes)
        train_steps(nn.Sequential(nn.Linear(16, 256, bias=False).to(torch.bfloat16), model), opt, 2)
        return snapshot(model)

    whole, sliced = run(64 << 20), run(64 * 1024)
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)
