"""The training loop: when things happen (eval, checkpoints, logging); the math is in ``step``.

``train(cfg)`` builds, in order: process group, data (tokenizer + packed stream + held-out set),
model, optimizer and schedule, resume state, logging; then runs the loop below. SIGTERM/SIGINT
finish the current step, save a checkpoint and return; a NaN/Inf loss stops the run with an error
(the last good checkpoint stays on disk).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from leanlm.engine import checkpoint as ckpt
from leanlm.engine import distributed as dist
from leanlm.engine import sharded_checkpoint as sharded
from leanlm.engine.config import RunConfig, check_world, save_yaml
from leanlm.engine.data import Corpus, build_corpus
from leanlm.engine.errors import ConfigError, TrainingError
from leanlm.engine.evaluate import EvalResult, evaluate, unigram_loss
from leanlm.engine.metrics import (
    MetricsLogger,
    available_memory_bytes,
    peak_flops,
    peak_memory_gib,
    trim_records,
)
from leanlm.engine.model import LLaMA, count_parameters, flops_per_token
from leanlm.engine.resume import check_resume_config, restore, zero_stage_of
from leanlm.engine.run_lock import RunLock
from leanlm.engine.scaling import ScalingRecorder
from leanlm.engine.schedule import build_scheduler
from leanlm.engine.step import train_step
from leanlm.optim import build_optimizer


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    final: EvalResult | None = None
    unigram_ppl: float = math.nan
    checkpoint: Path | None = None
    interrupted: bool = False
    wall_s: float = 0.0
    tokens_per_s: float = 0.0


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        spec = f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available; use train.device=cpu")
    return torch.device(spec)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def build_model(cfg: RunConfig, tokenizer_vocab: int, device: torch.device | str = "cpu") -> LLaMA:
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}; raise it or set 0"
        )
    dtype = torch.bfloat16 if cfg.train.param_dtype == "bf16" else torch.float32
    if torch.device(device).type != "meta":
        _check_weights_fit(cfg, vocab, torch.device(device), dtype)
    with torch.device(device):
        model = LLaMA(cfg.model, vocab, cfg.train.seq_len)
    if cfg.model.lost.enabled:
        apply_lost(model, cfg)
    return model.to(dtype)


def _check_weights_fit(cfg: RunConfig, vocab: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before allocating, a model whose weights alone exceed the device's free memory
    (the dense init is built in float32 first, then cast)."""
    with torch.device("meta"):
        n = count_parameters(LLaMA(cfg.model, vocab, cfg.train.seq_len))
    need, free = n * 4, available_memory_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"the model has {n / 1e9:.2f}B parameters: {need / 2**30:.1f} GiB for the float32 "
            f"weights alone, but {device} has {free / 2**30:.1f} GiB free; shrink model.* "
            "(see `leanlm memory`) or use a larger device"
        )


def apply_lost(model: LLaMA, cfg: RunConfig):
    """Convert the block projections to LOST layers, SVD-initialised from the dense init."""
    from leanlm.optim.lost import convert

    lc = cfg.model.lost
    return convert(
        model, lc.rank_for(cfg.model.d_model), lc.channel_density, gamma=lc.gamma, phi=lc.phi,
        select=lc.select, values_init=lc.values_init, init=lc.init, support=lc.support,
        svd_components=lc.svd_components, seed=cfg.train.seed,
    )  # fmt: skip


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def scaling_recorder(
    cfg: RunConfig, model: LLaMA, run_dir: Path, fpt: float, corpus: Corpus, step: int
) -> ScalingRecorder:
    """The run's ``scaling.jsonl`` writer with its constant columns filled in; rows after the
    restart ``step`` (written by a crashed attempt) are dropped first."""
    trim_records(run_dir / "scaling.jsonl", step)
    from leanlm.engine import __version__

    o = cfg.optim
    static = {
        "model_name": cfg.log.model_name or run_dir.resolve().name,
        "model_type": "leanlm-llama",
        "scaled_set": cfg.log.scaled_set or run_dir.resolve().parent.name,
        "num_params": count_parameters(model),
        "non_embedding_params": count_parameters(model, non_embedding=True),
        "data": cfg.data.source,
        "loss_cols": ["val_loss"],
        "original_paper": f"leanlm {__version__}",
        "seed": str(cfg.train.seed),
        "arch": "dec",
        "domain": "LM",
        "optimizer": o.name,
        "density": None if o.name == "adamw" else o.density,
        "projection": o.projection if o.name == "frugal" else None,
        "lost_rank": None,
        "lost_density": None,
        "seq_len": cfg.train.seq_len,
        "global_batch_tokens": cfg.train.tokens_per_step(),
        "flops_per_token": fpt,
    }
    per_epoch = getattr(corpus.train, "n", 0) * cfg.train.seq_len or None
    return ScalingRecorder(run_dir / "scaling.jsonl", static, fpt, per_epoch)


