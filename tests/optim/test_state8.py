"""8-bit optimizer moments: the codec against bitsandbytes' (when installed), the size rule, and
their life in PrecisionHooks (stored as uint8 + absmax, stepped in float32, saved and loaded as
plain tensors, converted exactly to float moments)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from leanlm.optim import PrecisionHooks, state8
from leanlm.optim.memory import state_bytes
from leanlm.optim.precision import STATE_8BIT


def sample(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.01


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_matches_the_dynamic_format(signed):
    x = sample() if signed else sample() ** 2
    codes, absmax = state8.encode(x, signed)
    assert codes.dtype == torch.uint8 and absmax.shape == (state8.blocks_of(x.numel()),)
    err = float((state8.decode(codes, absmax, signed) - x).norm() / x.norm())
    assert err < (0.013 if signed else 0.008)  # bitsandbytes: 1.1 % and 0.6 % (memory-r2-anchors §3)
    assert torch.equal(absmax[:-1], x[: (absmax.numel() - 1) * 256].view(-1, 256).abs().amax(1))


@pytest.mark.parametrize("signed", [True, False])
def test_codec_agrees_with_bitsandbytes(signed):
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnb.create_dynamic_map(signed=signed).float(), state8.dynamic_map(signed))
    x = sample() if signed else sample() ** 2
    ours, absmax = state8.encode(x, signed)
    theirs, qstate = bnb.quantize_blockwise(x, code=bnb.create_dynamic_map(signed=signed), blocksize=256)
    assert torch.equal(absmax, qstate.absmax)
    # the same code almost everywhere; where not, ours is the nearer entry (bitsandbytes' CPU
    # search is approximate near zero), so no element is worse and the total error is no larger
    assert float((ours == theirs).float().mean()) > 0.95
    ours_err = (state8.decode(ours, absmax, signed) - x).abs()
    theirs_err = (bnb.dequantize_blockwise(theirs, qstate) - x).abs()
    assert bool((ours_err <= theirs_err * (1 + 1e-6) + 1e-12).all())
    assert float(ours_err.norm()) <= float(theirs_err.norm())


def test_small_tensors_stay_float32():
    assert state8.quantizable((64, 64)) and not state8.quantizable((63, 64))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(128, 96, bias=False)  # 12288 values: 8-bit moments
        self.small = nn.Linear(96, 8, bias=False)  # 768 values: float32 moments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.tanh(self.big(x)))


def steps(net: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        net(torch.randn(16, 128, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_moments_are_stored_in_8_bits_and_the_step_stays_close_to_float32():
    net8, net32 = Net(), Net()
    opt8 = torch.optim.AdamW(net8.parameters(), lr=1e-2)
    PrecisionHooks(opt8, state_dtype=STATE_8BIT)
    opt32 = torch.optim.AdamW(net32.parameters(), lr=1e-2)
    steps(net8, opt8, 5)
    steps(net32, opt32, 5)
    big, small = opt8.state[net8.big.weight], opt8.state[net8.small.weight]
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_sq"].dtype == torch.uint8
    assert big["exp_avg_absmax"].shape == (48,) and small["exp_avg"].dtype == torch.float32
    # bytes: codes + absmax for the big tensor; float32 moments for the small one; step counters
    assert state_bytes(opt8) == 2 * (12288 + 48 * 4) + 2 * 768 * 4 + 2 * 4
    drift = (net8.big.weight - net32.big.weight).abs().max() / net32.big.weight.abs().max()
    assert 0 < float(drift) < 0.02


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 4096])  # whole tensors; slices of 8 rows
def test_8bit_state_saves_loads_and_resumes_bitwise(chunk_bytes):
    def make() -> tuple[Net, torch.optim.Optimizer]:
        net = Net().to(torch.bfloat16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        PrecisionHooks(opt, rounding="nearest", state_dtype=STATE_8BIT, chunk_bytes=chunk_bytes)
        return net, opt

    def bsteps(net, opt, n, gen):
        for _ in range(n):
            net(torch.randn(16, 128, generator=gen).to(torch.bfloat16)).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    straight, opt = make()
    bsteps(straight, opt, 4, torch.Generator().manual_seed(0))
    first, opt1 = make()
    gen = torch.Generator().manual_seed(0)
    bsteps(first, opt1, 2, gen)
    buf = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": opt1.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    assert opt2.state[resumed.big.weight]["exp_avg_absmax"].dtype == torch.float32  # not cast to bf16
    bsteps(resumed, opt2, 2, gen)
    assert torch.equal(straight.big.weight, resumed.big.weight)
    assert torch.equal(opt.state[straight.big.weight]["exp_avg"], opt2.state[resumed.big.weight]["exp_avg"])


def test_sliced_8bit_moments_equal_the_whole_tensor_ones():
    """Slices start on a 256-value block, so encoding them one at a time gives the same codes."""

    def run(chunk_bytes: int) -> dict:
        net = Net().to(torch.bfloat16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        PrecisionHooks(opt, rounding="nearest", state_dtype=STATE_8BIT, chunk_bytes=chunk_bytes)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            net(torch.randn(16, 128, generator=gen).to(torch.bfloat16)).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {k: v.clone() for k, v in opt.state[net.big.weight].items()}

    whole, sliced = run(64 << 20), run(3000)  # 3000 bytes: 5 rows, rounded to 2 (a block = 2 rows)
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


def test_8bit_moments_load_into_float_moments_exactly_and_back():
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    PrecisionHooks(opt, state_dtype=STATE_8BIT)
    steps(net, opt, 2)
    saved = opt.state_dict()
    st8 = opt.state[net.big.weight]
    decoded = state8.decode(st8["exp_avg"], st8["exp_avg_absmax"], signed=True)

    other = torch.optim.AdamW(net.parameters(), lr=1e-2)
    PrecisionHooks(other, state_dtype=torch.float32)
    other.load_state_dict(saved)
    st = other.state[net.big.weight]
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], decoded)
    assert "exp_avg_absmax" not in st

    again = torch.optim.AdamW(net.parameters(), lr=1e-2)
    PrecisionHooks(again, state_dtype=STATE_8BIT)
    again.load_state_dict(other.state_dict())  # float moments into an 8-bit run: encoded as a step would
    st = again.state[net.big.weight]
    codes, absmax = state8.encode(decoded, signed=True)
    assert torch.equal(st["exp_avg"], codes) and torch.equal(st["exp_avg_absmax"], absmax)
