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
from leanlm.engine.host import available_memory_bytes, release_free_memory
from leanlm.engine.model import LLaMA, count_parameters
from leanlm.optim import PrecisionHooks, StepInBackward, build_optimizer
from leanlm.optim.factory import optimizer_kwargs
from leanlm.optim.lost import ConversionReport, LayerFactory, LOSTLinear, convert, lost_targets
from leanlm.optim.lost_int8 import Int8LOSTLinear, quantize_lost
from leanlm.optim.precision import STATE_8BIT, hooks_of
from leanlm.optim.quantized import Int8Linear, quantize_linears


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


def build_model(
    cfg: RunConfig, tokenizer_vocab: int, device: torch.device | str = "cpu", restoring: bool = False
) -> LLaMA:
    """The config's LLaMA on ``device`` (``meta`` for shape-only use), LOST-converted when
    ``model.lost.enabled``, in ``train.param_dtype`` (int8: the blocks' projections as
    ``Int8Linear``, quantized from their float32 init; everything else bf16).

    The init is drawn in float32 and cast. When the float32 model would not fit in free memory but
    the ``param_dtype`` one does (a 7B model in bf16 on a 24 GiB machine), it is built on the meta
    device and initialised tensor by tensor instead (same distribution; another draw order); a
    LOST model then converts one dense layer at a time. ``restoring``: a checkpoint will overwrite
    every weight, so none is drawn (no SVD either): storage only, filled by the load."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}; raise it or set 0"
        )
    dtype = torch.float32 if cfg.train.param_dtype == "fp32" else torch.bfloat16
    device = torch.device(device)
    # int8: always tensor by tensor, so no float32 copy of the whole model ever exists (its peak)
    real = device.type != "meta"
    if real and (restoring or cfg.train.param_dtype == "int8" or not check_weights_fit(cfg, vocab, device, dtype)):
        model = _build_in_place(cfg, vocab, device, dtype, draw=not restoring)
    else:
        with device:
            model = LLaMA(cfg.model, vocab, cfg.train.seq_len)
        if cfg.model.lost.enabled:
            apply_lost(model, cfg)
        if cfg.train.param_dtype == "int8":  # from the float32 init, before the cast
            quantize_linears(model, int8_targets(model), cfg.train.int8_group)
            quantize_lost(model)
        model = model.to(dtype)
    if device.type == "cpu":
        release_free_memory()  # the float32 init's freed pages, back to the kernel
    return model


def int8_targets(model: torch.nn.Module) -> list[str]:
    """Names of the modules ``train.param_dtype=int8`` stores in int8: the blocks' seven
    projections (embedding, head and norms stay bf16)."""
    return [name for name, module in lost_targets(model) if isinstance(module, torch.nn.Linear)]


def check_weights_fit(cfg: RunConfig, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the float32 init fits in the device's free memory. Refuses, before allocating, a
    model whose weights (and, for LOST, the float32 SVD of its largest layer) do not fit even in
    ``dtype``."""
    with torch.device("meta"):
        dense = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    n = count_parameters(dense)
    free = available_memory_bytes(device)
    if free is None or n * 4 <= free:
        return True
    need = n * dtype.itemsize
    if cfg.train.param_dtype == "int8":
        need = sum(p.numel() * (1 if int8 else dtype.itemsize) for p, int8 in _int8_split(dense))
    if cfg.model.lost.enabled:  # the converted model, plus one dense layer's float32 SVD workspace
        per_param = 1 if cfg.train.param_dtype == "int8" else dtype.itemsize  # LOST factors in int8
        need = count_parameters(build_model(cfg, vocab, "meta")) * per_param + LOST_SVD_WORKSPACE * max(
            m.weight.numel() * 4 for _, m in lost_targets(dense) if isinstance(m, torch.nn.Linear)
        )
    if need > free:
        raise ConfigError(
            f"the model needs {need / 2**30:.2f} GiB to be built in {dtype}, but {device} has "
            f"{free / 2**30:.2f} GiB free; shrink model.* (see `leanlm memory`) or use a larger device"
        )
    return False


