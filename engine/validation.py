"""Value and cross-field checks of a built ``RunConfig``: every problem found, each a phrase that
names the key and says what to fix (``build_config`` joins them into one ``ConfigError``)."""

from __future__ import annotations

from leanlm.engine.config import _SECTION_TYPES, RunConfig, _leaves, _suggest

# Far above any tokenizer in use (LLaMA-3: 128k, Gemma: 256k): a larger value is a typo, and the
# embedding alone would then take tens of GB before any check of the machine could run.
MAX_VOCAB = 2**21


def validate(cfg: RunConfig) -> list[str]:
    """Value and cross-field checks. Returns the list of problems (empty when valid)."""
    p: list[str] = []
    for sname in _SECTION_TYPES:
        for key, f, value in _leaves(getattr(cfg, sname), sname):
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                p.append(
                    f"{key}={value!r}: must be one of {', '.join(map(str, choices))}"
                    f"{_suggest(str(value), [str(c) for c in choices])}"
                )

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            p.append(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")

    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim"):
        positive(f"model.{key}", getattr(m, key))
    positive("model.lost.rank", m.lost.rank, allow_zero=True)
    if not 0 < m.lost.channel_density <= 1:
        p.append(f"model.lost.channel_density={m.lost.channel_density}: must be in (0, 1]")
    if not 0 <= m.lost.gamma <= 1:
        p.append(f"model.lost.gamma={m.lost.gamma}: must be in [0, 1]")
    positive("model.vocab_size", m.vocab_size, allow_zero=True)
    for key, value in (("model.vocab_size", m.vocab_size), ("data.vocab_size", d.vocab_size)):
        if value > MAX_VOCAB:
            p.append(f"{key}={value}: must be <= {MAX_VOCAB:,} (2^21; the largest tokenizers have 256k)")
    positive("train.threads", t.threads, allow_zero=True)
    if m.n_heads > 0 and m.d_model % m.n_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    elif m.n_heads > 0 and m.head_dim() % 2:
        p.append(f"head dim {m.head_dim()} (model.d_model / model.n_heads) must be even for rotary embeddings")
    for key in ("steps", "batch_size", "seq_len"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.micro_batch_size", t.micro_batch_size, allow_zero=True)
    positive("train.grad_clip", t.grad_clip, allow_zero=True)
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        p.append(f"train.device={t.device!r}: must be auto, cpu, cuda or cuda:N")
    if not t.out_dir:
        p.append("train.out_dir is empty: name a run folder such as runs/my_run")
    positive("optim.lr", o.lr)
    positive("optim.eps", o.eps)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={o.betas!r}: must be two numbers in [0, 1)")
    if not 0 <= o.density <= 1:
        p.append(f"optim.density={o.density}: must be in [0, 1]")
    positive("optim.update_gap", o.update_gap)
    positive("optim.state_free_lr_scale", o.state_free_lr_scale, allow_zero=True)
    positive("optim.proj_lr_scale", o.proj_lr_scale, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    if not 0 <= d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    if not d.tokenizer and d.vocab_size < 300:
        p.append(f"data.vocab_size={d.vocab_size}: must be >= 300 (byte fallback needs 256 byte pieces)")
    if m.vocab_size and not d.tokenizer and m.vocab_size < d.vocab_size:
        p.append(f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size={d.vocab_size}")
    positive("data.hf_timeout_s", d.hf_timeout_s)
    if d.tokenizer_sample_mb <= 0:
        p.append(f"data.tokenizer_sample_mb={d.tokenizer_sample_mb}: must be > 0")
    positive("train.loss_chunk_tokens", t.loss_chunk_tokens, allow_zero=True)
    positive("train.reweight.r", t.reweight.r)
    positive("train.reweight.warmup_steps", t.reweight.warmup_steps, allow_zero=True)
    positive("eval.every", cfg.eval.every, allow_zero=True)
    positive("eval.tokens", cfg.eval.tokens)
    positive("eval.early", cfg.eval.early, allow_zero=True)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    positive("checkpoint.keep", cfg.checkpoint.keep, allow_zero=True)
    positive("log.every", cfg.log.every)
    positive("distributed.timeout_s", cfg.distributed.timeout_s)
    p += _distributed_problems(cfg)
    return p


def _distributed_problems(cfg: RunConfig) -> list[str]:
    """Backend x optimizer combinations that cannot work, said before any process starts."""
    dc, o = cfg.distributed, cfg.optim
    if dc.backend != "deepspeed":
        return [f"distributed.zero_stage={dc.zero_stage} needs distributed.backend=deepspeed"] if dc.zero_stage else []
    projection = {"galore": "svd", "badam": "blocks"}.get(o.name, o.projection)
    if o.name == "adamw" or dc.zero_stage == 0:
        return []
    if projection not in ("columns", "randk"):
        return [
            f"optim.name={o.name} with projection {projection} has no flat form under ZeRO-"
            f"{dc.zero_stage}; use optim.projection=columns or randk, distributed.zero_stage=0, "
            "or distributed.backend=fsdp2"
        ]
    return []
