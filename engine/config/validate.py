"""Checks of a built ``RunConfig``: each field's choices and bounds (declared on the field), then
the rules that span fields. Every problem is a phrase that names the key and says what to fix
(``build_config`` joins them into one ``ConfigError``)."""

from __future__ import annotations

import dataclasses
from typing import cast

from leanlm.engine.config.schema import SECTION_TYPES, RunConfig, leaves, shown, suggest
from leanlm.optim.registry import REGISTRY


def _bound_problem(key: str, value: float, bounds: dict[str, float]) -> str | None:
    """The phrase for a value outside its field's bounds (``_f(..., gt=0, le=1)``), or None."""
    ge, gt, le, lt = (bounds.get(k) for k in ("ge", "gt", "le", "lt"))
    ok = (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )
    if ok:
        return None

    def fmt(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) else f"{x:g}"

    low, low_bracket = (ge, "[") if ge is not None else (gt, "(")
    high, high_bracket = (le, "]") if le is not None else (lt, ")")
    if low is not None and high is not None:
        what = f"in {low_bracket}{fmt(low)}, {fmt(high)}{high_bracket}"
    elif low is not None:
        what = f"{'>=' if ge is not None else '>'} {fmt(low)}"
    else:
        assert high is not None  # a bound failed, so one exists
        what = f"{'<=' if le is not None else '<'} {fmt(high)}"
    return f"{key}={value}: must be {what}"


def validate(cfg: RunConfig) -> list[str]:
    """Every field's choices and bounds, then the rules that span fields. Returns the problems
    (empty when valid)."""
    p: list[str] = []
    for sname in SECTION_TYPES:
        for key, f, value in leaves(getattr(cfg, sname), sname):
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                p.append(
                    f"{key}={shown(value)}: must be one of {', '.join(map(str, choices))}"
                    f"{suggest(str(value), [str(c) for c in choices])}"
                )
            problem = _bound_problem(key, value, f.metadata.get("bounds") or {})
            if problem:
                p.append(problem)
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    if m.n_heads > 0 and m.d_model % m.n_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    elif m.n_heads > 0 and m.head_dim() % 2:
        p.append(f"head dim {m.head_dim()} (model.d_model / model.n_heads) must be even for rotary embeddings")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        p.append(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads} (each key/value head "
            "serves n_heads / n_kv_heads query heads)"
        )
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        p.append(
            f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be above model.rope_low_freq_factor="
            f"{m.rope_low_freq_factor} (llama3 RoPE scaling interpolates between them)"
        )
    p += _log_and_profile_problems(cfg) + _mix_problems(cfg) + _int8_problems(cfg)
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        p.append(f"train.device={shown(t.device)}: must be auto, cpu, cuda or cuda:N")
    if not t.out_dir:
        p.append("train.out_dir is empty: name a run folder such as runs/my_run")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={shown(o.betas)}: must be two numbers in [0, 1)")
    trains_tokenizer = not d.tokenizer and not t.init_from  # else it is loaded (init_from: from that model)
    if trains_tokenizer and d.vocab_size < 300:
        p.append(f"data.vocab_size={d.vocab_size}: must be >= 300 (byte fallback needs 256 byte pieces)")
    if m.vocab_size and trains_tokenizer and m.vocab_size < d.vocab_size:
        p.append(f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size={d.vocab_size}")
    return p + _distributed_problems(cfg)


def _mix_problems(cfg: RunConfig) -> list[str]:
    """data.mix: named sources with non-negative weights, not all zero, and not streamed."""
    mix, p = cfg.data.mix, cast(list[str], [])
    if not mix:
        return ["data.mix_stages needs data.mix"] if cfg.data.mix_stages else p
    if cfg.data.source != "stdlib":
        p.append("data.mix replaces data.source: set one of them")
    names = []
    for i, item in enumerate(mix):
        if set(item) != {"name", "source", "weight"}:
            p.append(f"data.mix[{i}]={shown(item)}: give exactly name, source and weight")
            continue
        name, source, weight = item["name"], item["source"], item["weight"]
        names.append(name)
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            p.append(f"data.mix[{i}].name={shown(name)}: a short name of letters, digits, - and _")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
            p.append(f"data.mix[{i}].weight={shown(weight)}: must be a number >= 0")
        if not isinstance(source, str) or source.startswith("hf:"):
            p.append(
                f"data.mix[{i}].source={shown(source)}: mix tokenized sources (tokens:DIR, or files); "
                "tokenize a streamed hf: dataset first with `leanlm tokenize`"
            )
    if len(set(names)) != len(names):
        p.append(f"data.mix: source names must differ ({', '.join(map(str, names))})")
    p += _stage_problems(cfg.data.mix_stages, names)
    weights = [w for item in mix if isinstance(w := item.get("weight"), (int, float))]
    if len(weights) == len(mix) and not sum(weights) > 0:
        p.append("data.mix: every weight is zero; give at least one source a positive weight")
    return p


def _stage_problems(stages: list[dict], names: list[str]) -> list[str]:
    """data.mix_stages: increasing start steps, each with a weight for exactly the mix's sources."""
    p, last = [], 0
    for i, stage in enumerate(stages):
        start, weights = stage.get("start"), stage.get("weights")
        if set(stage) != {"start", "weights"} or not isinstance(start, int) or not isinstance(weights, dict):
            p.append(f"data.mix_stages[{i}]={shown(stage)}: give start (a step) and weights ({{name: weight}})")
            continue
        if start <= last:
            p.append(f"data.mix_stages[{i}].start={start}: stages start after step 0 and after the previous one")
        last = start
        if set(weights) != set(names):
            p.append(f"data.mix_stages[{i}].weights: give a weight for each of {', '.join(map(str, names))}")
        values = list(weights.values())
        numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in values)
        if not numbers or not sum(values):
            p.append(f"data.mix_stages[{i}].weights={shown(weights)}: numbers >= 0, not all zero")
    return p


