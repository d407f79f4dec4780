"""Drop-in regressions (issue 16, the drop-in findings F1-F5 / R1-R9): FRUGAL and LOST used as
other codebases use torch optimizers and layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from leanlm.optim import FRUGAL


def block(d: int = 8) -> nn.ModuleDict:
    """Names the projectable rule knows (``layers.0.mlp.up_proj.weight``, ...)."""
    return nn.ModuleDict(
        {"layers": nn.ModuleList([nn.ModuleDict({"mlp": nn.ModuleDict({"up_proj": nn.Linear(d, d)})})])}
    )


def test_the_public_api_the_design_promises():
    """``from leanlm.optim import FRUGAL, LOSTLinear, convert`` and a callable
    ``leanlm.kernels.lost_linear`` (it used to be the submodule: TypeError)."""
    import leanlm.kernels
    from leanlm.kernels.lost_linear import lost_linear_reference  # the module stays importable
    from leanlm.optim import LOSTLinear, convert

    layer = LOSTLinear(16, 12, rank=4, channel_density=0.25)
    x = torch.randn(3, 16)
    args = (layer.lowrank_in, layer.lowrank_out, layer.sparse, layer.index, layer.gamma, "silu")
    assert torch.allclose(leanlm.kernels.lost_linear(x, *args), lost_linear_reference(x, *args))
    assert callable(convert)


def test_add_param_group_indexes_checks_and_names_the_new_tensors():
    """F1: a projectable tensor added later steps (no KeyError), a bad option is refused and leaves
    the optimizer as it was, and named pairs are split by the name rule with their names kept."""
    base, extra = nn.Linear(8, 8), nn.Linear(8, 8)
    opt = FRUGAL(base.parameters(), lr=1e-3, density=0.5)
    opt.add_param_group({"params": [extra.weight]})
    (base(torch.randn(2, 8)).sum() + extra(torch.randn(2, 8)).sum()).backward()
    before = extra.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, extra.weight) and "index" in opt.state[extra.weight]
    with pytest.raises(ValueError, match="projection='colums'"):
        opt.add_param_group({"params": [nn.Linear(8, 8).weight], "projection": "colums"})
    assert len(opt.param_groups) == 2
    named = FRUGAL(block().named_parameters(), lr=1e-3)
    head = nn.Linear(8, 8)
    named.add_param_group({"params": [*block().named_parameters(prefix="extra"), ("head.weight", head.weight)]})
    names = [n for g in named.param_groups for n in g["param_names"]]
    assert names[-3:] == ["extra.layers.0.mlp.up_proj.weight", "extra.layers.0.mlp.up_proj.bias", "head.weight"]
    assert "extra.layers.0.mlp.up_proj.weight" in named.projectable_names()
    assert "head.weight" not in named.projectable_names()


def test_parameter_names_are_kept_in_groups_and_state_dicts():
    """R6: like torch's own optimizers given ``named_parameters()``."""
    model = block()
    opt = FRUGAL(model.named_parameters(), lr=1e-3)
    sd = opt.state_dict()
    assert [n for g in sd["param_groups"] for n in g["param_names"]] == [
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.up_proj.bias",
    ]


def test_nothing_projectable_by_name_warns_and_describe_says_what_was_split():
    """R1: a named model the name rule does not know would silently be plain AdamW."""
    mlp = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    with pytest.warns(UserWarning, match="no parameter name matched the projectable rule"):
        opt = FRUGAL(mlp.named_parameters(), lr=1e-3)
    assert "0 of 4 tensors split" in opt.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = FRUGAL(
            [
                {"params": [mlp[0].weight, mlp[2].weight], "projectable": True},
                {"params": [mlp[0].bias, mlp[2].bias], "projectable": False},
            ],
            lr=1e-3,
        )
        named = FRUGAL(block().named_parameters(), lr=1e-3)
    assert "2 of 4 tensors split" in ok.describe()
    text = named.describe()
    assert "1 split (columns, density 0.25" in text and "layers.0.mlp.up_proj.weight" in text
    assert "1 plain AdamW: layers.0.mlp.up_proj.bias" in text


def test_a_late_first_gradient_does_not_refresh_the_others():
    """R5: a tensor whose first gradient comes at step 6 gets its first subspace then; the other
    keeps its own cadence (refreshes at steps 1, 5, 9 with T = 4) and its moments."""
    torch.manual_seed(0)
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    opt = FRUGAL([{"params": [a.weight, b.weight], "projectable": True}], lr=1e-3, update_gap=4)
    counts = []
    for s in range(10):
        x = a(torch.randn(8, 32))
        x = b(x) if s >= 5 else x
        x.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        counts.append(int(opt.state[a.weight]["refresh"]))
    assert counts == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert int(opt.state[b.weight]["refresh"]) == 1  # first at step 6, again at step 10


