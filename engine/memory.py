"""``leanlm memory``: what a config needs in memory, before anyone rents a GPU.

Parameters, gradients and optimizer state are measured, not estimated: the model is built on the
meta device, the configured optimizer takes one step on meta gradients, and the state tensors it
creates are counted by shape (no memory is allocated). Activations are an estimate (the tensors a
LLaMA block keeps for backward, per token), and the allocator's fragmentation and the CUDA context
(~0.5–1 GiB) are not included.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import torch

from leanlm.engine.build import IN_BACKWARD_BUCKET, LOST_SVD_WORKSPACE, build_model, make_optimizer
from leanlm.engine.config import RunConfig
from leanlm.engine.host import available_memory_bytes
from leanlm.engine.model import LLaMA
from leanlm.optim import state8, state_bytes
from leanlm.optim.groups import is_projectable_name
from leanlm.optim.lost import lost_targets
from leanlm.optim.precision import CHUNK_BYTES, SR_CHUNK, chunk_rows, is_elementwise
from leanlm.optim.quantized import ROUND_CHUNK, int8_bytes, int8_storage
from leanlm.optim.registry import REGISTRY

GIB = 2**30


@dataclass(kw_only=True)
class MemoryReport:
    parameters: int  # count
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    activation_bytes: int
    tokens_per_micro_batch: int
    block_bytes: int = 0  # one transformer block's parameters (what FSDP2 / ZeRO-3 gather)
    step_in_backward: bool = False  # gradients freed one tensor at a time
    step_bytes: int = 0  # transient during the step: float32 copies (bf16 weights) and scratch buffers
    runtime_bytes: int = 0  # the process itself (CPU: Python, torch and leanlm after import)
    init_bytes: int = 0  # CPU: the float32 init a bf16 or LOST model is built from (pages kept after)
    layout: str = "data parallel, one replica"

    @property
    def total_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optim_bytes
            + self.activation_bytes
            + self.step_bytes
            + self.runtime_bytes
            + self.init_bytes
        )

    def per_rank(self, backend: str, zero_stage: int, world: int) -> MemoryReport:
        """The same run sharded over ``world`` ranks. FSDP2 shards parameters, gradients and
        optimizer state (and gathers one block at a time: counted once, in the parameter row);
        ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 also parameters. FRUGAL's
        state divides like AdamW's (measured: BENCHMARKS.md). DDP replicates everything."""
        if world <= 1 or backend in ("none", "ddp", "auto"):
            return replace(self, layout=f"replicated on each of {world} ranks" if world > 1 else self.layout)
        shard_params = backend == "fsdp2" or zero_stage >= 3
        shard_grads = backend == "fsdp2" or zero_stage >= 2
        shard_optim = backend == "fsdp2" or zero_stage >= 1
        what = "FSDP2" if backend == "fsdp2" else f"DeepSpeed ZeRO-{zero_stage}"
        return replace(
            self,
            param_bytes=(self.param_bytes // world + self.block_bytes if shard_params else self.param_bytes),
            grad_bytes=self.grad_bytes // world if shard_grads else self.grad_bytes,
            optim_bytes=self.optim_bytes // world if shard_optim else self.optim_bytes,
            layout=f"{what}, per rank of {world}",
        )

    def table(self, name: str, optimizer: str) -> str:
        rows = [
            ("parameters", self.param_bytes, f"{self.parameters / 1e6:,.2f}M"),
            (
                "gradients",
                self.grad_bytes,
                "largest tensor + bucket (step in backward)" if self.step_in_backward else "",
            ),
            (
                f"optimizer state ({optimizer})",
                self.optim_bytes,
                "2 moments per parameter" if optimizer == "adamw" else "measured on meta tensors",
            ),
            (
                "activations (estimate)",
                self.activation_bytes,
                f"{self.tokens_per_micro_batch:,} tokens per micro-batch",
            ),
            ("optimizer step transients", self.step_bytes, "float32 step copies, FRUGAL scratch"),
        ]
        if self.runtime_bytes:
            rows.append(("process runtime (CPU)", self.runtime_bytes, "Python + torch + leanlm, measured"))
        if self.init_bytes:
            rows.append(("float32 init residue (CPU)", self.init_bytes, "freed after the cast / LOST conversion"))
        lines = [f"{name}: memory per GPU ({self.layout})"]
        lines += [f"  {label:<32} {b / GIB:9.2f} GiB  {note}" for label, b, note in rows]
        lines.append(f"  {'total':<32} {self.total_bytes / GIB:9.2f} GiB")
        for card in (24, 40, 80):
            verdict = "fits" if self.total_bytes < (card - 1) * GIB else "does not fit"
            lines.append(f"  {card} GiB card (1 GiB kept for the CUDA context): {verdict}")
        return "\n".join(lines)


def activation_bytes(cfg: RunConfig, vocab: int, act_bytes: int, param_dtype_bytes: int) -> int:
    """Saved-for-backward activations of one micro-batch.

    Per token and block (h = d_model, f = ffn_dim): norms keep their input and output (4h, in
    float32), attention q, k, v, rotated q, k, the output and o_proj's input (~7h), the MLP's gate,
    up, silu(gate) and their product (4f) plus down_proj's input (f). With activation
    checkpointing a block keeps only its input, and one block's worth is rebuilt at a time. The
    head adds the logits, their float32 copy for the loss and its gradient. Document masking
    adds its boolean mask (B·T² bytes: the SDPA path; flex_attention's block mask is far smaller).
    """
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch(1) * t.seq_len
    h, f, L = m.d_model, m.ffn_dim, m.n_layers
    per_block = 4 * h * 4 + (7 * h + 5 * f) * act_bytes
    blocks = L * h * param_dtype_bytes + per_block if m.activation_checkpointing else L * per_block
    head = vocab * (act_bytes + 4 + 4)
    # model.doc_masking: one boolean (B, 1, T, T) mask per micro-batch, shared by every block
    mask = tokens * t.seq_len if m.doc_masking else 0
    return tokens * (blocks + head + h * 4) + mask


def memory_report(cfg: RunConfig, vocab: int, on_gpu: bool = True) -> MemoryReport:
    """Measure parameter, gradient and optimizer-state bytes on the meta device; estimate activations.
    Int8 weights count their codes and scales; 8-bit moments their codes and block absmax."""
    dtype = torch.float32 if cfg.train.param_dtype == "fp32" else torch.bfloat16

    model = build_model(cfg, vocab, "meta").to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = make_optimizer(cfg, model.named_parameters())
    if cfg.optim.name == "adamw":  # torch's AdamW allocates lazily and cannot step on meta tensors
        optim = sum(adamw_moment_bytes(p, cfg.optim.state_dtype) + 4 for p in params)  # + its step count
    else:
        opt.step()
        optim = state_bytes(opt)
    n = sum(p.numel() for p in params)
    elt = dtype.itemsize if hasattr(dtype, "itemsize") else torch.tensor([], dtype=dtype).element_size()
    uses_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu) or dtype == torch.bfloat16
    act = activation_bytes(cfg, vocab, 2 if uses_bf16 else 4, elt)
    block = sum(p.numel() for p in model.layers[0].parameters()) * elt
    grads = n * elt
    if cfg.optim.step_in_backward and cfg.train.grad_accum_steps(1) == 1:
        # Each gradient is stepped and freed as soon as it is complete: the largest one (the embedding
        # or head) bounds what is alive, plus the bucket of small ones that waits for its step.
        grads = max(p.numel() for p in params) * elt + IN_BACKWARD_BUCKET
    tokens = cfg.train.micro_batch(1) * cfg.train.seq_len
    return MemoryReport(
        parameters=n,
        param_bytes=int8_bytes(model) + sum(p.numel() * elt for p in params if int8_storage(p) is None),
        grad_bytes=grads,
        optim_bytes=optim,
        activation_bytes=act,
        tokens_per_micro_batch=tokens,
        block_bytes=block,
        step_in_backward=grads != n * elt,
        step_bytes=step_transient_bytes(cfg, model, opt, dtype),
        runtime_bytes=0 if on_gpu else CPU_RUNTIME_BYTES,
        init_bytes=0 if on_gpu else init_residue_bytes(cfg, vocab, dtype),
    )


