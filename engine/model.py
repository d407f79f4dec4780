"""LLaMA decoder: RMSNorm, rotary embeddings (optionally with Llama 3's frequency scaling), SwiGLU,
causal SDPA with grouped-query attention (``model.n_kv_heads``), embeddings tied to the output head
or not (``model.tie_embeddings``), no biases.

Linear layers carry the names ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` so that
optimizers and converters (FRUGAL's param groups, LOST's ``convert``) can find them by name, as
they would in a Hugging Face LLaMA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from leanlm.engine.config import ModelConfig
from leanlm.engine.doc_mask import AttentionMask, DocumentBoundary, attend, build_mask

IGNORE_INDEX = -100  # target id excluded from the loss (PyTorch's convention)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The rotation frequency of each pair: theta^(-2i/hd), (hd/2,) float32; with
    ``model.rope_scaling=llama3`` rescaled as Llama 3.1 defines it: wavelengths longer than
    original_len / low_freq_factor are divided by ``factor``, shorter than original_len /
    high_freq_factor kept, and the band between interpolated linearly in original_len / wavelength."""
    hd = cfg.head_dim()
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    if cfg.rope_scaling == "none":
        return inv_freq
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(between, blended, scaled)


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (seq_len, head_dim / 2) in float32."""
    inv_freq = rope_inv_freq(cfg, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles (the LLaMA interleaved layout).

    x: (B, H, T, hd); cos, sin: (T, hd/2).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, T, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads, self.n_kv_heads = cfg.d_model, cfg.n_heads, cfg.kv_heads()
        self.head_dim = cfg.head_dim()
        kv = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask | None = None
    ) -> torch.Tensor:
        # x: (B, T, d) -> q: (B, H, T, hd); k, v: (B, H_kv, T, hd)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (
            proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for proj in (self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # each key/value head serves consecutive query heads
            group = self.n_heads // self.n_kv_heads  # (torch 2.4's SDPA has no enable_gqa)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = attend(q, k, v, mask)  # (B, H, T, hd): causal, within documents when masked
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    """Decoder-only LM. ``forward(tokens)`` returns logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:  # one (vocab, d) tensor: one parameter, one gradient, one optimizer state
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables are derived, not learned: non-persistent so checkpoints hold weights only.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # model.doc_masking: where documents start in a packed row (the tokenizer's BOS / EOS);
        # set by whoever knows the tokenizer (``set_document_boundary``), not saved
        self.document_boundary: DocumentBoundary | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every weight matrix and embedding; ones for norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self._build_rope(self.embed_tokens.weight.device)

    def set_document_boundary(self, bos_id: int, eos_id: int) -> None:
        """The tokenizer's special ids, for ``model.doc_masking`` (no effect without it)."""
        self.document_boundary = DocumentBoundary.of(bos_id, eos_id) if self.cfg.doc_masking else None

    def tie_weights(self) -> None:
        """Make ``lm_head`` use the embedding's tensor again (after per-module materialisation)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _build_rope(self, device: torch.device) -> None:
        if device.type == "meta":
            return
        cos, sin = rope_tables(self.cfg, self.max_seq_len, device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, chunk_tokens: int = 4096
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); with ``targets`` (B, T) -> per-row mean token
        cross-entropy (B,) in float32 (targets of -100 are ignored), computed by ``row_losses``
        without materialising the float32 logits of the whole batch."""
        T = tokens.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len {self.max_seq_len}")
        if self.rope_cos.numel() == 0 or self.rope_cos.device != tokens.device:
            self._build_rope(tokens.device)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = None
        if self.cfg.doc_masking:  # once per forward, shared by every block (and their recomputes)
            if self.document_boundary is None:
                raise RuntimeError("model.doc_masking: call set_document_boundary(bos_id, eos_id) first")
            mask = build_mask(tokens, self.document_boundary)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        x = self.norm(x)  # (B, T, d)
        if targets is None:
            return self.lm_head(x)
        return row_losses(x, self.lm_head.weight, targets, chunk_tokens)


def _row_loss_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden: (B, t, d), weight: (V, d), targets: (B, t) -> summed token losses per row (B,)
    logits = F.linear(hidden, weight).float()  # (B, t, V)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(targets.shape).sum(dim=1)


def row_losses(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Per-row mean token cross-entropy of the output head, in float32: (B,).

    The head and the loss run over chunks of about ``chunk_tokens`` tokens along the sequence;
    with more than one chunk each is checkpointed, so backward recomputes a chunk's logits instead
    of keeping the (B, T, V) float32 logits and log-softmax alive (``chunk_tokens=0``: one chunk).
    Rows with no valid target get loss 0.
    """
    B, T = targets.shape
    step = T if chunk_tokens <= 0 else max(1, chunk_tokens // B)
    if step >= T:
        sums = _row_loss_sums(hidden, weight, targets)
    else:
        sums = sum(
            checkpoint(
                _row_loss_sums,
                hidden[:, i : i + step],
                weight,
                targets[:, i : i + step],
                use_reentrant=False,
            )
            for i in range(0, T, step)
        )
    return sums / (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1)


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Total parameters (a tied embedding and head count once); ``non_embedding`` excludes the
    input embedding and the output head."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if non_embedding and isinstance(model, LLaMA):
        total -= sum(p.numel() for p in {id(t): t for t in (model.embed_tokens.weight, model.lm_head.weight)}.values())
    return total


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + attention scores (Chinchilla appendix F).

    Attention QK^T and AV cost 2 x 2 x T x d per layer forward (causal halving not counted, as in
    PaLM/nanoGPT MFU accounting); training is 3x forward.
    """
    d, L, f = cfg.d_model, cfg.n_layers, cfg.ffn_dim
    kv = cfg.kv_heads() * cfg.head_dim()  # the k and v projections' width (d without GQA)
    matmul_params = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * vocab_size  # lm_head; embedding is a lookup
    return 6.0 * matmul_params + 3.0 * 4.0 * L * seq_len * d
