import pytest
import torch

from leanlm.optim import build_optimizer, param_groups_by_decay


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
