"""The config schema: one small dataclass per component, each field with its default, help,
choices and bounds (what ``leanlm keys`` prints and ``validate`` checks).

A run's config comes from a YAML preset (``configs/*.yaml``, which may ``extends:`` another
preset) plus dotted command-line overrides (``optim.lr=3e-4 train.steps=2000``). ``load_config``
merges them, coerces every value to its field's type and validates the whole thing, raising one
``ConfigError`` that lists every problem (unknown keys get a "did you mean" suggestion).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import reprlib
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

# The registry itself (a live dict, torch-free): an optimizer registered there is a valid choice.
from leanlm.optim.registry import REGISTRY as OPTIMIZERS


def _f(
    default: Any,
    help: str,
    choices: Collection[Any] | None = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a one-line help text (shown by ``leanlm keys``), its choices and its
    bounds (``ge``/``gt``/``le``/``lt``: checked by ``validate``, next to the field they bound)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=meta)
    return field(default=default, metadata=meta)


# Far above any tokenizer in use (LLaMA-3: 128k, Gemma: 256k): a larger value is a typo, and the
# embedding alone would then take tens of GB before any check of the machine could run.
MAX_VOCAB = 2**21

LOST_DEFAULT_RANKS = {
    512: 128,
    768: 256,
    1024: 256,
    2048: 512,
    4096: 1024,
}  # by d_model (60m ... 7b)


@dataclass(kw_only=True)
class LOSTConfig:
    """LOST low-rank + channel-sparse layers for the 7 projections of every block."""

    enabled: bool = _f(False, "replace q/k/v/o/gate/up/down by LOST layers (SVD-initialised)")
    rank: int = _f(
        0, "low-rank r; 0 = per-size default (d 512: 128, 768: 256, 1024: 256, 2048: 512, 4096: 1024; else d/4)", ge=0
    )
    channel_density: float = _f(0.05, "ρ: kept input channels k = max(1, ⌊ρ·n_in⌋)", gt=0, le=1)
    gamma: float = _f(0.5, "γ: y = γ·φ(xA)B + (1-γ)·x[:, I]W_sᵀ (γ=1: pure low-rank)", ge=0, le=1)
    phi: str = _f("silu", "nonlinearity between A and B", choices=("identity", "silu", "relu2"))
    select: str = _f(
        "svd_rem_l2",
        "channel selector",
        choices=("svd_rem_l2", "svd_rem_l1", "random", "w0_colnorm"),
    )
    values_init: str = _f("w0_cols", "W_s from W0's or W_comp's selected columns", choices=("w0_cols", "wcomp_cols"))
    init: str = _f(
        "svd",
        "A, B from the SVD of the dense init, or random (ablation)",
        choices=("svd", "random"),
    )
    support: str = _f(
        "channels",
        "channels (LOST) or unstructured (SLTrain's random support, same count)",
        choices=("channels", "unstructured"),
    )
    svd_components: int = _f(0, "cap on W_comp's components after the top r; 0 = all")
    svd_solver: str = _f(
        "full",
        "full SVD, or lowrank: randomised top-r (3-4x faster at 7B; W_comp = W0 - its rank-r part)",
        choices=("full", "lowrank"),
    )

    def rank_for(self, d_model: int) -> int:
        return self.rank or LOST_DEFAULT_RANKS.get(d_model, max(1, d_model // 4))


@dataclass(kw_only=True)
class ModelConfig:
    """LLaMA decoder shape. Named sizes live in ``configs/llama_*.yaml``."""

    d_model: int = _f(256, "hidden size", gt=0)
    n_layers: int = _f(4, "number of transformer blocks", gt=0)
    n_heads: int = _f(4, "attention heads (head dim = d_model / n_heads)", gt=0)
    n_kv_heads: int = _f(0, "key/value heads (grouped-query attention; n_heads a multiple of it); 0 = n_heads", ge=0)
    ffn_dim: int = _f(688, "SwiGLU hidden size", gt=0)
    vocab_size: int = _f(0, "vocabulary size; 0 = the tokenizer's (must be >= it when set)", ge=0, le=MAX_VOCAB)
    rope_theta: float = _f(10000.0, "rotary embedding base", gt=0)
    rope_scaling: str = _f(
        "none", "RoPE frequency scaling: none, or llama3 (Llama 3.1/3.2)", choices=("none", "llama3")
    )
    rope_scaling_factor: float = _f(8.0, "llama3 scaling: factor for long wavelengths", gt=0)
    rope_low_freq_factor: float = _f(1.0, "llama3 scaling: low_freq_factor", gt=0)
    rope_high_freq_factor: float = _f(4.0, "llama3 scaling: high_freq_factor (> low_freq_factor)", gt=0)
    rope_original_max_len: int = _f(8192, "llama3 scaling: original_max_position_embeddings", gt=0)
    tie_embeddings: bool = _f(False, "share one tensor between the input embedding and the output head")
    doc_masking: bool = _f(
        False, "attention stays inside each packed document (documents start at BOS, or after EOS without one)"
    )
    norm_eps: float = _f(1e-6, "RMSNorm epsilon")
    init_std: float = _f(0.02, "std of the normal init of every weight matrix")
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save memory")
    lost: LOSTConfig = field(default_factory=LOSTConfig)

    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or one per query head (multi-head attention)."""
        return self.n_kv_heads or self.n_heads


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from and how it becomes packed token sequences."""

    source: str = _f(
        "stdlib",
        "stdlib | a file or folder (.txt/.jsonl/.parquet) | hf:NAME[:CONFIG] (HF datasets, streamed)",
    )
    text_field: str = _f("text", "field holding the text in .jsonl/.parquet/HF records")
    hf_split: str = _f("train", "HF split used for training")
    hf_val_split: str = _f("validation", "HF split used for held-out eval; empty = hold out by document hash")
    hf_data_files: list[str] = _f([], "data_files for HF builders such as hf:json or hf:parquet")
    val_fraction: float = _f(0.02, "fraction of documents (by stable hash) held out for eval", ge=0, lt=1)
    tokenizer: str = _f("", "sentencepiece .model to load; empty = train one on the train split")
    mix: list[dict] = _f(
        [],
        "a weighted mixture instead of data.source: [{name, source, weight}, ...] (tokens:/file sources; "
        "weight = share of training rows)",
    )
    mix_stages: list[dict] = _f(
        [], "later mixtures: [{start: STEP, weights: {name: weight, ...}}, ...] from optimizer step START on"
    )
    vocab_size: int = _f(4096, "vocabulary size when training a tokenizer", le=MAX_VOCAB)
    tokenizer_sample_mb: float = _f(8.0, "MB of training text used to train the tokenizer", gt=0)
    cache_dir: str = _f("", "token/tokenizer cache; empty = $LEANLM_CACHE or ~/.cache/leanlm")
    shuffle: bool = _f(True, "shuffle sequence order each epoch (file sources)")
    hf_shuffle_buffer: int = _f(10000, "shuffle buffer for streamed HF datasets; 0 = off")
    hf_timeout_s: float = _f(
        20.0, "connect/read timeout of each Hub request (hf: sources fail fast on a dead network)", gt=0
    )


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule. FRUGAL keys apply to frugal and its presets (galore,
    badam, fira, apollo) as each takes them."""

    name: str = _f("adamw", "optimizer (leanlm.optim.registry)", choices=OPTIMIZERS)
    lr: float = _f(1e-3, "peak learning rate", gt=0)
    betas: list[float] = _f([0.9, 0.95], "Adam betas [beta1, beta2]")
    eps: float = _f(1e-8, "Adam epsilon", gt=0)
    weight_decay: float = _f(
        0.1,
        "decoupled weight decay (adamw: matrices only; frugal/galore/badam: every parameter, before the update)",
        ge=0,
    )
    schedule: str = _f(
        "cosine",
        "lr schedule after warmup (wsd: warmup-stable-decay, constant then optim.decay_fraction of decay)",
        choices=("cosine", "linear", "constant", "wsd"),
    )
    warmup_steps: int = _f(100, "linear warmup steps", ge=0)
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of the peak (cosine/linear)", ge=0, le=1)
    decay_fraction: float = _f(0.2, "wsd: the last fraction of train.steps that decays the lr", ge=0, le=1)
    decay_shape: str = _f("1-sqrt", "wsd: decay shape (Hägele et al. 2024)", choices=("1-sqrt", "linear"))
    decay_to: float = _f(0.0, "wsd: lr at the end of the decay as a fraction of the peak", ge=0, le=1)
    decay_steps: int = _f(0, "wsd: decay steps (a cooldown sets it); 0 = optim.decay_fraction x train.steps", ge=0)
    density: float = _f(0.25, "FRUGAL ρ: state-full fraction of columns/rows/entries/rank/tensors", ge=0, le=1)
    projection: str = _f(
        "columns",
        "FRUGAL subspace",
        choices=("columns", "rows", "randk", "blocks", "svd", "random", "gaussian"),
    )
    update_gap: int = _f(200, "FRUGAL T: steps between subspace refreshes", gt=0)
    state_free: str = _f(
        "sign",
        "FRUGAL update outside the subspace: sign, sgd, none, fira (residual scaled per channel by the Adam/gradient "
        "norm ratio in the subspace) or apollo (the whole gradient so scaled)",
        choices=("sign", "sgd", "none", "fira", "apollo"),
    )
    scaling: str = _f("channel", "fira/apollo: one norm ratio per channel or per tensor", choices=("channel", "tensor"))
    rank: int = _f(0, "svd/random/gaussian subspace rank; 0 = density x min(m, n)", ge=0)
    fira_alpha: float = _f(1.0, "fira: scale of the low-rank update (the fira package's alpha)", gt=0)
    apollo_scale: float = _f(1.0, "apollo: the update is multiplied by sqrt(apollo_scale) (128 for APOLLO-Mini)", gt=0)
    state_free_lr_scale: float = _f(1.0, "FRUGAL: lr multiplier of the state-free part", ge=0)
    proj_lr_scale: float = _f(
        1.0,
        "FRUGAL: lr multiplier of projectable weights, both parts (the paper's proj_params_lr_scale; 0.3 at 7B)",
        ge=0,
    )
    reset_on_refresh: bool = _f(True, "FRUGAL: zero the moments and restart bias correction at each refresh")
    block_order: str = _f("descending", "order of blocks mode", choices=("descending", "ascending", "random"))
    galore_scale: float = _f(
        0.25, "galore, galore_fira: scale α of the low-rank update (galore_fira: and of the residual)"
    )
    state_dtype: str = _f(
        "param",
        "Adam moments between steps: param (the weights' dtype; bf16 with int8 weights), fp32, bf16 or int8 "
        "(blockwise 8-bit, bitsandbytes' format; computed in float32 either way)",
        choices=("param", "fp32", "bf16", "int8"),
    )
    step_in_backward: bool = _f(
        False,
        "update each parameter as soon as its gradient is complete, then free the gradient (one process or fsdp2; "
        "train.grad_clip then caps each tensor's gradient norm)",
    )


