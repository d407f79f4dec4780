"""``leanlm export``: a run or checkpoint -> a Hugging Face ``LlamaForCausalLM`` folder that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load with no custom code.

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards + index),
``tokenizer.json`` and ``tokenizer_config.json`` into a temporary sibling folder, validates what it
wrote, then renames it into place: a failure (a full disk included) never leaves a folder that
loads. Needs no transformers; when transformers is installed and the model is small enough to hold
twice, validation also runs the written folder in transformers and compares logits.

LOST runs: layers with a dense equivalent (φ identity) are folded into plain linears (exact); any
other LOST model is written with its options in ``config.json`` (``leanlm_lost``), restored by
``leanlm.optim.lost.from_pretrained(LlamaForCausalLM, folder)``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.hf.files import MAX_SHARD_BYTES, iter_tensors, write_json, write_tensors
from leanlm.engine.hf.mapping import Special, hf_config
from leanlm.engine.hf.tokenizer_files import tokenizer_files
from leanlm.engine.hf.weights import exported_tensors, from_hf, to_hf
from leanlm.engine.host import drop_mapped_pages, file_mappings
from leanlm.engine.model import LLaMA, count_parameters
from leanlm.optim.quantized import dequantize_linears

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
# Logits of the written folder in transformers vs the engine's, both in float32 on the exported
# weights (OLMo-core's validation tolerance).
LOGITS_ATOL = 1e-4
# transformers' check holds the model twice more in float32 (its copy and ours): only below this.
HF_CHECK_MAX_PARAMS = 600_000_000


@dataclass(kw_only=True)
class ExportReport:
    out_dir: Path
    checkpoint: Path
    kind: str  # "llama" (plain LlamaForCausalLM; LOST folded when it could be) or "lost"
    dtype: str
    files: list[str]
    parameters: int
    folded: int  # LOST layers (φ identity) folded into plain linears
    max_logit_diff: float | None  # transformers vs leanlm in float32; None when not checked
    unchecked: str  # why not, when not
    seconds: float

    def summary(self) -> str:
        folded = f" ({self.folded} LOST layers folded into it exactly)" if self.folded else ""
        what = (
            f"a plain LlamaForCausalLM{folded}"
            if self.kind == "llama"
            else "a LOST model (load it with leanlm.optim.lost.from_pretrained(LlamaForCausalLM, folder))"
        )
        check = (
            f"transformers' logits within {self.max_logit_diff:.2e} of leanlm's"
            if self.max_logit_diff is not None
            else f"tensors re-read bitwise ({self.unchecked})"
        )
        return (
            f"wrote {self.out_dir}: {what}, {self.parameters / 1e6:.2f}M parameters in {self.dtype}, "
            f"{len(self.files)} files from {self.checkpoint}; validated: {check} ({self.seconds:.1f}s)"
        )


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export target {out} exists and is not an empty folder; name a new folder")
    if not out.parent.is_dir():
        raise ConfigError(f"export target {out}: folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"export target {out}: folder {out.parent} is not writable")


def _lost_layers(model: LLaMA) -> list:
    from leanlm.optim.lost import LOSTLinear

    return [m for m in model.modules() if isinstance(m, LOSTLinear)]


def _prepare(model: LLaMA, cfg) -> tuple[str, dict | None, int]:
    """Fold LOST layers that have a dense equivalent; ('lost', options) for those that do not."""
    from leanlm.optim.lost import unconvert

    options = lost_options(model, cfg)
    if options is None:
        return "llama", None, unconvert(model)
    return "lost", options, 0


def lost_options(model: LLaMA, cfg) -> dict | None:
    """The options ``leanlm.optim.lost.from_pretrained`` rebuilds the model's LOST layers with
    (config.json's ``leanlm_lost``); None when there are none without a dense equivalent."""
    from leanlm.engine.build import lost_layer_options
    from leanlm.optim.lost import LLAMA_TARGETS

    layers = _lost_layers(model)
    if all(m.phi == "identity" for m in layers):
        return None
    if any(m.support != "channels" for m in layers):
        raise ConfigError(
            "a LOST model with model.lost.support=unstructured cannot be exported (its flat index spans the "
            "rotated q/k rows); only channel-sparse LOST models export"
        )
    lc = cfg.model.lost
    return {
        "rank": lc.rank_for(cfg.model.d_model),
        "channel_density": lc.channel_density,
        "targets": list(LLAMA_TARGETS),
        **lost_layer_options(cfg),
    }


def export_hf(
    source: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    check_in_transformers: bool = True,
) -> ExportReport:
    """Export the checkpoint (or a run's newest) ``source`` to the new folder ``out_dir``.

    ``dtype``: fp32 or bf16; default the run's ``train.param_dtype`` (bf16 for int8 weights,
    dequantized). Every checkpoint format loads
    (model.pt, FSDP2's dcp/, DeepSpeed ZeRO 0-3), on one process. Raises ConfigError /
    CheckpointError with one line on bad input; nothing is left at ``out_dir`` on failure."""
    from leanlm.engine.trained import load_trained

    start = time.perf_counter()
    out = Path(out_dir)
    _check_target(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose fp32 or bf16")
    trained = load_trained(source, device="cpu", mapped=True)
    cfg, model, tok = trained.cfg, trained.model, trained.tokenizer
    # int8 weights leave as bf16 (their dequantized values; fp32 with --dtype fp32)
    target = DTYPES[dtype or ("bf16" if cfg.train.param_dtype == "int8" else cfg.train.param_dtype)]
    dequantize_linears(model, target)
    kind, lost, folded = _prepare(model, cfg)
    special = Special(bos=tok.bos_id if tok.bos_id >= 0 else None, eos=tok.eos_id if tok.eos_id >= 0 else None)
    config = hf_config(
        cfg.model,
        vocab_size=model.vocab_size,
        seq_len=cfg.train.seq_len,
        dtype=DTYPE_NAMES[target],
        special=special,
        lost=lost,
    )
    tok_files = tokenizer_files(tok, seq_len=cfg.train.seq_len)  # refuses before anything is written
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_json(tmp / "config.json", config)
        generation = {"bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": None}
        write_json(tmp / "generation_config.json", generation)
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
        state = model.state_dict()
        tensors = (to_hf(name, _cast(state[name], target), cfg.model) for name in exported_tensors(model, cfg.model))
        # a model.pt checkpoint stays mapped: each shard's pages of it leave the process once written
        mappings = file_mappings(trained.path)
        files = write_tensors(tmp, tensors, max_shard_bytes, written=functools.partial(_drop_all, mappings=mappings))
        _check_round_trip(tmp, model, cfg.model, target)
        diff, skipped = None, "install transformers for the logits check"
        if check_in_transformers and count_parameters(model) > HF_CHECK_MAX_PARAMS:
            skipped = f"the transformers logits check runs up to {HF_CHECK_MAX_PARAMS / 1e6:.0f}M parameters"
        elif check_in_transformers:
            diff = _check_logits(tmp, model, target, kind)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"export to {out} failed ({e.strerror or e}); nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = sorted([*files, "config.json", "generation_config.json", *tok_files])
    return ExportReport(
        out_dir=out,
        checkpoint=trained.path,
        kind=kind,
        dtype=DTYPE_NAMES[target],
        files=names,
        parameters=count_parameters(model),
        folded=folded,
        max_logit_diff=diff,
        unchecked=skipped if diff is None else "",
        seconds=time.perf_counter() - start,
    )


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight in the export dtype; integer tensors (LOST's channel index) as they are: a bf16 index
    above 256 would name the wrong channel."""
    return t.to(dtype) if t.is_floating_point() else t


def _drop_all(tensors: list[torch.Tensor], *, mappings: list[tuple[int, int]] | None) -> None:
    for t in tensors:
        drop_mapped_pages(t, mappings)


def _check_round_trip(folder: Path, model: LLaMA, m, dtype: torch.dtype) -> None:
    """Every written tensor, read back and mapped to our layout, equals the source bitwise."""
    state = model.state_dict()
    seen = set()
    for hf_name, t in iter_tensors(folder):
        mapped = from_hf(hf_name, t, m)
        if mapped is None:
            continue
        name, ours = mapped
        if not torch.equal(ours, _cast(state[name], dtype)):
            raise CheckpointError(f"export validation failed: {hf_name} does not read back as {name}")
        seen.add(name)
    missing = set(exported_tensors(model, m)) - seen
    if missing:
        raise CheckpointError(f"export validation failed: {sorted(missing)[:3]} not written")


@torch.no_grad()
def _check_logits(folder: Path, model: LLaMA, dtype: torch.dtype, kind: str) -> float | None:
    """max |logits| difference, transformers (the written folder) vs leanlm, float32 compute on the
    exported weights; raises above ``LOGITS_ATOL``. None when transformers is not installed."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    from transformers.utils import logging as hf_logging

    from leanlm.optim.lost import from_pretrained

    hf_logging.disable_progress_bar()  # "Loading weights" bars on a tool's output
    # the folder's dtype (bf16 or fp32), then float32: the same rounded weights as ours below
    theirs = from_pretrained(LlamaForCausalLM, folder) if kind == "lost" else LlamaForCausalLM.from_pretrained(folder)
    theirs = theirs.float().eval()
    ours = _float_copy(model, dtype)
    gen = torch.Generator().manual_seed(0)
    T = min(64, model.max_seq_len)
    tokens = torch.randint(0, model.vocab_size, (2, T), generator=gen)
    diff = (theirs(tokens).logits.float() - ours(tokens).float()).abs().max().item()
    if not diff <= LOGITS_ATOL:
        raise CheckpointError(
            f"export validation failed: transformers' logits differ from leanlm's by {diff:.3g} (tolerance "
            f"{LOGITS_ATOL}); nothing was written"
        )
    return diff


def _float_copy(model: LLaMA, dtype: torch.dtype) -> LLaMA:
    """Our model with the exported (rounded) weights, computing in float32."""
    twin = copy.deepcopy(model)
    twin.cfg = dataclasses.replace(model.cfg, activation_checkpointing=False)
    twin.load_state_dict(
        {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    twin.rope_cos, twin.rope_sin = torch.empty(0), torch.empty(0)  # rebuilt in float32 at the first forward
    return twin.float().eval()