def train(cfg: RunConfig, stop_at: int | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``stop_at``: save and return after this step (for tests and resumable jobs)."""
    if os.environ.get("LEANLM_FAULT_AT"):
        dist.parse_fault_spec(os.environ["LEANLM_FAULT_AT"])
    device = pick_device(cfg.train.device)
    backend = dist.resolve_backend(cfg.distributed.backend)
    dist.init(device, cfg.distributed.timeout_s, backend)
    lock = RunLock(Path(cfg.train.out_dir))
    try:
        _hold_run_folder(lock)
        return _train(cfg, device, backend, stop_at)
    finally:
        lock.release()
        dist.shutdown()


def _hold_run_folder(lock: RunLock) -> None:
    """The main rank takes the run folder's lock (so it can be written and no other process
    trains there), then removes temp folders of crashed saves. Every rank learns if it failed."""
    error: Exception | None = None
    if dist.is_main():
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if dist.any_rank(error is not None):
        raise error or ConfigError(f"rank 0 could not take the run folder {lock.run_dir}")
    if dist.is_main():
        for stale in ckpt.remove_stale_temps(lock.run_dir):
            print(f"leanlm: removed {stale.name}, left by a save that did not finish")


def parallelize(
    cfg: RunConfig, model: LLaMA, backend: str, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, contextlib.AbstractContextManager | None]:
    """Shard or wrap ``model`` for ``backend`` and build the optimizer on what the backend trains.

    Returns (the module the loop calls, the client optimizer, the autocast context). FSDP2 shards
    before the optimizer exists (it must see the sharded parameters); DeepSpeed takes the optimizer
    and wraps both. On GPU, bf16 comes from FSDP2's mixed-precision policy or DeepSpeed's bf16 mode
    instead of autocast.
    """
    t, world = cfg.train, dist.world_size()
    autocast = autocast_for(t.precision, device)
    gpu_bf16 = autocast is not None and device.type == "cuda"
    if backend == "fsdp2":
        dist.shard_fsdp2(model, list(model.layers), gpu_bf16, cfg.distributed.reshard_after_forward)
        autocast = None if gpu_bf16 else autocast
    optimizer = build_optimizer(cfg.optim.name, model.named_parameters(), **cfg.optim.optimizer_kwargs(t.seed))
    if backend == "deepspeed":
        ds_config = dist.deepspeed_config(
            t.micro_batch(world), t.grad_accum_steps(world), t.grad_clip,
            cfg.distributed.zero_stage, gpu_bf16,
        )  # fmt: skip
        return (
            dist.wrap_deepspeed(model, optimizer, ds_config),
            optimizer,
            (None if gpu_bf16 else autocast),
        )
    if backend == "ddp":
        return dist.wrap_ddp(model, device), optimizer, autocast
    return model, optimizer, autocast


def _nan_message(res: Any, step: int, good: Path | None, latest: Path | None) -> str:
    """The NaN stop's one line. ``good``: the newest checkpoint whose weights then trained a
    finite step (resuming it with a lower lr works); ``latest`` may be the one that blew up."""
    what = f"loss became {res.loss}" if not math.isfinite(res.loss) else f"gradient norm became {res.grad_norm}"
    what += f" at step {step} (the update was not applied)"
    if good is not None and good.is_dir():
        return (
            f"{what}; {good} is the last checkpoint known to train finitely: continue from it with "
            f"train.resume={good} and a lower optim.lr or a larger optim.warmup_steps"
        )
    blown = f" (the weights in {latest} already diverge)" if latest is not None else ""
    return (
        f"{what}; no kept checkpoint is known to train finitely{blown}: start again in a new "
        "train.out_dir with a lower optim.lr or a larger optim.warmup_steps"
    )


def _train(cfg: RunConfig, device: torch.device, backend: str, stop_at: int | None) -> TrainResult:
    t, main = cfg.train, dist.is_main()
    check_world(cfg, dist.world_size())
    run_dir = Path(t.out_dir)
    resume_from = ckpt.resolve_resume(run_dir, t.resume)
    if resume_from is None and ckpt.list_checkpoints(run_dir) and t.resume != "auto":
        raise ConfigError(
            f"train.out_dir={t.out_dir!r} already holds checkpoints; pass train.resume=auto to continue it or pick a new train.out_dir"
        )
    if resume_from is not None:
        check_resume_config(cfg, resume_from)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)

    corpus: Corpus = build_corpus(cfg, resume_from / "tokenizer.model" if resume_from else None)
    model = build_model(cfg, corpus.tokenizer.vocab_size, device)
    n_params = count_parameters(model)  # before sharding: the global count
    net, optimizer, autocast = parallelize(cfg, model, backend, device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        step, tokens_seen = restore(resume_from, backend, model, net, optimizer, scheduler, corpus.train, device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        corpus.tokenizer.save(run_dir / "tokenizer.model")

    if t.compile and dist.is_deepspeed(net):
        if main:
            print("leanlm: train.compile is ignored under DeepSpeed (its engine wraps the module)")
    elif t.compile:
        net = torch.compile(net)
    # Records past the restart step (all of them on a fresh start) belong to an attempt that
    # crashed before saving them: dropped, so the logs read as one uninterrupted run.
    logger = MetricsLogger(run_dir, main, cfg.log.tensorboard, resume_step=step)
    fpt = flops_per_token(cfg.model, model.vocab_size, t.seq_len)
    peak = peak_flops(device)
    unigram = unigram_loss(corpus.train_counts, corpus.val_tokens, t.seq_len)
    if main:
        print(
            f"leanlm: {n_params / 1e6:.2f}M parameters ({count_parameters(model, True) / 1e6:.2f}M non-embedding), "
            f"vocab {model.vocab_size}, {t.tokens_per_step():,} tokens/step x {t.steps} steps = {t.tokens_per_step() * t.steps:,} tokens, "
            f"grad accum {t.grad_accum_steps(dist.world_size())} x world {dist.world_size()} ({backend}), device {device}\n"
            f"leanlm: data {corpus.description}\n"
            f"leanlm: run folder {run_dir}" + (f", resuming from {resume_from} (step {step})" if resume_from else "")
        )

    def do_eval(at: int) -> EvalResult:
        res = evaluate(
            net,
            corpus.val_tokens,
            t.seq_len,
            cfg.eval.batch_size,
            device,
            autocast,
            t.loss_chunk_tokens,
        )
        logger.log(at, {"val/loss": res.loss, "val/ppl": res.ppl}, tokens_seen=tokens_seen)
        if recorder is not None:
            elapsed = time.perf_counter() - start
            recorder.record(
                at, tokens_seen, res.loss, result.losses[-1] if result.losses else None,
                scheduler.get_last_lr()[0], elapsed, (tokens_seen - start_tokens) / max(elapsed, 1e-9),
                str(last_ckpt or ""),
            )  # fmt: skip
        return res

    def do_save(at: int) -> Path | None:
        """Backends none/ddp: the main rank writes model.pt + optim.pt. fsdp2 / deepspeed: every
        rank writes its shards (DCP / DeepSpeed files), the main rank the rest."""
        writer = {
            "fsdp2": lambda tmp: sharded.save_dcp(tmp / sharded.DCP_DIR, model, optimizer),
            "deepspeed": lambda tmp: sharded.save_deepspeed(tmp / sharded.DS_DIR, net),
        }.get(backend)
        if writer is None and not main:
            return None
        train_state = {
            "step": at,
            "tokens_seen": tokens_seen,
            "scheduler": scheduler.state_dict(),
            "data": corpus.train.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "backend": backend,
            "world_size": dist.world_size(),
            "zero_stage": zero_stage_of(net),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        }
        files = {
            "config.yaml": (run_dir / "config.yaml").read_bytes() if main else b"",
            "tokenizer.model": corpus.tokenizer.proto,
        }
        tensors = {"train": train_state}
        if writer is None:
            tensors.update(model=model.state_dict(), optim=optimizer.state_dict())
        path = ckpt.save_checkpoint(run_dir, at, tensors, files, cfg.checkpoint.keep, writer, written)
        return path if main else None

    written: set[Path] = set()  # checkpoint folders of this call: the only ones a save may replace
    recorder = scaling_recorder(cfg, model, run_dir, fpt, corpus, step) if main and cfg.log.scaling else None
    start, start_tokens = time.perf_counter(), tokens_seen
    result = TrainResult(run_dir=run_dir, step=step, tokens_seen=tokens_seen, unigram_ppl=math.exp(unigram))
    last_ckpt: Path | None = resume_from
    # A checkpoint is "good" once the step after it trained finitely from its weights.
    good_ckpt: Path | None = None
    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not (main and cfg.log.progress),
        dynamic_ncols=True,
        unit="step",
    )
    window_start = time.perf_counter()
    window_tokens, paused = 0, 0.0
    net.train()
    try:  # the logs are closed (flushed) however the loop ends
        with StopFlag() as stop:
            while step < t.steps:
                rw = t.reweight if t.reweight.strategy != "uniform" and step >= t.reweight.warmup_steps else None
                res = train_step(
                    net, optimizer, corpus.train.next_step(), device, autocast, t.grad_clip,
                    reweight=(rw.strategy, rw.r) if rw else None, chunk_tokens=t.loss_chunk_tokens,
                )  # fmt: skip
                if not res.finite:
                    raise TrainingError(_nan_message(res, step + 1, good_ckpt, last_ckpt))
                good_ckpt = last_ckpt
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                step_tokens = res.tokens * dist.world_size()
                tokens_seen += step_tokens
                window_tokens += step_tokens
                loss = dist.all_reduce_mean(res.loss, device)
                result.losses.append(loss)
                if step % cfg.log.every == 0 or step == t.steps:
                    elapsed = time.perf_counter() - window_start - paused
                    tps = window_tokens / max(elapsed, 1e-9)
                    scalars = {
                        "train/loss": loss,
                        "train/grad_norm": res.grad_norm,
                        "optim/lr": lr,
                        "perf/tokens_per_s": tps,
                        "mem/peak_gib": peak_memory_gib(device),
                    }
                    if peak:
                        scalars["perf/mfu"] = fpt * tps / (peak * dist.world_size())
                    if res.reweight is not None:
                        scalars.update(res.reweight.scalars())
                    logger.log(step, scalars, tokens_seen=tokens_seen)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    window_start, window_tokens, paused = time.perf_counter(), 0, 0.0
                bar.update(1)
                pause = time.perf_counter()  # eval and checkpoint time stays out of tokens/s
                if cfg.eval.is_eval_step(step) and step != t.steps:
                    val = do_eval(step)
                    if main:
                        bar.write(f"step {step}: val loss {val.loss:.4f}, ppl {val.ppl:.2f}")
                stopping = dist.any_rank(stop.signal is not None) or step == stop_at
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == t.steps:
                    last_ckpt = do_save(step) or last_ckpt
                paused += time.perf_counter() - pause
                if dist.fault_injection_due(step):
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping:
                    result.interrupted = stop.signal is not None
                    break
        result.wall_s = time.perf_counter() - start
        result.tokens_per_s = (tokens_seen - result.tokens_seen) / max(result.wall_s, 1e-9)
        result.step, result.tokens_seen, result.checkpoint = step, tokens_seen, last_ckpt
        if step == t.steps:
            result.final = do_eval(step)
    finally:
        bar.close()
        logger.close()
    dist.barrier()
    return result
