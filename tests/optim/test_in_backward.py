"""The optimizer step inside backward (``leanlm.optim.StepInBackward``): the same step as
``backward(); step()``, with at most one gradient alive."""

from __future__ import annotations

import pytest
import torch

from leanlm.optim import FRUGAL, StepInBackward

OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=True),
    "frugal-columns": lambda m: FRUGAL(list(m.named_parameters()), lr=1e-2, density=0.5, update_gap=3),
    "frugal-randk": lambda m: FRUGAL(
        list(m.named_parameters()), lr=1e-2, density=0.5, projection="randk", update_gap=3
    ),
    "frugal-svd": lambda m: FRUGAL(list(m.named_parameters()), lr=1e-2, density=0.5, projection="svd", update_gap=3),
    "badam": lambda m: FRUGAL(
        list(m.named_parameters()), lr=1e-2, density=0.5, projection="blocks", state_free="none", update_gap=3
    ),
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))


def train(make, in_backward: bool, steps: int = 7, micro: int = 1, bucket: int = 0) -> list[torch.Tensor]:
    net = model()
    opt = make(net)
    hooks = StepInBackward(opt, bucket_bytes=bucket) if in_backward else None
    torch.manual_seed(1)
    for _ in range(steps):
        if hooks:
            hooks.begin()
        for j in range(micro):
            loss = net(torch.randn(5, 8)).pow(2).mean() / micro
            if hooks:
                hooks.armed = j == micro - 1
            loss.backward()
        if not hooks:
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("bucket", [0, 600, 1 << 20])
def test_step_in_backward_equals_the_plain_step_bitwise(name, micro, bucket):
    """7 steps cross two subspace refreshes (update_gap=3); 2 micro-batches accumulate first;
    buckets of 0 (each tensor alone), 600 bytes (a few tensors) and 1 MiB (all at the end)."""
    plain = train(OPTIMIZERS[name], False, micro=micro)
    hooked = train(OPTIMIZERS[name], True, micro=micro, bucket=bucket)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))


def test_at_most_one_gradient_is_alive_when_the_optimizer_steps():
    net = model()
    opt = FRUGAL(list(net.named_parameters()), lr=1e-2, density=0.5)
    params = list(net.parameters())
    alive, real_step = [], opt.step

    def counting_step(*args, **kwargs):
        alive.append(sum(p.grad is not None for p in params))
        return real_step(*args, **kwargs)

    opt.step = counting_step
    StepInBackward(opt)
    net(torch.randn(5, 8)).pow(2).mean().backward()
    assert alive == [1] * len(params)
    assert all(p.grad is None for p in params)


def test_a_bucket_bounds_the_gradients_alive():
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    params = list(net.parameters())
    alive_bytes, real_step = [], opt.step

    def counting_step(*args, **kwargs):
        alive_bytes.append(sum(p.grad.numel() * 4 for p in params if p.grad is not None))
        return real_step(*args, **kwargs)

    opt.step = counting_step
    StepInBackward(opt, bucket_bytes=600)
    net(torch.randn(5, 8)).pow(2).mean().backward()
    largest = max(p.numel() * 4 for p in params)
    assert 1 < len(alive_bytes) < len(params)
    assert max(alive_bytes) < 600 + largest
    assert all(p.grad is None for p in params)


def test_per_tensor_clipping_and_the_global_norm():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    hooks = StepInBackward(opt, clip=0.05)
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.randn(5, 8)).pow(2).mean() * 100
    grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    hooks.begin()
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert hooks.grad_norm() == pytest.approx(float(expected), rel=1e-5)
    for p, b, g in zip(net.parameters(), before, grads, strict=True):
        step = (b - p.detach()).norm()  # SGD with lr 1: the applied (clipped) gradient
        assert step == pytest.approx(min(0.05, float(g.norm())), rel=1e-4)


def test_a_nan_loss_or_gradient_updates_nothing():
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1.0)
    hooks = StepInBackward(opt)
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.randn(5, 8)).sum() * float("nan")
    assert not hooks.check_loss(loss)
    loss.backward()  # even if a caller backs it anyway, the hooks skip non-finite gradients
    assert not hooks.finite
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_remove_restores_the_plain_step():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    StepInBackward(opt).remove()
    net(torch.randn(5, 8)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
