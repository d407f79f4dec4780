"""LOST in other people's module trees (issue 16: F3 Conv1D, F4 modules that read ``.weight``,
F5 save_pretrained / from_pretrained and the dense fold, R9 sizes and double conversion).
Hugging Face models are small random-weight ones built from configs (no hub downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from leanlm.optim import LOSTLinear, convert
from leanlm.optim.lost import from_pretrained, unconvert


def test_identity_lost_layer_has_the_exact_dense_weight_and_folds_back():
    torch.manual_seed(0)
    dense = nn.Linear(24, 16)
    for support in ("channels", "unstructured"):
        layer = LOSTLinear.from_dense(dense, rank=4, channel_density=0.25, gamma=0.7, phi="identity", support=support)
        x = torch.randn(5, 24)
        assert torch.allclose(x @ layer.weight.T + layer.bias, layer(x), atol=1e-6)
        folded = layer.to_dense()
        assert isinstance(folded, nn.Linear) and torch.allclose(folded(x), layer(x), atol=1e-6)
        assert layer.dtype == torch.float32
    full = LOSTLinear.from_dense(dense, rank=16, channel_density=0.25, gamma=1.0, phi="identity")
    assert torch.allclose(full.weight, dense.weight, atol=1e-5)  # full rank, γ 1: the dense layer itself


def test_a_nonlinear_lost_layer_says_why_it_has_no_weight():
    layer = LOSTLinear(24, 16, rank=4)
    with pytest.raises(AttributeError, match=r"LOSTLinear\(phi='silu'\) has no dense weight"):
        layer.weight  # noqa: B018
    with pytest.raises(ValueError, match="has no dense weight"):
        layer.to_dense()
    assert getattr(layer, "weight", None) is None  # probes with a default still work


def test_modules_that_read_weight_work_with_identity_and_are_refused_otherwise():
    """F4: nn.MultiheadAttention passes out_proj.weight to a functional call; the encoder layer's
    eval fast path reads linear1.weight."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.out_proj: MultiheadAttention reads its \.weight"):
        convert(enc, rank=8, targets=("out_proj", "linear1", "linear2"))
    assert not any(isinstance(m, LOSTLinear) for m in enc.modules())  # refused before any change
    convert(enc, rank=8, targets=("out_proj", "linear1", "linear2"), phi="identity", gamma=1.0)
    x = torch.randn(2, 6, 32)
    enc.train()
    enc(x).sum().backward()  # gradients reach the LOST parameters through .weight
    assert enc.layers[0].self_attn.out_proj.lowrank_in.grad is not None
    enc.eval()
    with torch.no_grad():
        assert torch.isfinite(enc(x)).all()


def test_conversion_warns_when_a_rank_makes_a_layer_larger_and_refuses_twice():
    """R9: rank 24 on a 32 x 32 layer has more parameters than dense; converting twice says so."""
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(32, 32))
    with pytest.warns(UserWarning, match="larger than dense"):
        convert(net, rank=24, targets=("q_proj",))
    with pytest.raises(ValueError, match="already LOST-converted"):
        convert(net, rank=8, targets=("q_proj",))
    with pytest.raises(ValueError, match="its linear layers are named fc: pass targets="):
        convert(_fc(), rank=2)


def _fc() -> nn.Module:
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(4, 4))
    return net


def test_unconvert_refuses_before_changing_anything():
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(16, 16))
    net.add_module("k_proj", nn.Linear(16, 16))
    convert(net, rank=4, targets=("q_proj",), phi="identity")
    convert(net, rank=4, targets=("k_proj",))
    with pytest.raises(ValueError, match="k_proj: LOSTLinear"):
        unconvert(net)
    assert isinstance(net.q_proj, LOSTLinear)


transformers = pytest.importorskip("transformers")


def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_gpt2_conv1d_projections_are_converted():
    """F3: GPT-2's Conv1D stores W as (in, out); converted with the transpose, exact at full rank."""
    torch.manual_seed(0)
    model = gpt2().eval()
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(tokens).logits
    exact = gpt2().eval()
    exact.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="larger than dense"):  # full rank: exact, and bigger
        report = convert(exact, rank=128, targets=("c_attn", "c_proj", "c_fc"), gamma=1.0, phi="identity")
    assert set(report.per_target) == {"c_attn", "c_proj", "c_fc"}
    with torch.no_grad():
        assert torch.allclose(exact(tokens).logits, before, atol=1e-4)
    convert(model, rank=8, targets=("c_attn", "c_proj", "c_fc"))
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert model.transformer.h[0].attn.c_attn.lowrank_in.grad is not None


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    """F5: the LOST options travel in config.json; one call restores the model exactly; a model
    converted with phi='identity' folds back to the dense architecture."""
    torch.manual_seed(0)
    model = llama()
    convert(model, rank=8, channel_density=0.25, gamma=0.5)
    model.save_pretrained(tmp_path / "lost")
    back = from_pretrained(transformers.LlamaForCausalLM, tmp_path / "lost")
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model.eval()(tokens).logits)
    assert back.config.leanlm_lost["rank"] == 8
    assert isinstance(back.model.layers[0].self_attn.q_proj, LOSTLinear)
    ident = llama().eval()
    convert(ident, rank=8, phi="identity")
    with torch.no_grad():
        want = ident(tokens).logits
    assert unconvert(ident) == 14 and not hasattr(ident.config, "leanlm_lost")
    ident.save_pretrained(tmp_path / "dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = from_pretrained(transformers.LlamaForCausalLM, tmp_path / "dense").eval()
    assert isinstance(dense.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        assert torch.allclose(dense(tokens).logits, want, atol=1e-5)
