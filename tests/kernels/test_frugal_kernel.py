"""Fused FRUGAL update (Triton) against the reference path of the same optimizer."""

from __future__ import annotations

import pytest
import torch

from leanlm.kernels.frugal_update import frugal_update, frugal_update_reference, inverse_index
from leanlm.optim import FRUGAL


def _state(shape, k, dim, dtype, device, gen):
    m, n = shape
    index = torch.randperm(shape[dim], generator=gen)[:k].sort().values.to(device)
    moment = (m, k) if dim == 1 else (k, n)
    return {
        "exp_avg": (torch.randn(moment, generator=gen) * 0.1).to(device, dtype),
        "exp_avg_sq": torch.rand(moment, generator=gen).to(device, dtype) * 0.01,
        "step": torch.tensor(3.0),
        "index": index,
    }


@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("free", ["sign", "sgd", "none"])
@pytest.mark.parametrize("shape,k", [((40, 24), 6), ((17, 33), 1), ((64, 48), 0)])
def test_fused_step_matches_reference(dim, free, shape, k, device, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen).to(device)
    g = torch.randn(shape, generator=gen).to(device)
    g[0, :3] = 0.0  # sign(0) = 0 in both paths
    st = _state(shape, k, dim, torch.float32, device, gen)
    ref_p, ref_st = p.clone(), {key: v.clone() for key, v in st.items()}
    args = dict(dim=dim, lr=1e-2, lr_free=3e-3, betas=(0.9, 0.95), eps=1e-8, free=free, decay=0.999)
    frugal_update_reference(ref_p, g, ref_st, **args)
    monkeypatch.setenv("LEANLM_KERNELS", "triton")
    frugal_update(p, g, st, inv=inverse_index(st["index"], shape[dim]), **args)
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st["exp_avg"], ref_st["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"], ref_st["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert float(st["step"]) == float(ref_st["step"]) == (4.0 if k else 3.0)


def test_bf16_parameters_within_tolerance(device, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(32, 40, generator=gen).to(device, torch.bfloat16)
    g = torch.randn(32, 40, generator=gen).to(device, torch.bfloat16)
    st = _state((32, 40), 10, 1, torch.bfloat16, device, gen)
    ref_p, ref_st = p.clone(), {key: v.clone() for key, v in st.items()}
    args = dict(dim=1, lr=1e-2, lr_free=1e-2, betas=(0.9, 0.999), eps=1e-8, free="sign")
    frugal_update_reference(ref_p, g, ref_st, **args)
    monkeypatch.setenv("LEANLM_KERNELS", "triton")
    frugal_update(p, g, st, **args)
    torch.testing.assert_close(p.float(), ref_p.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("projection", ["columns", "rows"])
def test_optimizer_on_the_fused_path_tracks_the_reference(projection, device, monkeypatch):
    """Whole optimizer, 6 steps across a refresh with weight decay: fused vs reference."""
    torch.manual_seed(0)
    shapes = [(24, 16), (16, 40)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def run(path: str) -> list[torch.Tensor]:
        monkeypatch.setenv("LEANLM_KERNELS", path)
        torch.manual_seed(1)
        params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        opt = FRUGAL(params, lr=1e-2, density=0.25, projection=projection, update_gap=3, weight_decay=0.1)
        for step in grads:
            for p, gr in zip(params, step, strict=True):
                p.grad = gr.to(device)
            opt.step()
        return [p.detach().cpu() for p in params]

    for fused, ref in zip(run("triton"), run("reference"), strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
