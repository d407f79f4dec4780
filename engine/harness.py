"""Downstream evaluation with lm-evaluation-harness (``lm_eval``, the optional ``leanlm[eval]``
extra) on a model in memory: ``leanlm eval RUN --tasks ...`` and ``eval.harness_tasks`` during
training.

The model goes to lm_eval as what the export writes (a transformers ``LlamaForCausalLM`` built from
the same mapping table, and the same tokenizer files), without a folder on disk. BOS: training rows
and prompts start with BOS, so loglikelihood and multiple-choice contexts get one; rolling
loglikelihood (perplexity tasks) conditions the first token on BOS itself (lm_eval's prefix token),
so there the tokenizer must not add another (else BOS is scored as a target: lm_eval #3333).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.engine.config import RunConfig
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.errors import ConfigError
from leanlm.engine.metrics import MetricsLogger
from leanlm.engine.model import LLaMA

MISSING = "lm-evaluation-harness is not installed: pip install 'leanlm[eval]' (lm_eval and transformers)"


@dataclass(kw_only=True)
class HarnessResult:
    results: dict[str, dict[str, Any]]  # lm_eval's "results": task -> {"acc,none": ..., ...}
    raw: dict[str, Any]  # everything JSON-safe lm_eval returned (configs, versions, n-samples, ...)

    def scalars(self) -> dict[str, float]:
        """``harness/<task>/<metric>`` for each numeric score (stderr left out)."""
        out = {}
        for task, metrics in self.results.items():
            for key, value in metrics.items():
                metric = key.split(",")[0]
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and "stderr" not in metric and metric != "sample_len":
                    out[f"harness/{task}/{metric}"] = float(value)
        return out

    def table(self) -> str:
        rows = [(tag.split("/", 1)[1].rsplit("/", 1)[0], tag.rsplit("/", 1)[1], v) for tag, v in self.scalars().items()]
        width = max([len(t) for t, _, _ in rows] + [4])
        lines = [f"{'task':<{width}}  {'metric':<16}  value"]
        lines += [f"{t:<{width}}  {m:<16}  {v:.4f}" for t, m, v in rows]
        return "\n".join(lines)


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None


def to_transformers(model: LLaMA, cfg: RunConfig, tok: Tokenizer, folder: Path, *, add_bos: bool):
    """(transformers LlamaForCausalLM in float32 with our weights, its tokenizer). ``model`` is
    left as it is (a training run goes on with it). ``folder`` holds the tokenizer files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from leanlm.engine.hf.export import lost_options
    from leanlm.engine.hf.mapping import Special, hf_config
    from leanlm.engine.hf.tokenizer_files import tokenizer_files
    from leanlm.engine.hf.weights import to_hf
    from leanlm.optim.lost import convert

    hf_logging.disable_progress_bar()
    special = Special(bos=tok.bos_id if tok.bos_id >= 0 else None, eos=tok.eos_id if tok.eos_id >= 0 else None)
    options = lost_options(model, cfg)
    config = hf_config(
        cfg.model, vocab_size=model.vocab_size, seq_len=cfg.train.seq_len, dtype="float32", special=special
    )
    hf = LlamaForCausalLM(LlamaConfig(**config)).float()
    if options is not None:  # same layers as ours, filled below
        options = dict(options, init="random", select="random", values_init="w0_cols")
        rank, density, targets = options.pop("rank"), options.pop("channel_density"), tuple(options.pop("targets"))
        convert(hf, rank, density, targets=targets, **options)
    state = dict(to_hf(name, t.detach().float(), cfg.model) for name, t in dense_state(model).items())
    hf.load_state_dict(state, strict=True)
    if cfg.model.tie_embeddings:
        hf.tie_weights()
    files = tokenizer_files(tok, seq_len=cfg.train.seq_len)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    hf_tok = AutoTokenizer.from_pretrained(folder, add_bos_token=add_bos)
    return hf.eval(), hf_tok