def adamw_moment_bytes(p: torch.Tensor, state_dtype: str) -> int:
    """torch's AdamW's two moments of ``p`` as stored between steps: ``optim.state_dtype=int8``
    codes plus a float32 absmax per 256 values (float32 below 4096 values), else their dtype's."""
    if state_dtype == "int8" and state8.quantizable(p.shape):
        return 2 * (p.numel() + state8.blocks_of(p.numel()) * 4)
    size = {"param": p.element_size(), "fp32": 4, "bf16": 2, "int8": 4}[state_dtype]
    return 2 * p.numel() * size


def init_residue_bytes(cfg: RunConfig, vocab: int, dtype: torch.dtype) -> int:
    """A bf16 or LOST model is first built dense in float32 (``engine.build.build_model``); the
    allocator keeps most of those pages after the cast or conversion, so on CPU they stay in the
    process's resident set (measured: scripts/validate_memory.py), except where ``build_model``
    returns them to the kernel (glibc: a bf16 model's float32 init; a LOST conversion's peak, the
    dense float32 model beside its factors, still counts). A model whose float32 init does
    not fit, and every int8 model, is built in place instead: only its largest tensor's float32
    copy then (for LOST, the SVD workspace of its largest dense layer)."""
    if dtype != torch.bfloat16 and not cfg.model.lost.enabled:
        return 0
    if not cfg.model.lost.enabled and sys.platform.startswith("linux"):
        return 0  # build_model hands the freed float32 pages back (malloc_trim): measured, none stay
    with torch.device("meta"):
        dense = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    sizes = [p.numel() for p in dense.parameters()]
    targets = [m.weight.numel() for _, m in lost_targets(dense) if isinstance(m, torch.nn.Linear)]
    free = available_memory_bytes(torch.device("cpu"))
    in_place = cfg.train.param_dtype == "int8"  # int8 models are always built tensor by tensor
    if in_place or (free is not None and sum(sizes) * 4 > free):
        if cfg.model.lost.enabled:
            return max(targets) * 4 * LOST_SVD_WORKSPACE
        return max(sizes) * 4
    # LOST built from a whole dense model: the converted projections' float32 weights are freed;
    # those above glibc's 32 MiB mmap threshold go straight back to the kernel, the smaller ones
    # stay in the heap (measured: validate_memory at 60m / 350m / 1b).
    return sum(n * 4 for n in targets if n * 4 < MMAP_THRESHOLD)


MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit Linux


# RSS of a process after importing torch and leanlm's trainer (torch 2.13 CPU build, measured
# 2026-12-01: 0.27 GiB); on GPU the CUDA context is left to the "1 GiB kept" margin instead.
CPU_RUNTIME_BYTES = int(0.27 * GIB)


# float32-sized temporaries of one requantization (old codes, new value, its floor, the noise and
# its float form) and of one 8-bit encoding (padded copy, normalised values, int64 bucket indices)
REQUANT_TEMPS, ENCODE_BYTES = 5, 12


def _one_step_bytes(p: torch.Tensor, moments: list[tuple[int, int]], rows: int, int8: bool) -> int:
    """Transient bytes of stepping ``p`` alone: float32 copies of the weight, gradient and moments
    (``rows`` of them when stepped in slices), plus requantization and 8-bit encoding scratch."""
    cols = p.numel() // p.shape[0] if p.ndim else 1
    span = rows * cols if rows else p.numel()  # elements stepped at once
    # a slice's weight, gradient and moments in float32; or the whole tensor and gradient in
    # float32, the moments converted to float32
    one = span * 4 * (2 + 2) if rows else p.numel() * 4 * 2 + sum(n * (4 - size) for n, size in moments)
    if int8:
        one += min(span, ROUND_CHUNK) * 4 * REQUANT_TEMPS
    if any(size == 1 for _, size in moments):
        one += min(span, state8.CHUNK) * ENCODE_BYTES
    return one


def step_transient_bytes(cfg: RunConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype) -> int:
    """Memory alive only during the optimizer step. With bf16 weights (or moments stored in another
    dtype) ``PrecisionHooks`` steps a float32 copy of each stepped tensor, its gradient and its
    moments, one tensor at a time (the engine steps through ``PrecisionHooks.step`` or inside
    backward, whose bucket of small tensors steps together); an elementwise update of a big bf16
    tensor (the embedding, the head) goes a slice of rows at a time. FRUGAL's state-free step keeps
    a reusable scratch buffer per projectable weight shape. Int8 weights add the requantization's
    float32 temporaries, a ``ROUND_CHUNK`` of rows at a time; 8-bit moments their encoding's."""
    params = [p for p in model.parameters() if p.requires_grad]
    hooked = dtype == torch.bfloat16 or cfg.optim.state_dtype in ("bf16", "int8")  # as build.make_optimizer
    elt = torch.tensor([], dtype=dtype).element_size()
    copies = 0
    if hooked:
        adam_moment = {"param": elt, "fp32": 4, "bf16": 2, "int8": 1}[cfg.optim.state_dtype]
        for p in params:
            if cfg.optim.name == "adamw":  # torch's AdamW: two moments, not stepped on meta
                moments = [(2 * p.numel(), adam_moment)]
            else:
                moments = [
                    (t.numel(), t.element_size())
                    for t in opt.state[p].values()
                    if torch.is_tensor(t) and (t.is_floating_point() or t.dtype == torch.uint8) and t.ndim > 0
                ]
            rows = chunk_rows(p, CHUNK_BYTES) if dtype == torch.bfloat16 and is_elementwise(opt, p) else 0
            copies = max(copies, _one_step_bytes(p, moments, rows, int8_storage(p) is not None))
        if cfg.optim.step_in_backward:  # the bucket of small tensors that steps with the last one
            copies += IN_BACKWARD_BUCKET // elt * 4 * 2
        copies += SR_CHUNK * 4  # the rounding noise (int32), a slice at a time
    scratch = 0
    if REGISTRY[cfg.optim.name].rule(asdict(cfg.optim))[1] != "none":
        shapes = {
            tuple(p.shape) for name, p in model.named_parameters() if p.ndim == 2 and is_projectable_name(name, p)
        }
        scratch = sum(m * n for m, n in shapes) * (4 if hooked else elt)
    return copies + scratch