def _int8_split(model: torch.nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """Each parameter of a (meta) dense model and whether ``param_dtype=int8`` stores it in int8."""
    targets = {id(m.weight) for _, m in lost_targets(model) if isinstance(m, torch.nn.Linear)}
    return [(p, id(p) in targets) for p in model.parameters()]


# A dense layer's SVD holds W, U, Vh and W_comp in float32 at once: about 4 copies of W (plus one).
LOST_SVD_WORKSPACE = 5


@torch.no_grad()
def _build_in_place(cfg: RunConfig, vocab: int, device: torch.device, dtype: torch.dtype, draw: bool) -> LLaMA:
    """Shapes on the meta device, then storage in ``dtype`` module by module; with ``draw`` each
    weight drawn in float32 and cast, each LOST layer converted from its own float32 dense draw (at
    most one float32 layer alive: peak memory is the ``dtype`` model plus its largest layer's SVD)."""
    with torch.device("meta"):
        model = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    if cfg.model.lost.enabled:
        apply_lost(model, cfg, make_layer=_layer_on_device(cfg, device=device, dtype=dtype, draw=draw))
    if cfg.train.param_dtype == "int8":  # int8 layers made on device below, each from its float32 draw
        quantize_linears(model, int8_targets(model), cfg.train.int8_group)
    for module in model.modules():
        if isinstance(module, LOSTLinear):
            continue
        if isinstance(module, Int8Linear):
            module.to_empty(device=device)
            if draw:
                shape = module.storage("weight")[0].shape
                draw_f32 = torch.empty(shape, dtype=torch.float32, device=device)
                module.load_float_(draw_f32.normal_(mean=0.0, std=cfg.model.init_std))
            continue
        for name, t in list(module.named_parameters(recurse=False)):
            real = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            setattr(module, name, torch.nn.Parameter(real, requires_grad=t.requires_grad))
        if not draw:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            draw_f32 = torch.empty(module.weight.shape, dtype=torch.float32, device=device)
            module.weight.copy_(draw_f32.normal_(mean=0.0, std=cfg.model.init_std))
        elif isinstance(weight := getattr(module, "weight", None), torch.Tensor) and weight.ndim == 1:
            weight.fill_(1.0)  # RMSNorm
    model.tie_weights()  # each module got its own tensor above: share the embedding's again
    model._build_rope(device)
    model.rope_cos, model.rope_sin = model.rope_cos.to(dtype), model.rope_sin.to(dtype)  # as model.to(dtype)
    return model


def _layer_on_device(cfg: RunConfig, *, device: torch.device, dtype: torch.dtype, draw: bool) -> LayerFactory:
    """``convert``'s layer factory for a meta model: each LOST layer is made on ``device`` in
    ``dtype`` from its own float32 dense init drawn there (``draw``), or, when a checkpoint will
    fill every tensor, as storage only (shapes from a meta conversion: no SVD, no draw)."""
    lc, init_std = cfg.model.lost, cfg.model.init_std

    def make_layer(dense: torch.nn.Linear, seed: int) -> LOSTLinear:
        rank, options = lc.rank_for(cfg.model.d_model), lost_layer_options(cfg)
        int8 = cfg.train.param_dtype == "int8"
        if not draw:
            layer = LOSTLinear.from_dense(dense, rank, lc.channel_density, seed=seed, **options)
            layer = Int8LOSTLinear.from_lost(layer) if int8 else layer
            return layer.to_empty(device=device).to(dtype)
        real = dense.to_empty(device=device).float()
        real.weight.normal_(mean=0.0, std=init_std)
        if real.bias is not None:
            real.bias.zero_()
        layer = LOSTLinear.from_dense(real, rank, lc.channel_density, seed=seed, **options)
        layer = (Int8LOSTLinear.from_lost(layer) if int8 else layer).to(dtype)  # int8: from the float32 factors
        del real
        if device.type == "cpu":
            release_free_memory()  # this layer's float32 SVD and factors: freed pages back now
        return layer

    return make_layer


def apply_lost(model: LLaMA, cfg: RunConfig, make_layer: LayerFactory | None = None) -> ConversionReport:
    """Convert the block projections to LOST layers, SVD-initialised from the dense init (or built
    by ``make_layer``; see ``leanlm.optim.lost.convert``)."""
    lc = cfg.model.lost
    rank = lc.rank_for(cfg.model.d_model)
    return convert(
        model, rank, lc.channel_density, make_layer=make_layer, seed=cfg.train.seed, **lost_layer_options(cfg)
    )


def lost_layer_options(cfg: RunConfig) -> dict:
    lc = cfg.model.lost
    return dict(
        gamma=lc.gamma,
        phi=lc.phi,
        select=lc.select,
        values_init=lc.values_init,
        init=lc.init,
        support=lc.support,
        svd_components=lc.svd_components,
        svd_solver=lc.svd_solver,
    )


def make_optimizer(cfg: RunConfig, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The configured optimizer (``optim.*``) over ``named_params``, its subspaces seeded by ``train.seed``;
    with bf16 weights or a moment dtype other than the weights', its steps run in float32 and are
    rounded back (``leanlm.optim.PrecisionHooks``)."""
    name = cfg.optim.name
    opt = build_optimizer(name, named_params, **optimizer_kwargs(name, dataclasses.asdict(cfg.optim), cfg.train.seed))
    bf16 = cfg.train.param_dtype in ("bf16", "int8")  # int8: the rest of the model is bf16
    # fp32 moments beside bf16 weights are named explicitly: a resume must restore them as float32
    fp32 = torch.float32 if bf16 else None
    state = {"param": torch.bfloat16 if bf16 else None, "fp32": fp32, "bf16": torch.bfloat16, "int8": STATE_8BIT}[
        cfg.optim.state_dtype
    ]
    if bf16 or state is not None:
        PrecisionHooks(opt, rounding=cfg.train.bf16_rounding, state_dtype=state, seed=cfg.train.seed)
    return opt


# optim.step_in_backward steps gradients in buckets of this many bytes (one optimizer call per
# bucket keeps the per-call overhead and foreach batching; at most this plus one tensor is alive).
IN_BACKWARD_BUCKET = 32 << 20


def in_backward_for(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> StepInBackward | None:
    """``optim.step_in_backward``: the hooks that step ``optimizer`` inside backward, else None.
    On CPU with float32 step copies (``PrecisionHooks``: bf16 weights) each bucket's step is
    followed by ``release_free_memory``: the copies and gradients just freed would otherwise stay in
    the C heap (measured with the 7B recipe's layer shapes: about 85 MB of peak RSS per layer, 2.6
    GiB at 32 layers; a trim took ~9 ms, under 1% of the step of an 8-layer model on this CPU).
    Float32 models skip it: their step makes no such copies, and small models would pay the trims."""
    if not cfg.optim.step_in_backward:
        return None
    on_cpu = hooks_of(optimizer) is not None and all(
        p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"]
    )
    return StepInBackward(
        optimizer,
        clip=cfg.train.grad_clip,
        bucket_bytes=IN_BACKWARD_BUCKET,
        on_flush=release_free_memory if on_cpu else None,
    )


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
    if train.param_dtype == "int8" and backend != "none":
        raise ConfigError(
            f"train.param_dtype=int8 runs in one process ({backend} cannot hold int8 weights yet); "
            "launch one process, or use train.param_dtype=bf16 to shard"
        )
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