def dense_state(model: LLaMA) -> dict[str, torch.Tensor]:
    """The state dict, with LOST layers of a dense equivalent (φ identity) given as their weight."""
    from leanlm.optim.lost import LOSTLinear

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, LOSTLinear) and module.phi == "identity":
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]
            state[f"{name}.weight"] = module.weight.detach()
    return state


def _output_types(tasks: list[str], manager) -> dict[str, str]:
    from lm_eval.tasks import get_task_dict

    types: dict[str, str] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, getattr(key, "group_name", None) or str(key))
        elif node is not None:
            types[name] = getattr(node, "OUTPUT_TYPE", None) or node.config.output_type

    for task in tasks:
        sub = get_task_dict([task], manager)
        kinds: dict[str, str] = {}
        for key, child in sub.items():
            before = dict(types)
            walk(child, str(key))
            kinds.update({k: v for k, v in types.items() if k not in before})
        types[task] = (
            "loglikelihood_rolling" if kinds and all(v == "loglikelihood_rolling" for v in kinds.values()) else "other"
        )
    return {t: types[t] for t in tasks}


def run_harness(
    model: LLaMA,
    cfg: RunConfig,
    tok: Tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> HarnessResult:
    """lm_eval ``simple_evaluate`` on ``model`` (rank 0 only: lm_eval is single-process)."""
    require_lm_eval()
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such folder of task YAML files")
    if include_path:  # local tasks: datasets must not try the Hub for them
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=not include_path) if include_path else None
    if manager is not None and any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)  # a built-in task beside the local ones
    manager = manager or TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"lm_eval has no task {unknown[0]!r}; give --include-path with its YAML, or see lm_eval --tasks list"
        )
    kinds = _output_types(tasks, manager)
    groups = {
        False: [t for t in tasks if kinds[t] == "loglikelihood_rolling"],  # lm_eval puts BOS in front itself
        True: [t for t in tasks if kinds[t] != "loglikelihood_rolling"],
    }
    was_training = model.training
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            for add_bos, names in groups.items():
                if not names:
                    continue
                hf, hf_tok = to_transformers(model, cfg, tok, Path(folder), add_bos=add_bos)
                lm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=batch_size, max_length=cfg.train.seq_len)
                out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False)
                results.update(out["results"])
                raw = _merge(raw, json.loads(json.dumps(out, default=str)))
                del hf, lm
    finally:
        model.train(was_training)
    return HarnessResult(results=results, raw=raw)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_harness(
    run_dir: Path, step: int, result: HarnessResult, *, tensorboard: bool = True, logger: MetricsLogger | None = None
) -> Path:
    """``<run>/eval/harness-step-XXXXXXXX.json`` plus the scores in metrics.jsonl and TensorBoard
    (through ``logger``, a training run's own, or one opened here for appending)."""
    from leanlm.engine.run_files import write_no_follow

    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    path = folder / f"harness-step-{step:08d}.json"
    write_no_follow(path, (json.dumps({"step": step, **result.raw}, indent=1) + "\n").encode())
    own = logger is None
    logger = logger or MetricsLogger(run_dir, True, tensorboard)
    try:
        logger.log(step, result.scalars())
    finally:
        if own:
            logger.close()
    return path


def harness_in_training(model: LLaMA, cfg: RunConfig, tok: Tokenizer, *, step: int, logger: MetricsLogger) -> None:
    """``eval.harness_tasks`` after ``step``, on the main rank (the others wait at the barrier).
    lm_eval seeds Python's, numpy's and torch's global generators: their states are put back after,
    so the run continues (and resumes) exactly as without it."""
    from leanlm.engine import distributed as dist

    if dist.is_main():
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            e = cfg.eval
            result = run_harness(
                model,
                cfg,
                tok,
                e.harness_tasks,
                include_path=e.harness_include_path or None,
                limit=e.harness_limit or None,
                batch_size=e.batch_size,
            )
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        save_harness(Path(cfg.train.out_dir), step, result, logger=logger)
        print(
            f"step {step}: " + ", ".join(f"{k.removeprefix('harness/')} {v:.4f}" for k, v in result.scalars().items())
        )
    dist.barrier()
