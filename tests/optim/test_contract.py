"""FRUGAL and its presets against torch's generic optimizer contract, in the spirit of torch's own
``TestOptimRenewed`` (test/test_optim.py): the error inputs every torch optimizer must reject
(``torch.testing._internal.common_optimizers``, shipped in the wheel), tensor ``lr``, descent,
no-op steps, state-dict round trips, older states, hooks and copies, on every configuration.
Each finding of the contract review (F1-F7) is pinned here."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from leanlm.optim import FRUGAL, apollo, apollo_mini, badam, fira, galore, galore_fira
from leanlm.optim.defaults import GROUP_DEFAULTS

DATA = Path(__file__).resolve().parents[1] / "data" / "optim"

# name -> optimizer over a list of tensors; the 13 configurations of the contract review
CONFIGS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "defaults": lambda ps, **kw: FRUGAL(ps, **kw),
    "density1": lambda ps, **kw: FRUGAL(ps, density=1.0, **kw),
    "rows": lambda ps, **kw: FRUGAL(ps, projection="rows", **kw),
    "randk": lambda ps, **kw: FRUGAL(ps, projection="randk", **kw),
    "blocks": lambda ps, **kw: FRUGAL(ps, projection="blocks", **kw),
    "svd": lambda ps, **kw: FRUGAL(ps, projection="svd", **kw),
    "random": lambda ps, **kw: FRUGAL(ps, projection="random", **kw),
    "galore": lambda ps, **kw: galore(ps, **kw),
    "badam": lambda ps, **kw: badam(ps, **kw),
    "fira": lambda ps, **kw: fira(ps, **kw),
    "galore_fira": lambda ps, **kw: galore_fira(ps, **kw),
    "apollo": lambda ps, **kw: apollo(ps, **kw),
    "apollo_mini": lambda ps, **kw: apollo_mini(ps, **kw),
}


def problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    """torch's descent problem: W (10, 5), b (10,), loss = ‖W x + b‖² for a fixed x."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(10, 5, generator=gen, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(10, generator=gen, dtype=dtype))
    x = torch.randn(5, generator=gen, dtype=dtype)

    def closure() -> torch.Tensor:
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    return [w, b], closure


