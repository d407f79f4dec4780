"""Builders: a config -> the device, the model (LOST-converted when asked), and the model wrapped
for a distributed backend with its optimizer.

The training loop, ``leanlm eval``/``generate`` and ``leanlm memory`` all build models here, so no
tool has to import the loop to get one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch

from leanlm.engine import distributed as dist
from leanlm.engine.config import RunConfig
from leanlm.engine.errors import ConfigError
from leanlm.engine.metrics import available_memory_bytes
from leanlm.engine.model import LLaMA, count_parameters
from leanlm.optim import PrecisionHooks, StepInBackward, build_optimizer, optimizer_kwargs
from leanlm.optim.lost import convert


def pick_device(spec: str) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        spec = f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available; use train.device=cpu")
    return torch.device(spec)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    """bf16 autocast for ``precision=bf16``, or ``auto`` on CUDA; None means full precision."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def build_model(cfg: RunConfig, tokenizer_vocab: int, device: torch.device | str = "cpu") -> LLaMA:
    """The config's LLaMA on ``device`` (``meta`` for shape-only use), LOST-converted when
    ``model.lost.enabled``, in ``train.param_dtype``.

    The init is drawn in float32 and cast. When the float32 model would not fit in free memory but
    the ``param_dtype`` one does (a 7B model in bf16 on a 24 GiB machine), it is built on the meta
    device and initialised tensor by tensor instead (same distribution; another draw order)."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}; raise it or set 0"
        )
    dtype = torch.bfloat16 if cfg.train.param_dtype == "bf16" else torch.float32
    device = torch.device(device)
    if device.type != "meta" and not check_weights_fit(cfg, vocab, device, dtype):
        model = _build_tensor_by_tensor(cfg, vocab, device, dtype)
    else:
        with device:
            model = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    if cfg.model.lost.enabled:
        apply_lost(model, cfg)
    return model.to(dtype)


def check_weights_fit(cfg: RunConfig, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the float32 init fits in the device's free memory. Refuses, before allocating, a
    model whose weights do not fit even in ``dtype``."""
    with torch.device("meta"):
        n = count_parameters(LLaMA(cfg.model, vocab, cfg.train.seq_len))
    free = available_memory_bytes(device)
    if free is None or n * 4 <= free:
        return True
    lost = cfg.model.lost.enabled  # LOST's SVD init decomposes the dense float32 weights
    need = n * (4 if lost else torch.tensor([], dtype=dtype).element_size())
    if need > free:
        what = "the float32 weights LOST's SVD init decomposes" if lost else "the weights alone"
        raise ConfigError(
            f"the model has {n / 1e9:.2f}B parameters: {need / 2**30:.1f} GiB for {what}, but {device} has "
            f"{free / 2**30:.1f} GiB free; shrink model.* (see `leanlm memory`) or use a larger device"
        )
    return False


@torch.no_grad()
def _build_tensor_by_tensor(cfg: RunConfig, vocab: int, device: torch.device, dtype: torch.dtype) -> LLaMA:
    """Shapes on the meta device, storage in ``dtype``, then each weight drawn in float32 and cast
    (at most one float32 tensor alive: peak memory is the ``dtype`` model plus its largest tensor)."""
    with torch.device("meta"):
        model = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    model = model.to(dtype).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            draw = torch.empty(module.weight.shape, dtype=torch.float32, device=device)
            module.weight.copy_(draw.normal_(mean=0.0, std=cfg.model.init_std))
        elif hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 1:
            module.weight.fill_(1.0)  # RMSNorm
    model._build_rope(device)
    return model


def apply_lost(model: LLaMA, cfg: RunConfig) -> LLaMA:
    """Convert the block projections to LOST layers, SVD-initialised from the dense init."""
    lc = cfg.model.lost
    return convert(
        model,
        lc.rank_for(cfg.model.d_model),
        lc.channel_density,
        gamma=lc.gamma,
        phi=lc.phi,
        select=lc.select,
        values_init=lc.values_init,
        init=lc.init,
        support=lc.support,
        svd_components=lc.svd_components,
        seed=cfg.train.seed,
    )


def make_optimizer(cfg: RunConfig, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The configured optimizer (``optim.*``) over ``named_params``, its subspaces seeded by ``train.seed``;
    with bf16 weights or a moment dtype other than the weights', its steps run in float32 and are
    rounded back (``leanlm.optim.PrecisionHooks``)."""
    name = cfg.optim.name
    opt = build_optimizer(name, named_params, **optimizer_kwargs(name, dataclasses.asdict(cfg.optim), cfg.train.seed))
    bf16 = cfg.train.param_dtype == "bf16"
    state = {"param": torch.bfloat16 if bf16 else None, "fp32": None, "bf16": torch.bfloat16}[cfg.optim.state_dtype]
    if bf16 or state is not None:
        PrecisionHooks(opt, rounding=cfg.train.bf16_rounding, state_dtype=state, seed=cfg.train.seed)
    return opt


# optim.step_in_backward steps gradients in buckets of this many bytes (one optimizer call per
# bucket keeps the per-call overhead and foreach batching; at most this plus one tensor is alive).
IN_BACKWARD_BUCKET = 32 << 20


def in_backward_for(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> StepInBackward | None:
    """``optim.step_in_backward``: the hooks that step ``optimizer`` inside backward, else None."""
    if not cfg.optim.step_in_backward:
        return None
    return StepInBackward(optimizer, clip=cfg.train.grad_clip, bucket_bytes=IN_BACKWARD_BUCKET)


def parallelize(
    cfg: RunConfig, model: LLaMA, backend: str, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, contextlib.AbstractContextManager | None]:
    """Shard or wrap ``model`` for ``backend`` and build the optimizer on what the backend trains.

    Returns (the module the loop calls, the client optimizer, the autocast context). FSDP2 shards
    before the optimizer exists (it must see the sharded parameters); DeepSpeed takes the optimizer
    and wraps both. On GPU, bf16 comes from FSDP2's mixed-precision policy or DeepSpeed's bf16 mode
    instead of autocast.
    """
    train, world = cfg.train, dist.world_size()
    autocast = autocast_for(train.precision, device)
    gpu_bf16 = autocast is not None and device.type == "cuda"
    if backend == "fsdp2":
        dist.shard_fsdp2(model, list(model.layers), gpu_bf16, cfg.distributed.reshard_after_forward)
        autocast = None if gpu_bf16 else autocast
    optimizer = make_optimizer(cfg, model.named_parameters())
    if backend == "deepspeed":
        ds_config = dist.deepspeed_config(
            micro_batch=train.micro_batch(world),
            grad_accum=train.grad_accum_steps(world),
            grad_clip=train.grad_clip,
            zero_stage=cfg.distributed.zero_stage,
            bf16=gpu_bf16,
        )
        return dist.wrap_deepspeed(model, optimizer, ds_config), optimizer, (None if gpu_bf16 else autocast)
    if backend == "ddp":
        return dist.wrap_ddp(model, device), optimizer, autocast
    return model, optimizer, autocast