@pytest.mark.parametrize("projection", ["columns", "svd"])
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float32])
def test_a_state_dict_loads_into_weights_of_another_dtype(projection, to):
    """F2: moments are cast like torch AdamW's (to the dtype this optimizer makes them in), the
    subspace indices keep theirs, and the next step runs."""
    frm = torch.float32 if to == torch.bfloat16 else torch.bfloat16
    torch.manual_seed(0)
    model = block(16).to(frm)
    opt = FRUGAL(model.named_parameters(), lr=1e-3, projection=projection)
    model["layers"][0]["mlp"]["up_proj"](torch.randn(4, 16, dtype=frm)).float().pow(2).mean().backward()
    opt.step()
    sd = opt.state_dict()
    model2 = block(16).to(to)
    opt2 = FRUGAL(model2.named_parameters(), lr=1e-3, projection=projection)
    opt2.load_state_dict(sd)
    w, bias = model2["layers"][0]["mlp"]["up_proj"].weight, model2["layers"][0]["mlp"]["up_proj"].bias
    assert opt2.state[bias]["exp_avg"].dtype == to
    moment = torch.float32 if projection == "svd" else to
    assert opt2.state[w]["exp_avg"].dtype == moment
    if projection == "columns":
        assert opt2.state[w]["index"].dtype == opt.state[opt.param_groups[0]["params"][0]]["index"].dtype
    model2["layers"][0]["mlp"]["up_proj"](torch.randn(4, 16, dtype=to)).float().pow(2).mean().backward()
    opt2.step()
    assert all(torch.isfinite(p.float()).all() for p in model2.parameters())


@pytest.mark.parametrize(
    "name,split",
    [
        ("model.layers.0.mlp.gate_proj.weight", True),
        ("model.layers.0.mlp.gate.weight", False),  # Mixtral's router (transformers 5)
        ("model.layers.0.block_sparse_moe.gate.weight", False),  # ... (transformers 4)
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),  # T5
        ("cls.predictions.transform.dense.weight", False),  # BERT's MLM head
        ("bert.encoder.layer.0.attention.output.dense.weight", True),
        ("layers.0.linear1.weight", True),  # nn.TransformerEncoderLayer
        ("layers.0.self_attn.in_proj_weight", True),
        ("backbone.layers.0.mixer.in_proj.weight", True),  # Mamba
        ("backbone.layers.0.mixer.x_proj.weight", True),
        ("model.layers.0.mlp.experts.0.w1.weight", True),  # one expert's 2-D weight
        ("score.weight", False),
    ],
)
def test_the_name_rule_neither_misses_nor_over_matches_common_trees(name, split):
    """R2: routers, position tables and heads stay state-full; encoder-layer and Mamba projections split."""
    from leanlm.optim.groups import is_projectable_name

    assert is_projectable_name(name, torch.empty(4, 4)) is split


def test_other_trees_by_rule_and_fused_experts_warned():
    """R2: a ``rule`` targets a tree the default does not know; 3-D fused expert weights are not
    split silently."""
    from leanlm.optim import frugal_param_groups

    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    groups = frugal_param_groups(mlp, rule=lambda n, p: p.ndim == 2)
    assert [len(g["params"]) for g in groups] == [2, 2]
    experts = nn.Parameter(torch.randn(4, 8, 8))
    with pytest.warns(UserWarning, match=r"mlp\.experts\.gate_up_proj are 3-D \(fused MoE experts\?\)"):
        FRUGAL([("layers.0.mlp.experts.gate_up_proj", experts), *block().named_parameters()], lr=1e-3)


def test_compiling_the_step_neither_recompiles_nor_changes_it():
    """R8: ``torch.compile(opt.step)`` used to hit dynamo's recompile limit (a guard per parameter
    and per step count); the step now runs eagerly under compile, with the same result."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = block(16)
        opt = FRUGAL(model.named_parameters(), lr=1e-2, update_gap=2)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(6):
            model["layers"][0]["mlp"]["up_proj"](torch.randn(4, 16)).pow(2).mean().backward()
            step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    counters.clear()
    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True))
    assert not counters["recompiles"]
    assert counters["stats"]["unique_graphs"] == 0
