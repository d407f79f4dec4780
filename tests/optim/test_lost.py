from pathlib import Path

import pytest
import torch
from torch import nn

from leanlm.kernels.dispatch import PHIS
from leanlm.kernels.lost_linear import lost_linear_reference
from leanlm.optim import FRUGAL, frugal_param_groups
from leanlm.optim.lost import LOSTLinear, convert, num_channels

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def dense(m=12, n=20, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


@pytest.mark.parametrize(("name", "expected"), [("60m", 44.0), ("130m", 98.2), ("350m", 200.3), ("1b", 669.5)])
def test_preset_parameter_counts_at_default_ranks(name, expected):
    from leanlm.engine.build import build_model
    from leanlm.engine.config import load_config
    from leanlm.engine.model import count_parameters

    cfg = load_config(CONFIGS / f"llama_{name}.yaml", ["model.lost.enabled=true"])
    model = build_model(cfg, 32000, "meta")
    assert round(count_parameters(model) / 1e6, 1) == expected


def test_full_rank_identity_gamma_one_reproduces_the_dense_layer():
    lin = dense()
    lost = LOSTLinear.from_dense(lin, rank=12, gamma=1.0, phi="identity")
    x = torch.randn(5, 20)
    torch.testing.assert_close(lost(x), lin(x), atol=1e-6, rtol=1e-5)


def test_rank_r_is_the_best_rank_r_approximation():
    lin = dense()
    lost = LOSTLinear.from_dense(lin, rank=4, gamma=1.0, phi="identity")
    U, S, Vh = torch.linalg.svd(lin.weight.detach())
    best = (U[:, :4] * S[:4]) @ Vh[:4]  # (m, n)
    torch.testing.assert_close(lost.lowrank_in @ lost.lowrank_out, best.T, atol=1e-6, rtol=1e-5)
    # the √Σ split is even: both factors carry the same singular values
    torch.testing.assert_close(lost.lowrank_in.norm(dim=0), lost.lowrank_out.norm(dim=1))


def test_selected_channels_are_the_top_residual_columns():
    lin = dense(m=16, n=40)
    lost = LOSTLinear.from_dense(lin, rank=3, channel_density=0.1)
    W = lin.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    comp = (U[:, 3:] * S[3:]) @ Vh[3:]
    expected = torch.topk(comp.norm(dim=0), 4).indices.sort().values
    assert lost.index.dtype == torch.int64 and torch.equal(lost.index, expected)
    assert torch.equal(lost.index, lost.index.unique())
    torch.testing.assert_close(lost.sparse, W[:, expected])
    wcomp = LOSTLinear.from_dense(lin, rank=3, channel_density=0.1, values_init="wcomp_cols")
    torch.testing.assert_close(wcomp.sparse, comp[:, expected])
    l1 = LOSTLinear.from_dense(lin, rank=3, channel_density=0.1, select="svd_rem_l1")
    assert torch.equal(l1.index, torch.topk(comp.abs().sum(dim=0), 4).indices.sort().values)


def test_k_is_at_least_one_and_floor_of_density():
    assert num_channels(512, 0.05) == 25 and num_channels(1376, 0.05) == 68 and num_channels(10, 0.01) == 1


@pytest.mark.parametrize("phi", PHIS)
def test_reference_gradients_pass_gradcheck(phi):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, A, B, Ws = t(3, 2, 7), t(7, 3), t(3, 5), t(5, 2)
    index = torch.tensor([1, 4])
    assert torch.autograd.gradcheck(lambda *a: lost_linear_reference(*a, index, 0.3, phi), (x, A, B, Ws))


def test_convert_our_model_and_report():
    from leanlm.engine.config import ModelConfig
    from leanlm.engine.model import LLaMA

    model = LLaMA(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64), vocab_size=50, max_seq_len=16)
    before = sum(p.numel() for p in model.parameters())
    report = convert(model, rank=8, channel_density=0.1)
    assert set(report.per_target) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert report.per_target["q_proj"] == (2, 2 * 32 * 32, 2 * (8 * 64 + 32 * 3))
    assert report.total_before == before and report.total_after == sum(p.numel() for p in model.parameters())
    assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    out = model(torch.randint(0, 50, (2, 6)))
    assert out.shape == (2, 6, 50) and torch.isfinite(out).all()
    proj, _ = frugal_param_groups(model)
    assert len(proj["params"]) == 2 * 7 * 3  # A, B and W_s of every converted layer are projectable
    opt = FRUGAL(model.named_parameters(), density=0.25)
    model(torch.randint(0, 50, (2, 6))).sum().backward()
    opt.step()


