"""Fused LOST linear (Triton) against a float64 reference: forward and all four gradients."""

from __future__ import annotations

import pytest
import torch

from leanlm.kernels.dispatch import PHIS
from leanlm.kernels.lost_linear import lost_linear, lost_linear_reference

# (N, n, m, r, k): ragged token counts, k off multiples of 16 (1, 25, 68, 273), r 16 / 64 / 128.
SHAPES = [
    (37, 48, 40, 16, 25),
    (20, 33, 17, 16, 1),
    (50, 96, 80, 64, 68),
    (19, 300, 64, 16, 273),
    (33, 160, 48, 128, 25),
    (24, 40, 24, 16, 0),
]


def _inputs(shape, dtype, device, seed=0):
    n_tok, n, m, r, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, n, generator=gen, dtype=torch.float64)
    a = torch.randn(n, r, generator=gen, dtype=torch.float64) / n**0.5
    b = torch.randn(r, m, generator=gen, dtype=torch.float64) / r**0.5
    ws = torch.randn(m, k, generator=gen, dtype=torch.float64) / max(k, 1) ** 0.5
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    dy = torch.randn(n_tok, m, generator=gen, dtype=torch.float64)
    return x, a, b, ws, idx.to(device), dy


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True)
    return y.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst element error relative to the largest reference element."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius): the bf16 measure, where single elements round by up to 2^-8."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _check(shape, phi, dtype, device, tol, monkeypatch, noncontig=False, gamma=0.3):
    monkeypatch.setenv("LEANLM_KERNELS", "triton")
    x, a, b, ws, idx, dy = _inputs(shape, dtype, device)
    y_ref, g_ref = _grads(lambda *t: lost_linear_reference(*t[:4], idx.cpu(), gamma, phi), (x, a, b, ws), dy)
    cast = [t.to(device=device, dtype=dtype) for t in (x, a, b, ws)]
    if noncontig:  # x as a transposed view: strides (1, N)
        cast[0] = cast[0].t().contiguous().t()
        assert not cast[0].is_contiguous()
    y, g = _grads(lambda *t: lost_linear(*t[:4], idx, gamma, phi), cast, dy.to(device))
    err = _rel if dtype == torch.float32 else _rel_norm
    assert err(y, y_ref) < tol, ("y", err(y, y_ref))
    for name, got, want in zip(("dx", "dA", "dB", "dW_s"), g, g_ref, strict=True):
        if want.numel():
            assert err(got, want) < tol, (name, err(got, want))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("phi", PHIS)
def test_fp32_matches_float64_reference(shape, phi, device, monkeypatch):
    _check(shape, phi, torch.float32, device, 1e-5, monkeypatch)


@pytest.mark.parametrize("phi", PHIS)
def test_non_contiguous_input(phi, device, monkeypatch):
    _check((37, 48, 40, 16, 25), phi, torch.float32, device, 1e-5, monkeypatch, noncontig=True)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bf16_within_one_percent(shape, device, monkeypatch):
    _check(shape, "silu", torch.bfloat16, device, 1e-2, monkeypatch)


def test_leading_dims_and_gamma_extremes(device, monkeypatch):
    for gamma in (0.0, 1.0):
        x3, a, b, ws, idx, _ = _inputs((30, 48, 40, 16, 25), torch.float32, device)
        monkeypatch.setenv("LEANLM_KERNELS", "triton")
        x3 = x3.float().to(device).view(5, 6, 48)
        args = [t.float().to(device) for t in (a, b, ws)]
        got = lost_linear(x3, *args, idx, gamma, "silu")
        want = lost_linear_reference(x3, *args, idx, gamma, "silu")
        assert got.shape == (5, 6, 40)
        assert _rel(got, want) < 1e-5


def test_custom_op_has_a_fake_implementation_for_compile(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leanlm.kernels.lost_op import lost_linear_bwd, lost_linear_fwd

    with FakeTensorMode():
        x, a = torch.empty(10, 32), torch.empty(32, 16)
        b, ws, idx = torch.empty(16, 24), torch.empty(24, 5), torch.empty(5, dtype=torch.long)
        g = torch.empty(())
        y, hpre = lost_linear_fwd(x, a, b, ws, idx, g, "silu")
        assert y.shape == (10, 24) and hpre.shape == (10, 16)
        grads = lost_linear_bwd(y, x, a, b, ws, idx, hpre, g, "silu")
        assert [tuple(g.shape) for g in grads] == [(10, 32), (32, 16), (16, 24), (24, 5)]
    torch.library.opcheck(
        lost_linear_fwd,
        (
            torch.randn(10, 32),
            torch.randn(32, 16),
            torch.randn(16, 24),
            torch.randn(24, 5),
            torch.tensor([1, 4, 9, 20, 31]),
            torch.tensor(0.5),
            "silu",
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_lost_layer_compiles_with_the_custom_op(device, monkeypatch):
    """torch.compile traces the fused op as one node (fake impl + registered autograd)."""
    from leanlm.optim.lost import LOSTLinear

    monkeypatch.setenv("LEANLM_KERNELS", "triton")
    torch.manual_seed(0)
    layer = LOSTLinear.from_dense(torch.nn.Linear(48, 40), rank=16, channel_density=0.5).to(device)
    x = torch.randn(3, 7, 48, device=device)
    eager = layer(x)
    eager.sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, eager)
    for p, g in zip(layer.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # also without the root conftest
def test_bf16_tensor_cores_at_a_1b_projection_shape(monkeypatch):
    """Real bf16 tensor-core dots (the interpreter widens them): 2048 -> 5461, r 512, ρ 0.05."""
    _check((1024, 2048, 5461, 512, 102), "silu", torch.bfloat16, torch.device("cuda"), 1e-2, monkeypatch)
