"""leanlm.engine.checkpoint: what a run saves, how it is written and how it is loaded back.

    store         one folder per step: atomic writes, sha256 manifest, verify, resume lookup, pruning
    safe_load     loading without running code (allowlisted torch.load and DCP metadata)
    sharded       FSDP2 (DCP) and DeepSpeed checkpoint contents
    resume        what a resume may change (``FIXED_KEYS``) and restoring weights + optimizer state
    checkpointer  the train state and the checkpointer the training loop uses

The folder-level API (``save_checkpoint``, ``verify``, ``resolve_resume``, ...) is re-exported here.
"""

from leanlm.engine.checkpoint.store import (
    FORMAT_VERSION,
    check_writable,
    checkpoint_dir,
    list_checkpoints,
    load_file,
    load_model_state,
    prune,
    remove_stale_temps,
    resolve_resume,
    save_checkpoint,
    step_name,
    verify,
)

__all__ = [
    "FORMAT_VERSION",
    "check_writable",
    "checkpoint_dir",
    "list_checkpoints",
    "load_file",
    "load_model_state",
    "prune",
    "remove_stale_temps",
    "resolve_resume",
    "save_checkpoint",
    "step_name",
    "verify",
]
