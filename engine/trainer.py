"""The training loop: when things happen (eval, checkpoints, logging); the math is in ``step``.

``train(cfg)`` takes the run folder, builds (``setup``): process group, data (tokenizer + packed
stream + held-out set), model, optimizer and schedule, resume state, logging; then runs ``_loop``.
SIGTERM/SIGINT finish the current step, save a checkpoint and return; a NaN/Inf loss or gradient
norm stops the run before its update with an error naming the last checkpoint known to be good.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from leanlm.engine import checkpoint as ckpt
from leanlm.engine import distributed as dist
from leanlm.engine.build import build_model, in_backward_for, parallelize, pick_device
from leanlm.engine.checkpoint.checkpointer import Checkpointer, TrainState, find_resume
from leanlm.engine.checkpoint.resume import preload_weights
from leanlm.engine.config import RunConfig, save_yaml
from leanlm.engine.data import Corpus, build_corpus
from leanlm.engine.errors import CheckpointError, ConfigError, TrainingError
from leanlm.engine.evaluate import EvalResult, evaluate, unigram_loss
from leanlm.engine.harness import harness_in_training
from leanlm.engine.hf.init import build_initialised
from leanlm.engine.hf.init import resolve as resolve_init
from leanlm.engine.metrics import MetricsLogger, Throughput, peak_flops, peak_memory_gib, trim_records
from leanlm.engine.model import LLaMA, count_parameters, flops_per_token
from leanlm.engine.profiling import StepProfiler
from leanlm.engine.run_lock import RunLock
from leanlm.engine.runtime_checks import check_world
from leanlm.engine.scaling import ScalingRecorder, recorder_for
from leanlm.engine.schedule import build_scheduler, schedule_phase
from leanlm.engine.step import StepResult, StepSpec, train_step
from leanlm.engine.trackers import check_installed, open_trackers


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class Run:
    """Everything the loop works with, built once by ``setup``."""

    cfg: RunConfig
    net: torch.nn.Module  # what the loop calls (the model, DDP, FSDP2 or a DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    spec: StepSpec  # what every step shares: device, autocast, clipping, loss chunking, in-backward hooks
    corpus: Corpus
    state: TrainState
    checkpointer: Checkpointer
    logger: MetricsLogger
    recorder: ScalingRecorder | None
    flops_per_token: float
    unigram_ppl: float


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

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
        run = setup(cfg, device, backend)
        try:
            return _loop(run, stop_at)
        finally:
            run.logger.close()
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
            ckpt.check_writable(lock.run_dir)  # said now, not after checkpoint.every steps of work
        except (ConfigError, CheckpointError) as e:
            error = e
    if dist.any_rank(error is not None):
        raise error or ConfigError(f"rank 0 could not take the run folder {lock.run_dir}")
    if dist.is_main():
        for stale in ckpt.remove_stale_temps(lock.run_dir):
            print(f"leanlm: removed {stale.name}, left by a save that did not finish")


def _nan_message(res: Any, step: int, good: Path | None, latest: Path | None, *, in_backward: bool = False) -> str:
    """The NaN stop's one line. ``good``: the newest checkpoint whose weights then trained a
    finite step (resuming it with a lower lr works); ``latest`` may be the one that blew up."""
    what = f"loss became {res.loss}" if not math.isfinite(res.loss) else f"gradient norm became {res.grad_norm}"
    if in_backward:  # the tensors updated in that backward before the bad one keep their update
        what += f" at step {step} (tensors stepped before it in that backward were updated; none of it was saved)"
    else:
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


def setup(cfg: RunConfig, device: torch.device, backend: str) -> Run:
    """Build the run: data, model, optimizer, schedule, resume state, logs."""
    check_installed(cfg.log.trackers)  # a missing extra is said before any work
    cfg, init = resolve_init(cfg)  # train.init_from: the model's shape (and tokenizer) from there
    train_cfg, main, run_dir = cfg.train, dist.is_main(), Path(cfg.train.out_dir)
    check_world(cfg, dist.world_size())
    resume_from = find_resume(cfg)
    _check_steps_left(cfg, resume_from)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)

    init = init if resume_from is None else None  # a resume takes every weight from its checkpoint
    corpus = build_corpus(cfg, resume_from or (init.tokenizer if init else None))
    if init is not None:
        model = build_initialised(cfg, init, corpus.tokenizer.vocab_size, device)
        if main:
            print(f"leanlm: weights from {init.path} ({init.kind}); step 0, a fresh optimizer")
    else:
        model = build_model(cfg, corpus.tokenizer.vocab_size, device, restoring=resume_from is not None)
    model.set_document_boundary(corpus.tokenizer.bos_id, corpus.tokenizer.eos_id)  # model.doc_masking
    preloaded = resume_from is not None and preload_weights(resume_from, model, backend, device)
    n_params, n_body = count_parameters(model), count_parameters(model, True)  # before sharding
    net, optimizer, autocast = parallelize(cfg, model, backend, device)
    state = TrainState(build_scheduler(optimizer, cfg.optim, train_cfg.steps), corpus.train, device)
    checkpointer = Checkpointer(
        cfg=cfg, backend=backend, model=model, net=net, optimizer=optimizer, tokenizer_files=corpus.tokenizer.files
    )
    if resume_from is not None:
        checkpointer.restore(resume_from, state, device, weights_loaded=preloaded)
    if main:
        save_yaml(cfg, run_dir / "config.yaml")  # what this run actually uses
        corpus.tokenizer.save_to(run_dir)
    if train_cfg.compile and dist.is_deepspeed(net):
        if main:
            print("leanlm: train.compile is ignored under DeepSpeed (its engine wraps the module)")
    elif train_cfg.compile:
        net = cast(torch.nn.Module, torch.compile(net))
    # Records past the restart step (all of them on a fresh start) belong to an attempt that
    # crashed before saving them: dropped, so the logs read as one uninterrupted run.
    trackers = open_trackers(cfg, run_dir, state.trackers) if main else []
    state.trackers = {t.name: t.run_id for t in trackers}  # saved with each checkpoint: a resume continues them
    logger = MetricsLogger(run_dir, main, cfg.log.tensorboard, resume_step=state.step, trackers=trackers)
    fpt = flops_per_token(cfg.model, model.vocab_size, train_cfg.seq_len)
    recorder = None
    if main and cfg.log.scaling:
        trim_records(run_dir / "scaling.jsonl", state.step)
        recorder = recorder_for(
            cfg,
            run_dir,
            num_params=n_params,
            non_embedding_params=n_body,
            flops_per_token=fpt,
            train_sequences=getattr(corpus.train, "n", None),
        )
    if main:
        t, world = train_cfg, dist.world_size()
        print(
            f"leanlm: {n_params / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), vocab {model.vocab_size}, "
            f"{t.tokens_per_step():,} tokens/step x {t.steps} steps = {t.tokens_per_step() * t.steps:,} tokens, "
            f"grad accum {t.grad_accum_steps(world)} x world {world} ({backend}), device {device}\n"
            f"leanlm: data {corpus.description}\n"
            f"leanlm: run folder {run_dir}"
            + (f", resuming from {resume_from} (step {state.step})" if resume_from else "")
        )
    spec = StepSpec(
        device=device,
        autocast=autocast,
        grad_clip=train_cfg.grad_clip,
        chunk_tokens=train_cfg.loss_chunk_tokens,
        in_backward=in_backward_for(cfg, optimizer),
    )
    return Run(
        cfg=cfg,
        net=net,
        optimizer=optimizer,
        spec=spec,
        corpus=corpus,
        state=state,
        checkpointer=checkpointer,
        logger=logger,
        recorder=recorder,
        flops_per_token=fpt,
        unigram_ppl=math.exp(unigram_loss(corpus.train_counts, corpus.val_tokens, train_cfg.seq_len)),
    )


def _check_steps_left(cfg: RunConfig, resume_from: Path | None) -> None:
    """A resume asked to stop before the step it resumes from is refused, before config.yaml is
    rewritten with the smaller ``train.steps``."""
    match = ckpt.store.STEP_RE.match(resume_from.name) if resume_from is not None else None
    if match and int(match.group(1)) > cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} is below the step of the checkpoint it resumes from "
            f"({resume_from}); raise train.steps to train on, or pick a new train.out_dir"
        )


def _loop(run: Run, stop_at: int | None) -> TrainResult:
    """Step until ``train.steps``, a stop signal or ``stop_at``; evaluate, log and save on cadence."""
    cfg, state, train_cfg = run.cfg, run.state, run.cfg.train
    result = TrainResult(
        run_dir=Path(train_cfg.out_dir), step=state.step, tokens_seen=state.tokens_seen, unigram_ppl=run.unigram_ppl
    )
    started, meter = time.perf_counter(), Throughput()
    show = dist.is_main() and cfg.log.progress
    bar = tqdm(total=train_cfg.steps, initial=state.step, disable=not show, dynamic_ncols=True, unit="step")
    run.net.train()
    profiler = StepProfiler(cfg.profile.steps, result.run_dir, run.spec.device)
    with bar, StopFlag() as stop:
        while state.step < train_cfg.steps:
            # forward, backward, clip, update: the step's math lives in engine.step
            profiler.before(state.step + 1)
            batches = run.corpus.train.next_step()
            res = train_step(run.net, run.optimizer, batches, run.spec, reweight=_reweighting(cfg, state.step))
            # a NaN/Inf step was not applied: stop, pointing at weights known to train
            if not res.finite:
                good, last = run.checkpointer.good, run.checkpointer.last
                in_backward = run.spec.in_backward is not None
                raise TrainingError(_nan_message(res, state.step + 1, good, last, in_backward=in_backward))
            run.checkpointer.confirm()
            lr = float(state.scheduler.get_last_lr()[0])
            state.advance(res.tokens * dist.world_size())
            profiler.after(state.step)
            meter.add(res.tokens * dist.world_size())
            loss = dist.all_reduce_mean(res.loss, run.spec.device)
            result.losses.append(loss)
            # logging
            if state.step % cfg.log.every == 0 or state.step == train_cfg.steps:
                _log_step(run, res, loss=loss, lr=lr, tokens_per_s=meter.rate())
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{meter.rate():,.0f}")
                meter.reset()
            bar.update(1)
            stopping = dist.any_rank(stop.signal is not None) or state.step == stop_at
            with meter.paused():  # evaluation and checkpoint time stays out of tokens/s
                if cfg.eval.is_eval_step(state.step) and state.step != train_cfg.steps:
                    val = _evaluate(run, result, started)
                    if dist.is_main():
                        bar.write(f"step {state.step}: val loss {val.loss:.4f}, ppl {val.ppl:.2f}")
                if cfg.eval.is_harness_step(state.step, train_cfg.steps):
                    harness_in_training(
                        cast(LLaMA, run.checkpointer.model),
                        cfg,
                        run.corpus.tokenizer,
                        step=state.step,
                        logger=run.logger,
                    )
                if run.checkpointer.due(state.step, stopping):
                    run.checkpointer.save(state)
            # termination
            if dist.fault_injection_due(state.step):
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                result.interrupted = stop.signal is not None
                break
    result.wall_s = time.perf_counter() - started
    result.tokens_per_s = (state.tokens_seen - result.tokens_seen) / max(result.wall_s, 1e-9)
    if state.step == train_cfg.steps and state.step > result.step:  # a run resumed at its end trains
        result.final = _evaluate(run, result, started)  # nothing and logs no second final evaluation
    elif state.step == train_cfg.steps and dist.is_main():
        print(f"leanlm: {train_cfg.out_dir} is already at train.steps={train_cfg.steps}; nothing left to train")
    result.step, result.tokens_seen, result.checkpoint = state.step, state.tokens_seen, run.checkpointer.last
    dist.barrier()
    return result


def _reweighting(cfg: RunConfig, step: int) -> tuple[str, float] | None:
    """(strategy, r) once reweighting is on and past its warmup; None for the plain mean."""
    rw = cfg.train.reweight
    return (rw.strategy, rw.r) if rw.strategy != "uniform" and step >= rw.warmup_steps else None


def _log_step(run: Run, res: StepResult, *, loss: float, lr: float, tokens_per_s: float) -> None:
    scalars = {
        "train/loss": loss,
        "train/grad_norm": res.grad_norm,
        "optim/lr": lr,
        "perf/tokens_per_s": tokens_per_s,
        "mem/peak_gib": peak_memory_gib(run.spec.device),
    }
    peak = peak_flops(run.spec.device)
    if peak:
        scalars["perf/mfu"] = run.flops_per_token * tokens_per_s / (peak * dist.world_size())
    if res.reweight is not None:
        scalars.update(res.reweight.scalars())
    scalars.update(_per_source(run, res))
    run.logger.log(run.state.step, scalars, tokens_seen=run.state.tokens_seen)


def _per_source(run: Run, res: StepResult) -> dict[str, float]:
    """data.mix: this step's training loss of each source (all ranks' rows) and its epochs so far."""
    stream = run.corpus.train
    sources = getattr(stream, "last_sources", None)
    if not sources or res.row_losses is None:
        return {}
    device = run.spec.device
    rows = dist.all_gather(res.row_losses.to(device))
    ids = dist.all_gather(torch.cat(sources).to(device))
    out: dict[str, float] = {}
    for s, name in enumerate(stream.names):  # type: ignore[attr-defined]
        mine = rows[ids == s]
        if mine.numel():
            out[f"train/{name}/loss"] = float(mine.mean())
    out.update({f"data/{name}/epochs": e for name, e in stream.epochs().items()})  # type: ignore[attr-defined]
    return out


def _evaluate(run: Run, result: TrainResult, started: float) -> EvalResult:
    """Held-out loss now: logged, and a row in scaling.jsonl."""
    cfg, state = run.cfg, run.state

    def held_out(tokens) -> EvalResult:
        return evaluate(
            run.net,
            tokens,
            seq_len=cfg.train.seq_len,
            batch_size=cfg.eval.batch_size,
            device=run.spec.device,
            autocast=run.spec.autocast,
            chunk_tokens=cfg.train.loss_chunk_tokens,
        )

    scalars: dict[str, float] = {}
    if run.corpus.val_by_source:  # data.mix: each source's own held-out set; overall = weighted by the mix
        parts = {name: held_out(tokens) for name, tokens in run.corpus.val_by_source.items()}
        for name, part in parts.items():
            scalars.update({f"val/{name}/loss": part.loss, f"val/{name}/ppl": part.ppl})
        loss = sum(run.corpus.source_weights[n] * p.loss for n, p in parts.items())
        res = EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=sum(p.tokens for p in parts.values()))
    else:
        res = held_out(run.corpus.val_tokens)
    scalars.update({"val/loss": res.loss, "val/ppl": res.ppl})
    run.logger.log(state.step, scalars, tokens_seen=state.tokens_seen)
    if run.recorder is not None:
        elapsed = time.perf_counter() - started
        run.recorder.record(
            step=state.step,
            tokens_seen=state.tokens_seen,
            val_loss=res.loss,
            train_loss=result.losses[-1] if result.losses else None,
            lr=float(state.scheduler.get_last_lr()[0]),
            wall_s=elapsed,
            tokens_per_s=(state.tokens_seen - result.tokens_seen) / max(elapsed, 1e-9),
            checkpoint=str(run.checkpointer.last or ""),
            phase=schedule_phase(state.step, cfg.train.steps, cfg.optim),
        )
    return res