def test_convert_plain_sequential_and_hf_llama():
    seq = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    convert(seq, rank=4, targets=("0", "2"))
    assert isinstance(seq[0], LOSTLinear) and isinstance(seq[2], LOSTLinear)
    assert seq[0].bias is not None and seq(torch.randn(3, 16)).shape == (3, 8)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    report = convert(hf, rank=8)
    assert sum(c for c, _, _ in report.per_target.values()) == 7
    out = hf(input_ids=torch.randint(0, 64, (1, 5)), labels=torch.randint(0, 64, (1, 5)))
    out.loss.backward()
    assert hf.model.layers[0].mlp.down_proj.sparse.grad is not None


def test_state_dict_round_trip():
    a = LOSTLinear.from_dense(dense(), rank=4)
    b = LOSTLinear(20, 12, rank=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(a(x), b(x)) and torch.equal(a.index, b.index) and float(b.gamma) == 0.5


def test_gamma_is_an_explicit_buffer_not_a_parameter():
    lost = LOSTLinear.from_dense(dense(), rank=4, gamma=0.7)
    assert "gamma" in dict(lost.named_buffers()) and "gamma" not in dict(lost.named_parameters())


def test_unstructured_support_has_the_same_parameter_count():
    lin = dense(m=16, n=40)
    chan = LOSTLinear.from_dense(lin, rank=3, channel_density=0.1)
    uns = LOSTLinear.from_dense(lin, rank=3, channel_density=0.1, support="unstructured")
    assert sum(p.numel() for p in chan.parameters()) == sum(p.numel() for p in uns.parameters())
    x = torch.randn(4, 40)
    uns(x).sum().backward()
    assert uns.sparse.grad.shape == (16 * 4,)
    flat = lin.weight.detach().reshape(-1)
    torch.testing.assert_close(uns.sparse.detach(), flat[uns.index])


def test_random_init_ablation_differs_from_svd_init():
    lin = dense()
    svd = LOSTLinear.from_dense(lin, rank=4)
    rnd = LOSTLinear.from_dense(lin, rank=4, init="random")
    assert not torch.allclose(svd.lowrank_in, rnd.lowrank_in)
    assert torch.equal(svd.index, rnd.index)  # channel selection does not depend on the A, B init


def test_lowrank_svd_solver_matches_the_full_svd_on_the_top_r():
    """``svd_solver="lowrank"``: randomised top-r triplets; A B equals the full SVD's best rank-r
    approximation when the spectrum has a gap, and W_comp is exactly what A B leaves of W0."""
    import torch

    from leanlm.optim.lost import LOSTLinear, _svd_split

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(96, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
    W = low + 1e-3 * torch.randn(96, 64, generator=gen)
    linear = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    full = LOSTLinear.from_dense(linear, 8, 0.25, svd_solver="full")
    fast = LOSTLinear.from_dense(linear, 8, 0.25, svd_solver="lowrank")
    ab = [(x.lowrank_in @ x.lowrank_out).detach() for x in (full, fast)]
    assert torch.allclose(ab[0], ab[1], atol=1e-4)
    U, S, Vh, W_comp = _svd_split(W, 8, 0, "lowrank", seed=0)
    assert torch.allclose((U[:, :8] * S[:8]) @ Vh[:8] + W_comp, W, atol=1e-5)
    with pytest.raises(ValueError, match="svd_solver"):
        LOSTLinear.from_dense(linear, 8, 0.25, svd_solver="qr")
