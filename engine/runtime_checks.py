"""Checks of a valid config against the world it runs in: the process count (known once the
process group exists) and the installed torch. Config validation (``leanlm.engine.config``) stays
a pure function of the config and never imports torch; these run at the start of a run."""

from __future__ import annotations

import torch

from leanlm.engine.config import RunConfig
from leanlm.engine.errors import ConfigError
from leanlm.optim.in_backward import fsdp2_calls_hooks


def check_world(cfg: RunConfig, world_size: int) -> None:
    """Raise one ``ConfigError`` naming the fix when ``cfg`` cannot run on ``world_size``
    processes with this torch."""
    t, o, backend = cfg.train, cfg.optim, cfg.distributed.backend
    if o.step_in_backward and world_size > 1 and backend != "fsdp2":
        raise ConfigError(
            f"optim.step_in_backward=true runs in one process or under distributed.backend=fsdp2, but "
            f"{world_size} processes run with distributed.backend={backend}; set "
            "distributed.backend=fsdp2 or optim.step_in_backward=false"
        )
    if o.step_in_backward and backend == "fsdp2" and not fsdp2_calls_hooks():
        raise ConfigError(
            f"optim.step_in_backward=true under fsdp2 needs torch >= 2.5 (this torch {torch.__version__} "
            "does not run hooks after FSDP2's reduce-scatter); upgrade torch or use distributed.backend=none"
        )
    micro = t.micro_batch(world_size)
    if micro == 0 or t.batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size ({micro}) x "
            f"world size ({world_size}); adjust train.batch_size or train.micro_batch_size"
        )