def run(opt: torch.optim.Optimizer, closure, steps: int, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(opt.step(closure).detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


# --------------------------------------------------------------------------- F3: bad arguments


def test_torchs_error_inputs_are_rejected_as_torch_rejects_them():
    """Every error input torch checks for all of its optimizers, with its error type and message."""
    pytest.importorskip("expecttest")  # torch's test helpers import it (a dev dependency)
    from torch.testing._internal.common_optimizers import get_error_inputs_for_all_optims

    for error in get_error_inputs_for_all_optims("cpu", torch.float32):
        given = error.optimizer_error_input
        for make in CONFIGS.values():
            if issubclass(error.error_type, Warning):
                with pytest.warns(error.error_type, match=error.error_regex):
                    make(given.params, **given.kwargs)
            else:
                with pytest.raises(error.error_type, match=error.error_regex):
                    make(given.params, **given.kwargs)


def test_hyperparameters_are_checked_before_the_parameters():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        FRUGAL(None, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts, but got torch.FloatTensor"):
        FRUGAL(torch.nn.Parameter(torch.randn(3, 2)))
    with pytest.raises(ValueError, match="FRUGAL: invalid projection='colums'"):
        FRUGAL(None, projection="colums")


def test_complex_parameters_are_refused_before_any_update():
    """F2: a documented refusal (no complex parameters in LLM pretraining)."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    opt = FRUGAL([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse or complex gradients"):
        opt.step()
    assert torch.equal(p, before)


# --------------------------------------------------------------------------- F1: tensor lr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tensor_lr_steps_as_the_same_float_lr_including_under_a_scheduler(name):
    """``lr=torch.tensor(...)`` on every path (the dense AdamW part too), changed by a scheduler."""
    runs = []
    for lr in (float(torch.tensor(1e-2)), torch.tensor(1e-2)):  # the same float32 value
        params, closure = problem()
        opt = CONFIGS[name](params, lr=lr, update_gap=2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        run(opt, closure, 5, sched)
        runs.append([p.detach().clone() for p in params])
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**2)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# --------------------------------------------------------------------------- descent, no-ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_goes_right_direction(name, dtype):
    """torch's ``test_forloop_goes_right_direction``: the loss falls over a few steps, whatever the
    seed (F4: svd / random with the sign rule once rose on a rank-1 gradient)."""
    for seed in range(4):
        params, closure = problem(dtype, seed)
        opt = CONFIGS[name](params, lr=1e-3, update_gap=2)
        losses = run(opt, closure, 6)
        assert losses[-1] < losses[0], (seed, losses)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_per_group_weight_decay_and_lr_schedulers_go_right_direction(name):
    """torch's ``test_param_groups_weight_decay`` / ``..._with_lrscheduler_goes_right_direction``."""
    (w, b), closure = problem()
    opt = CONFIGS[name]([{"params": [w], "weight_decay": 0.01}, {"params": [b], "lr": 1e-2}], lr=1e-3, update_gap=2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    losses = run(opt, closure, 6, sched)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_step_without_gradients_changes_nothing(name):
    params, _ = problem()
    opt = CONFIGS[name](params, lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True)) and not opt.state


# --------------------------------------------------------------------------- state round trips


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_round_trip_weights_only_continues_bitwise(name, tmp_path):
    params, closure = problem()
    opt = CONFIGS[name](params, lr=1e-2, update_gap=2)
    run(opt, closure, 3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = CONFIGS[name](twin, lr=1e-2, update_gap=2)
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    x = torch.randn(5, generator=torch.Generator().manual_seed(9))
    for ps, o in ((params, opt), (twin, other)):
        for _ in range(3):  # crosses a refresh
            o.zero_grad()
            (ps[0].mv(x) + ps[1]).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin, strict=True))
    assert copy.deepcopy(opt).state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def _without(state: dict, key: str) -> dict:
    state = copy.deepcopy(state)
    for group in state["param_groups"]:
        group.pop(key, None)
    return state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_state_saved_before_any_group_key_existed_resumes(name):
    """F6: drop each group key in turn (a state saved before it was added): it loads, gets this
    optimizer's value for the key, and steps past a subspace refresh."""
    params, closure = problem()
    opt = CONFIGS[name](params, lr=1e-2, update_gap=2)
    run(opt, closure, 3)
    saved = opt.state_dict()
    for key in GROUP_DEFAULTS:
        fresh = CONFIGS[name]([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, update_gap=2)
        fresh.load_state_dict(_without(saved, key))
        assert [g[key] for g in fresh.param_groups] == [g[key] for g in opt.param_groups], key
        run(fresh, closure, 3)


@pytest.mark.parametrize("projection", ["columns", "svd"])
def test_a_state_written_by_an_older_leanlm_resumes(projection):
    """F6 on a real file: FRUGAL's state saved by leanlm ec7a3e9 (before the ``rank`` and
    ``scaling`` keys; scripts/old_optim_state.py) loads with ``weights_only`` and trains on."""
    saved = torch.load(DATA / "frugal_state_before_rank.pt", weights_only=True)
    assert saved["commit"] == "ec7a3e9"
    old = saved[projection]
    assert not {"rank", "scaling"} & set(old["optim"]["param_groups"][0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    model.load_state_dict(old["model"])
    opt = FRUGAL(model.parameters(), lr=1e-2, update_gap=2, projection=projection)
    opt.load_state_dict(old["optim"])
    assert opt.param_groups[0]["rank"] is None and opt.param_groups[0]["scaling"] == "channel"
    moments = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    for key, value in moments.items():
        assert torch.equal(value, old["optim"]["state"][0][key]), key
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):  # two refreshes: where the KeyError used to come
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_group_key_has_one_default():
    """The constructor's keywords are the table's keys with the table's values; a keyword the table
    lacks cannot be added (construction would fail), so every key can be filled on load."""
    sig = inspect.signature(FRUGAL.__init__).parameters
    keywords = {k: p.default for k, p in sig.items() if k not in ("self", "params")}
    assert keywords == {k: v for k, v in GROUP_DEFAULTS.items() if k != "projectable"}
    assert set(FRUGAL([torch.nn.Parameter(torch.randn(2, 2))]).defaults) == set(GROUP_DEFAULTS)
    for preset in (galore, badam, fira, galore_fira, apollo, apollo_mini):
        for key, p in inspect.signature(preset).parameters.items():
            if key in GROUP_DEFAULTS and p.default is not inspect.Parameter.empty and preset is not galore_fira:
                assert p.default == GROUP_DEFAULTS[key], (preset.__name__, key)


def test_named_and_unnamed_states_load_only_into_their_kind():
    """F7: a state from ``named_parameters()`` (two groups) into an optimizer from ``parameters()``
    (one group), or the reverse, is refused with how to build the matching one."""
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(8, 4), "layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)])}
    )
    named = [(f"model.layers.0.mlp.up_proj.{n}", p) for n, p in model.layers[0].named_parameters()]
    named += [("model.embed_tokens.weight", model.embed.weight)]
    a = FRUGAL(named, lr=1e-3)
    b = FRUGAL([p for _, p in named], lr=1e-3)
    with pytest.raises(ValueError, match=r"built from named parameters \(2 groups\).*build it from model.named_pa"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"built from unnamed parameters \(1 group\).*model.parameters\(\)"):
        a.load_state_dict(b.state_dict())
    FRUGAL(named, lr=1e-3).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- F4, F5


def test_round_off_of_a_gradient_inside_the_subspace_is_not_a_sign_step():
    """F4, the reproduction: a rank-1 gradient, an svd subspace of rank 1, the sign rule. The
    residual G − P↑P↓G is round-off; it used to become ±lr on every entry."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 5, dtype=torch.float64))
    x = torch.randn(5, dtype=torch.float64)
    opt = FRUGAL([w], lr=1e-3, projection="svd")
    w.mv(x).pow(2).sum().backward()
    before = w.detach().clone()
    opt.step()
    step, v = w.detach() - before, x / x.norm()
    off = step - torch.outer(step @ v, v)  # the part of the step outside the gradient's row space
    assert off.abs().max() < 1e-8  # was 1.6e-3 (≈ lr)


def _sign_part(projection: str, rank: int | None, grad: torch.Tensor) -> torch.Tensor:
    """The state-free (sign) part of one step on a (64, 64) matrix: the step with the sign rule
    minus the same step without a state-free part."""
    steps = []
    for free in ("sign", "none"):
        w = torch.nn.Parameter(torch.zeros(64, 64))
        opt = FRUGAL([w], lr=1e-3, projection=projection, rank=rank, state_free=free)
        w.grad = grad.clone()
        opt.step()
        steps.append(w.detach().clone())
    return steps[0] - steps[1]


@pytest.mark.parametrize(("projection", "rank"), [("svd", None), ("svd", 4), ("random", 64)])
def test_a_layer_fed_few_tokens_gets_no_sign_step_from_round_off(projection, rank):
    """F4: a (64, 64) layer fed 4 tokens has a rank-4 gradient. With its own top singular vectors
    (rank 16 from density, or exactly 4) or an orthonormal basis of the whole space, the residual is
    round-off and no sign step is taken; a full-rank gradient still gets one on most entries. (A
    Gaussian projection is not a projector: its residual is never round-off.)"""
    torch.manual_seed(1)
    x, dy = torch.randn(4, 64), torch.randn(4, 64)
    few = dy.T @ x  # (64, 64), rank 4: what a linear layer's gradient is for 4 tokens
    assert torch.equal(_sign_part(projection, rank, few), torch.zeros(64, 64))
    full = _sign_part(projection, 16, torch.randn(64, 64))  # a basis of rank 16: a real residual
    assert (full.abs() > 0.5e-3).float().mean() > 0.5


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_badam_trains_at_least_one_block_in_every_group(n):
    """F5: round(0.25·n) is 0 for n <= 2 (the official code's rounding); at least one block trains."""
    ws = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n)]
    opt = badam(ws, lr=1e-2)
    before = [w.detach().clone() for w in ws]
    for _ in range(3):
        opt.zero_grad()
        sum(w.sum() for w in ws).pow(2).backward()
        opt.step()
    moved = sum(not torch.equal(w, b) for w, b in zip(ws, before, strict=True))
    assert moved == max(1, round(0.25 * n))
    frozen = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = FRUGAL(frozen, lr=1e-2, projection="blocks", density=0.0, state_free="none")
    frozen[0].grad = torch.ones(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not opt.state[frozen[0]]["active"]  # density 0: no state-full block, as asked


# --------------------------------------------------------------------------- hooks, printing


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_hooks_run_and_the_optimizer_prints(name):
    params, closure = problem()
    opt = CONFIGS[name](params, lr=1e-3)
    seen: list[str] = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.step(closure)
    pre.remove()
    post.remove()
    opt.step(closure)
    assert seen == ["pre", "post"] and type(opt).__name__ in repr(opt)
