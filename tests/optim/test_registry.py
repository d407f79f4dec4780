"""One registry drives every optimizer name list: the config's choices, ``build_optimizer``,
``optimizer_kwargs``, the engine, the Hugging Face factory and ``leanlm keys``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import leanlm.optim
from leanlm.engine.config import describe_keys, load_config
from leanlm.engine.errors import ConfigError
from leanlm.optim import build_optimizer
from leanlm.optim.factory import optimizer_kwargs
from leanlm.optim.integrations import TrainerOptimizer
from leanlm.optim.registry import REGISTRY, Entry, register


class Dummy(torch.optim.SGD):
    """Plain SGD under another name: what a user's own optimizer would register as."""


def _dummy(named_params, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return Dummy([p for _, p in named_params], lr=lr, weight_decay=weight_decay)


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "dummy", Entry(build=_dummy, settings={"lr": "lr"}, seeded=False))
    return "dummy"


def test_an_optimizer_registered_in_one_place_is_found_everywhere(dummy):
    model = torch.nn.Linear(4, 3)
    cfg = load_config(None, ["optim.name=dummy", "optim.lr=0.5"])  # a valid config choice
    assert any("dummy" in help_ for key, _, help_ in describe_keys() if key == "optim.name")  # leanlm keys
    kwargs = optimizer_kwargs(dummy, dataclasses.asdict(cfg.optim), seed=0)
    assert kwargs == {"lr": 0.5}
    assert isinstance(build_optimizer(dummy, model.named_parameters(), **kwargs), Dummy)
    assert isinstance(TrainerOptimizer()(model, optimizer=dummy, lr=0.1), Dummy)  # Hugging Face Trainer

    from leanlm.engine.build import make_optimizer

    assert isinstance(make_optimizer(cfg, model.named_parameters()), Dummy)  # the engine


def test_an_unregistered_name_is_refused_everywhere_with_the_choices():
    with pytest.raises(ConfigError, match="optim.name='lion': must be one of adamw, frugal, galore"):
        load_config(None, ["optim.name=lion"])
    for call in (lambda: build_optimizer("lion", []), lambda: TrainerOptimizer()(torch.nn.Linear(2, 2), "lion")):
        with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of adamw, .*apollo_mini"):
            call()
    with pytest.raises(ValueError, match="already registered"):
        register("adamw", REGISTRY["adamw"])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_name_builds_from_the_default_config(name):
    """Each entry's settings exist in the config and its builder takes them."""
    cfg = load_config(None, [f"optim.name={name}"])
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8))
    named = [("embed.weight", model[0].weight), ("layers.0.mlp.up_proj.weight", model[1].weight)]
    opt = build_optimizer(name, named, **optimizer_kwargs(name, dataclasses.asdict(cfg.optim), seed=0))
    model[1](model[0](torch.arange(4))).square().sum().backward()
    opt.step()


def test_apollo_mini_keeps_its_recipe_from_the_config():
    """optim.name=apollo_mini is APOLLO-Mini (rank 1, per tensor, √128), whatever the apollo keys say."""
    cfg = load_config(None, ["optim.name=apollo_mini", "optim.apollo_scale=4", "optim.rank=8"])
    w = torch.nn.Parameter(torch.randn(16, 16))
    opt = build_optimizer(
        "apollo_mini",
        [("layers.0.mlp.up_proj.weight", w)],
        **optimizer_kwargs("apollo_mini", dataclasses.asdict(cfg.optim), seed=0),
    )
    group = opt.param_groups[0]
    assert (group["rank"], group["scaling"], group["proj_lr_scale"]) == (1, "tensor", pytest.approx(128**0.5))


def test_apollo_mini_trains_in_the_engine(tiny_overrides):
    from leanlm.engine.trainer import train

    res = train(load_config(None, [*tiny_overrides, "optim.name=apollo_mini", "train.steps=3", "eval.every=3"]))
    assert res.step == 3 and res.final is not None and torch.isfinite(torch.tensor(res.final.loss))


def test_the_drop_in_api_is_the_package_exports():
    """``leanlm.optim`` exports the drop-in API only, lazily; the names a type checker sees (the
    TYPE_CHECKING imports) are the names ``__all__`` lists and ``__getattr__`` serves."""
    tree = ast.parse(Path(leanlm.optim.__file__).read_text())
    checked = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for imp in node.body
        for alias in imp.names
    }
    assert checked == set(leanlm.optim.__all__) == set(leanlm.optim._OWNERS)
    for name in leanlm.optim.__all__:
        assert getattr(leanlm.optim, name) is not None
    for plumbing in ("optimizer_kwargs", "OPTIMIZERS", "stochastic_round_", "is_projectable_name"):
        with pytest.raises(AttributeError):
            getattr(leanlm.optim, plumbing)
