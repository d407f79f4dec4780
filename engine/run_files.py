"""Writing at the top of a run folder without following symbolic links.

A run folder may be shared (a team's runs/, a /tmp out_dir): a ``.lock`` or ``config.yaml``
planted there as a symlink would make ``leanlm train`` truncate and overwrite whatever file it
points to, with the trainer's permissions. So every file the engine writes at the top of a run
folder is opened with ``O_NOFOLLOW`` (the kernel refuses a link, race-free), and the folders it
writes into (``tb/``, ``checkpoints/``) are refused when they are links, before anything runs.
The link and its target are left untouched; the error says to remove the link.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TextIO

from leanlm.engine.errors import ConfigError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

# What the engine writes at the top of a run folder (the lock, the run's own files, the log folders).
RUN_FILES = (
    ".lock",
    "config.yaml",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "metrics.jsonl",
    "scaling.jsonl",
)
RUN_FOLDERS = ("tb", "checkpoints", "profile", "eval", "wandb")


def _refuse(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is a symbolic link; leanlm writes nothing through links in a run folder (it would overwrite "
        "the file it points to): remove the link or pick another train.out_dir"
    )


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses, in one line, a symbolic link at ``path`` (its target untouched)."""
    path = Path(path)
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise _refuse(path) from None
        raise


def write_no_follow(path: str | Path, data: bytes) -> None:
    """Create or replace the file ``path`` with ``data``, never through a link."""
    fd = open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def append_no_follow(path: str | Path) -> TextIO:
    """``path`` opened for appending lines (line-buffered: what is logged survives a crash)."""
    fd = open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def refuse_links(run_dir: Path) -> None:
    """Refuse a run folder in which a file or folder the engine writes is a symbolic link."""
    for name in (*RUN_FILES, *RUN_FOLDERS, *(f + ".tmp" for f in RUN_FILES)):
        if (run_dir / name).is_symlink():
            raise _refuse(run_dir / name)
