from pathlib import Path

import pytest
import torch

from leanlm.engine.config import ModelConfig, load_config
from leanlm.engine.model import LLaMA, apply_rope, count_parameters, rope_tables

# Totals from the GaLore/FRUGAL configs with a 32000-token vocabulary.
EXPECTED = {
    "llama_60m": 58_073_600,
    "llama_130m": 134_105_856,
    "llama_350m": 367_969_280,
    "llama_1b": 1_339_082_752,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts_match_the_papers(name):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = LLaMA(cfg.model, 32000, cfg.train.seq_len)
    assert count_parameters(model) == EXPECTED[name]
    assert (
        round(count_parameters(model) / 1e6, 2)
        == {"llama_60m": 58.07, "llama_130m": 134.11, "llama_350m": 367.97, "llama_1b": 1339.08}[name]
    )


def small_model(**kw):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, **kw)
    torch.manual_seed(0)
    return LLaMA(cfg, vocab_size=50, max_seq_len=16)


def test_linear_layers_carry_llama_names_and_no_biases():
    model = small_model()
    names = {n.split(".")[-2] for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers.")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied


def test_init_is_normal_002():
    cfg = ModelConfig(d_model=256, n_layers=1, n_heads=4, ffn_dim=512)
    torch.manual_seed(0)
    model = LLaMA(cfg, vocab_size=1000, max_seq_len=8)
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_attention_is_causal():
    model = small_model().eval()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rope_preserves_norm_and_position_zero():
    cos, sin = rope_tables(ModelConfig(d_model=16, n_heads=2), 5)  # head dim 8
    x = torch.randn(1, 2, 5, 8)
    r = apply_rope(x, cos, sin)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(r[:, :, 0], x[:, :, 0])


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 50, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = small_model(activation_checkpointing=ckpt)
        model(x).float().pow(2).mean().backward()
        grads.append(model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        small_model()(torch.zeros(1, 17, dtype=torch.long))


def test_row_losses_are_per_sequence_means_and_ignore_padding():
    from leanlm.engine.model import row_losses

    hidden, weight = torch.randn(2, 4, 5), torch.randn(7, 5)
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    logits = hidden @ weight.T
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(8, 7), targets.reshape(8), reduction="none", ignore_index=-100
    )
    expected = torch.stack([tok[:4].mean(), tok[4:6].mean()])
    torch.testing.assert_close(row_losses(hidden, weight, targets), expected)
    torch.testing.assert_close(row_losses(hidden, weight, targets, chunk_tokens=2), expected)  # chunks of 1 position


def test_chunked_loss_gives_the_same_gradients():
    from leanlm.engine.model import row_losses

    hidden = torch.randn(3, 10, 6, requires_grad=True)
    weight = torch.randn(11, 6, requires_grad=True)
    targets = torch.randint(0, 11, (3, 10))
    grads = []
    for chunk in (0, 6):  # one chunk vs five checkpointed chunks of 2 positions
        hidden.grad = weight.grad = None
        row_losses(hidden, weight, targets, chunk).pow(2).sum().backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def _gqa_cfg(n_kv_heads: int) -> ModelConfig:
    return load_config(
        None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=8", f"model.n_kv_heads={n_kv_heads}"]
    ).model


@pytest.mark.parametrize("n_kv_heads", [0, 1, 2, 8])
def test_grouped_query_attention_has_the_parameters_of_transformers_llama(n_kv_heads):
    """k_proj and v_proj are n_kv_heads x head_dim wide; the count equals transformers'
    LlamaForCausalLM (untied) of the same shape."""
    transformers = pytest.importorskip("transformers")
    cfg = _gqa_cfg(n_kv_heads)
    with torch.device("meta"):
        ours = LLaMA(cfg, 512, 32)
    theirs = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=cfg.kv_heads(),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(theirs)
    assert count_parameters(ours) == hf.num_parameters()
    assert ours.layers[0].self_attn.k_proj.weight.shape == (cfg.kv_heads() * 8, 64)


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_heads():
    """A GQA model computes exactly what the MHA model computes whose k/v heads repeat each of its
    key/value heads for the query heads that share it."""
    torch.manual_seed(0)
    gqa = LLaMA(_gqa_cfg(2), 512, 32)
    mha = LLaMA(_gqa_cfg(0), 512, 32)
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (2 heads x 8, 64) -> (8 heads x 8, 64)
            state[name] = w.view(2, 8, 64).repeat_interleave(4, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=0, atol=0)


def test_grouped_query_attention_counts_its_flops_and_is_validated():
    from leanlm.engine.errors import ConfigError
    from leanlm.engine.model import flops_per_token

    cfg = _gqa_cfg(2)
    with torch.device("meta"):
        model = LLaMA(cfg, 512, 32)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg, 512, 32) == 6.0 * linear + 12.0 * cfg.n_layers * 32 * cfg.d_model
    with pytest.raises(ConfigError, match=r"model.n_heads=8 is not a multiple of model.n_kv_heads=3"):
        _gqa_cfg(3)