def _log_and_profile_problems(cfg: RunConfig) -> list[str]:
    """Unknown trackers; a profile window outside the run."""
    p = []
    for name in cfg.log.trackers:
        if name not in ("trackio", "wandb"):
            hint = suggest(str(name), ["trackio", "wandb"])
            p.append(f"log.trackers: unknown tracker {shown(name)}; choose trackio or wandb{hint}")
    steps, total = cfg.profile.steps, cfg.train.steps
    if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]):
        p.append(f"profile.steps={shown(steps)}: give [first, last] optimizer steps with 1 <= first <= last")
    elif steps and steps[1] > total:
        p.append(f"profile.steps={shown(steps)}: the run has train.steps={total}; profile steps within it")
    return p


def _int8_problems(cfg: RunConfig) -> list[str]:
    """train.param_dtype=int8: a group that divides every projection's rows, one process."""
    m, t, backend = cfg.model, cfg.train, cfg.distributed.backend
    if t.param_dtype != "int8":
        return ["train.int8_group is set but train.param_dtype is not int8"] if t.int8_group else []
    p = []
    widths = {m.d_model, m.ffn_dim}
    if t.int8_group and any(w % t.int8_group for w in widths):
        p.append(
            f"train.int8_group={t.int8_group} must divide model.d_model={m.d_model} and model.ffn_dim={m.ffn_dim} "
            "(each group lies within a row); use 0 (one scale per row) or a common divisor such as 128"
        )
    if m.lost.enabled and (m.lost.support != "channels" or not m.activation_checkpointing):
        p.append(
            "train.param_dtype=int8 with LOST layers needs model.lost.support=channels and "
            "model.activation_checkpointing=true (LOST's kernels keep the dequantized factors for backward)"
        )
    if backend in ("ddp", "fsdp2", "deepspeed"):
        p.append(
            f"train.param_dtype=int8 runs in one process (distributed.backend={backend} cannot hold int8 weights "
            "yet); use distributed.backend=none, or train.param_dtype=bf16 to shard"
        )
    return p


def _distributed_problems(cfg: RunConfig) -> list[str]:
    """Backend x optimizer combinations that cannot work, said before any process starts."""
    dc, o = cfg.distributed, cfg.optim
    if cfg.eval.harness_tasks and dc.backend in ("fsdp2", "deepspeed"):
        return [
            f"eval.harness_tasks runs lm_eval on rank 0's whole model (backends none and ddp); under "
            f"{dc.backend} run `leanlm eval RUN --tasks ...` on the checkpoints instead"
        ]
    if o.step_in_backward and dc.backend in ("ddp", "deepspeed"):
        return [
            f"optim.step_in_backward=true runs in one process or under distributed.backend=fsdp2 "
            f"({dc.backend} reduces gradients after the per-parameter hooks would have stepped); use fsdp2 or none"
        ]
    if dc.backend != "deepspeed":
        return [f"distributed.zero_stage={dc.zero_stage} needs distributed.backend=deepspeed"] if dc.zero_stage else []
    if o.name not in REGISTRY or dc.zero_stage == 0:
        return []  # an unknown name is reported with the choices
    projection, rule = REGISTRY[o.name].rule(dataclasses.asdict(o))
    if projection is None:  # AdamW: nothing split
        return []
    if rule in ("fira", "apollo"):
        return [
            f"{rule} needs whole matrices (per-channel norms) and has no flat form under ZeRO-{dc.zero_stage}; "
            "use distributed.backend=fsdp2, distributed.zero_stage=0 or optim.state_free=sign"
        ]
    if projection not in ("columns", "randk"):
        return [
            f"optim.name={o.name} with projection {projection} has no flat form under ZeRO-"
            f"{dc.zero_stage}; use optim.projection=columns or randk, distributed.zero_stage=0, "
            "or distributed.backend=fsdp2"
        ]
    return []
