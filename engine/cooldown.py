"""Cooldown branches of a warmup-stable-decay run: ``leanlm cooldown RUN --at STEP --steps N``.

A checkpoint taken in a WSD run's constant phase continues, in a run folder of its own, with the
weights, optimizer state, data position and RNG of that checkpoint and a decay of N steps: the run
``RUN`` would have been had it been ``STEP + N`` steps long with its decay at STEP. One WSD run
plus k cooldowns gives k compute-optimal (N, D) points for about the compute of the longest run
plus the decays (Hägele et al. 2024), where k cosine runs cost the sum of their lengths.
"""

from __future__ import annotations

from pathlib import Path

from leanlm.engine.checkpoint import checkpoint_dir, list_checkpoints, step_name
from leanlm.engine.config import RunConfig, build_config, merge, parse_overrides, read_yaml
from leanlm.engine.errors import ConfigError
from leanlm.engine.schedule import decay_start


def cooldown_config(run: str | Path, *, at: int, steps: int, out: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config of the cooldown of ``run`` from its checkpoint at step ``at`` for ``steps`` steps."""
    from leanlm.engine.checkpoint import verify

    run = Path(run)
    ckpt = checkpoint_dir(run) / step_name(at)
    if not (ckpt / "manifest.json").is_file():
        kept = sorted(p.name for p in checkpoint_dir(run).glob("step-*")) if checkpoint_dir(run).is_dir() else []
        raise ConfigError(
            f"{run} has no checkpoint at step {at} (kept: {', '.join(kept) or 'none'}); save the constant "
            "phase with checkpoint.every and checkpoint.keep=0, or pick a kept step"
        )
    verify(ckpt)
    base = read_yaml(ckpt / "config.yaml")
    saved = build_config(base)
    o = saved.optim
    if o.schedule not in ("wsd", "constant"):
        raise ConfigError(f"{run} uses optim.schedule={o.schedule}; cooldowns branch from wsd or constant runs")
    start = decay_start(saved.train.steps, o.decay_fraction, o.decay_steps) if o.schedule == "wsd" else at
    if at < o.warmup_steps or at > start:
        raise ConfigError(
            f"step {at} of {run} is not in its constant phase (steps {o.warmup_steps}..{start}); pick a step there"
        )
    out = Path(out) if out else run.parent / f"{run.name}-cooldown-{at}+{steps}"
    # the same command again continues an interrupted cooldown from its own newest checkpoint
    resume = "auto" if list_checkpoints(out) else str(ckpt)
    fixed = {
        "train": {"steps": at + steps, "resume": resume, "out_dir": str(out)},
        "optim": {"schedule": "wsd", "decay_steps": steps},
    }
    over = parse_overrides(overrides)
    clash = [f"{s}.{k}" for s, keys in fixed.items() for k in keys if k in over.get(s, {})]
    if clash:
        raise ConfigError(f"{clash[0]} is set by the cooldown itself; use --at, --steps and --out")
    return build_config(merge(merge(base, over), fixed))