@dataclass(kw_only=True)
class ReweightConfig:
    """Loss-based sample reweighting (Sow et al., ICLR 2025): weights = softmax(f(x) / r) over
    the global micro-batch, x = per-row losses min-max normalised to [-1, 1]."""

    strategy: str = _f(
        "uniform",
        "f(x): uniform (plain mean) | linupper min(x+1, 1) | quadratic 1-x² | extremes |x|",
        choices=("uniform", "linupper", "quadratic", "extremes"),
    )
    r: float = _f(1.0, "temperature: w_max / w_min <= e^(1/r); larger is closer to uniform", gt=0)
    warmup_steps: int = _f(1000, "optimizer steps of plain (uniform) averaging before reweighting starts", ge=0)


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: how long, how big, where outputs go."""

    steps: int = _f(1000, "optimizer steps", gt=0)
    batch_size: int = _f(32, "global batch in sequences per optimizer step (all ranks, all micro-batches)", gt=0)
    micro_batch_size: int = _f(0, "sequences per forward per rank; 0 = batch_size / world size", ge=0)
    seq_len: int = _f(256, "tokens per sequence", gt=0)
    grad_clip: float = _f(1.0, "max global gradient norm; 0 = no clipping", ge=0)
    seed: int = _f(0, "seed for init, data order and every subspace choice", ge=0, lt=2**63)
    out_dir: str = _f("runs/default", "run folder: logs, checkpoints, config, tokenizer")
    resume: str = _f("none", "none | auto (newest valid checkpoint in out_dir) | a checkpoint path")
    init_from: str = _f(
        "",
        "continued pretraining: weights (only) from a Hugging Face Llama folder or Hub id, or a leanlm run/checkpoint; "
        "the model shape and tokenizer come from it",
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    param_dtype: str = _f(
        "fp32",
        "weights, gradients and optimizer state: fp32 (bf16 autocast on GPU), bf16 (pure bf16, as FRUGAL's 7B run) "
        "or int8 (the blocks' seven projections as int8 codes + float32 scales, updated with stochastic rounding; "
        "the rest bf16; one process)",
        choices=("fp32", "bf16", "int8"),
    )
    int8_group: int = _f(
        0,
        "with param_dtype=int8: consecutive elements of a row that share a scale; 0 = one scale per output row",
        ge=0,
    )
    bf16_rounding: str = _f(
        "stochastic",
        "with param_dtype=bf16: updates computed in float32, rounded back stochastically (unbiased) or to nearest "
        "(int8 weights always round stochastically)",
        choices=("stochastic", "nearest"),
    )
    threads: int = _f(0, "torch CPU threads; 0 = torch's default", ge=0)
    compile: bool = _f(False, "torch.compile the model")
    loss_chunk_tokens: int = _f(
        4096,
        "tokens per chunk of the fused output head + cross-entropy (bounds the float32 logits); 0 = one chunk",
        ge=0,
    )
    reweight: ReweightConfig = field(default_factory=ReweightConfig)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.batch_size // (self.micro_batch(world_size) * world_size)

    def micro_batch(self, world_size: int) -> int:
        return self.micro_batch_size or self.batch_size // world_size

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation on a fixed token set."""

    every: int = _f(100, "evaluate every N steps (and at the end); 0 = only at the end", ge=0)
    tokens: int = _f(65536, "held-out tokens evaluated (a fixed set, the same every time)", gt=0)
    batch_size: int = _f(8, "sequences per eval forward", gt=0)
    early: int = _f(
        4,
        "extra log-spaced evaluations at every/2, every/4, ... (more early points for scaling fits; past "
        "log2(every) they add nothing)",
        ge=0,
        le=62,
    )

    harness_tasks: list[str] = _f(
        [], "lm-evaluation-harness tasks run during training (rank 0, backends none/ddp; needs leanlm[eval])"
    )
    harness_every: int = _f(0, "run eval.harness_tasks every N steps (and at the end); 0 = only at the end", ge=0)
    harness_include_path: str = _f("", "a folder of local lm_eval task YAML files for eval.harness_tasks")
    harness_limit: int = _f(0, "lm_eval: at most N documents per task; 0 = all", ge=0)

    def is_harness_step(self, step: int, last: int) -> bool:
        """Whether ``eval.harness_tasks`` run after optimizer step ``step`` of ``last``."""
        return bool(self.harness_tasks) and (
            step == last or bool(self.harness_every and step % self.harness_every == 0)
        )

    def is_eval_step(self, step: int) -> bool:
        """Regular evaluations every ``every`` steps plus the log-spaced early ones."""
        if not self.every:
            return False
        # every / 2**k is below 1 from k = every.bit_length() on: no point in going further
        depth = min(self.early, self.every.bit_length())
        early = {round(self.every / 2**k) for k in range(1, depth + 1)} - {0}
        return step % self.every == 0 or step in early


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every: int = _f(0, "save every N steps (and at the end); 0 = only at the end", ge=0)
    keep: int = _f(3, "keep the newest K checkpoints; 0 = keep all", ge=0)


