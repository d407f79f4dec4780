"""One process trains in a run folder at a time: an exclusive lock on ``<run>/.lock``.

Holding it proves that no other leanlm process is writing checkpoints there, so leftover
``.tmp-step-*`` folders of crashed saves can be removed; a second ``leanlm train`` on the same
``train.out_dir`` gets one clear line instead of two runs interleaving their checkpoints. The lock
is ``fcntl.flock``: the kernel drops it when the process dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from leanlm.engine.errors import ConfigError
from leanlm.engine.run_files import open_no_follow, refuse_links

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder (creating it); ``ConfigError`` when the
    folder cannot be written or another process holds it."""

    def __init__(self, run_dir: Path, key: str = "train.out_dir") -> None:
        self.run_dir, self.key = Path(run_dir), key
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            refuse_links(self.run_dir)
            fd = open_no_follow(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise ConfigError(
                f"{self.key}={str(self.run_dir)!r}: cannot write there ({e.strerror}); pick a writable folder"
            ) from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, the rest works
            pass
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(
                    f"{self.key}={str(self.run_dir)!r} is in use by {holder}; wait for it to "
                    "finish or pick another train.out_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
