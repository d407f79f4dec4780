import math
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from leanlm.engine.reweight import WeightStats, normalise, sample_weights, strategy_values
from leanlm.engine.step import batch_loss

STRATEGIES = ["linupper", "quadratic", "extremes"]


def test_strategy_functions_at_known_points():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert strategy_values(x, "linupper").tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert strategy_values(x, "quadratic").tolist() == [0.0, 0.75, 1.0, 0.75, 0.0]
    assert strategy_values(x, "extremes").tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]


def test_normalisation_maps_min_and_max_to_minus_one_and_one():
    x = normalise(torch.tensor([2.0, 3.0, 4.0, 6.0]))
    assert x.tolist() == [-1.0, -0.5, 0.0, 1.0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", [0.4, 1.0, 5.0])
def test_weights_sum_to_one_and_respect_the_ratio_bound(strategy, r):
    losses = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 5 + 1
    w = sample_weights(losses, strategy, r)
    assert w.shape == losses.shape
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (w.max() / w.min()).item() <= math.exp(1 / r) * (1 + 1e-5)


@pytest.mark.parametrize("strategy", [*STRATEGIES, "uniform"])
def test_equal_losses_give_uniform_weights(strategy):
    w = sample_weights(torch.full((10,), 3.7), strategy, 0.5)
    torch.testing.assert_close(w, torch.full((10,), 0.1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invariant_to_positive_affine_transforms(strategy):
    losses = torch.tensor([2.1, 3.3, 2.9, 5.0, 4.4, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        sample_weights(losses, strategy, 0.7), sample_weights(3.5 * losses + 11.0, strategy, 0.7)
    )


def test_linupper_down_weights_low_loss_rows():
    w = sample_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "linupper", 1.0)
    assert w[0] < w[1] < w[2] and w[2] == pytest.approx(w[3].item())


def test_no_gradient_flows_through_the_weights():
    rows = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    loss, stats = batch_loss(rows, "extremes", 0.5)
    loss.backward()
    w = sample_weights(rows.detach(), "extremes", 0.5)
    torch.testing.assert_close(rows.grad, w)  # d/dℓ_i Σ w_j ℓ_j = w_i: w is a constant
    assert stats.max_wn > 1 > stats.min_wn and 0 < stats.ess_frac < 1


def test_uniform_is_bit_identical_to_the_plain_mean():
    rows = torch.rand(13, dtype=torch.float32)
    assert torch.equal(batch_loss(rows, "uniform")[0], rows.mean())
    assert torch.equal(batch_loss(rows, None)[0], rows.mean())


def test_stats_of_uniform_weights():
    s = WeightStats.of(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]))
    assert (s.l_min, s.l_max, s.mean_loss, s.ess_frac, s.max_wn, s.min_wn) == (
        1.0,
        3.0,
        2.0,
        1.0,
        1.0,
        1.0,
    )
    assert set(s.scalars()) == {
        f"reweight/{k}" for k in ("l_min", "l_max", "mean_loss", "ess_frac", "max_wn", "min_wn")
    }


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="1-D"):
        sample_weights(torch.zeros(2, 2), "linupper", 1.0)
    with pytest.raises(ValueError, match="r must be > 0"):
        sample_weights(torch.zeros(3), "linupper", 0.0)


# ---------------------------------------------------------------- two ranks == one rank


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1)


def _rows(model, x, y):
    return ((model(x).squeeze(-1) - y) ** 2).float()  # a per-row loss


def _rank_main(rank, world, port, x, y, out):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss, _ = batch_loss(_rows(model, x[local], y[local]), "linupper", 0.5)
        loss.backward()
        for p in model.parameters():  # what DDP does: average gradients over ranks
            tdist.all_reduce(p.grad)
            p.grad /= world
        torch.save([p.grad for p in model.parameters()], f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, x, y, str(tmp_path)), nprocs=2, start_method="fork")
    model = _model()
    rows = _rows(model, x, y)
    loss, _ = batch_loss(rows, "linupper", 0.5)
    loss.backward()
    w = sample_weights(rows.detach(), "linupper", 0.5)
    assert w.max() / w.min() > 1.5  # the weighting is far from uniform, so the test has teeth
    for r in range(2):
        grads = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for got, want in zip(grads, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