@dataclass(kw_only=True)
class LogConfig:
    """Metrics outputs."""

    every: int = _f(10, "log train scalars every N steps", gt=0)
    tensorboard: bool = _f(True, "write TensorBoard event files to <out_dir>/tb")
    progress: bool = _f(True, "tqdm progress bar on the main rank")
    scaling: bool = _f(True, "append a row per evaluation to <out_dir>/scaling.jsonl (ColPret schema)")
    model_name: str = _f("", "run id in scaling.jsonl; empty = the run folder's name")
    scaled_set: str = _f("", "scaling family in scaling.jsonl; empty = the run folder's parent's name")
    trackers: list[str] = _f([], "experiment trackers beside TensorBoard: trackio, wandb (optional extras)")
    tracker_project: str = _f("leanlm", "the trackers' project name")


@dataclass(kw_only=True)
class DistributedConfig:
    """Multi-process training under torchrun."""

    backend: str = _f(
        "auto",
        "auto (none for 1 process, ddp otherwise) | none | ddp | fsdp2 | deepspeed",
        choices=("auto", "none", "ddp", "fsdp2", "deepspeed"),
    )
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage 0-3 (FRUGAL: 0, or 1-3 with columns/randk)", choices=(0, 1, 2, 3))
    reshard_after_forward: bool = _f(
        True, "FSDP2: free gathered block weights after forward (ZeRO-3 like); false = ZeRO-2 like"
    )
    timeout_s: int = _f(600, "collective timeout in seconds (a hung rank fails the job after it)", gt=0)


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler traces of chosen steps (and, on CUDA, a memory snapshot)."""

    steps: list[int] = _f(
        [], "[first, last] optimizer steps (1-based, inclusive) to trace into <out_dir>/profile/; [] = off"
    )


@dataclass(kw_only=True)
class RunConfig:
    """The whole run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "distributed": DistributedConfig,
    "profile": ProfileConfig,
}


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)``, bounded: error messages quote what the user gave, never megabytes of it."""
    return _SHORT.repr(value)


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def field_type(cls: type, name: str) -> Any:
    tp = typing.get_type_hints(cls)[name]
    if isinstance(tp, types.GenericAlias):
        tp = typing.get_origin(tp)
    return tp


def item_type(cls: type, name: str) -> Any:
    """The element type of a ``list[X]`` field, else None."""
    args = typing.get_args(typing.get_type_hints(cls)[name])
    return args[0] if args else None


def leaves(obj: Any, prefix: str):
    """(dotted key, dataclass field, value) for every leaf field of a config dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", f, value


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every config key, for ``leanlm keys`` and the README."""
    rows = []
    for sname, cls in SECTION_TYPES.items():
        for key, f, default in leaves(cls(), sname):
            help_ = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_ += f" [{'|'.join(map(str, f.metadata['choices']))}]"
            rows.append((key, repr(default), help_))
    return rows
