import pytest
import torch

from leanlm.optim import build_optimizer
from leanlm.optim.factory import optimizer_kwargs, param_groups_by_decay


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups_by_decay(model.named_parameters(), 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = build_optimizer("adamw", a.named_parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(5):
        x = torch.randn(8, 5)
        for m, opt in ((a, ours), (b, ref)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("lion", [], lr=1.0)


@pytest.mark.parametrize(
    "name,settings,expect",
    [
        ("fira", {}, dict(projection="svd", state_free="fira", reset_on_refresh=False)),
        ("apollo", {}, dict(projection="gaussian", state_free="apollo", scaling="channel", rank=None)),
        (
            "galore_fira",
            {},
            dict(
                projection="svd", state_free="fira", proj_lr_scale=0.25, state_free_lr_scale=1.0, reset_on_refresh=False
            ),
        ),
        (
            "apollo",
            {"rank": 1, "scaling": "tensor", "apollo_scale": 128.0},
            dict(rank=1, scaling="tensor", proj_lr_scale=128.0**0.5),
        ),
        ("frugal", {"state_free": "fira", "rank": 0}, dict(state_free="fira", projection="columns", rank=None)),
    ],
)
def test_config_names_build_the_presets(name, settings, expect):
    """``optim.name=fira|apollo`` and the new keys reach the optimizer (rank 0 means "from density")."""
    import dataclasses

    from leanlm.engine.config import load_config

    over = [f"optim.name={name}"] + [f"optim.{k}={v}" for k, v in settings.items()]
    cfg = load_config(None, over)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    named = [("layers.0.mlp.up_proj.weight", model[0].weight), ("norm.bias", model[0].bias)]
    opt = build_optimizer(name, named, **optimizer_kwargs(name, dataclasses.asdict(cfg.optim), seed=0))
    group = opt.param_groups[0]
    for key, value in expect.items():
        assert group[key] == pytest.approx(value) if isinstance(value, float) else group[key] == value, key
