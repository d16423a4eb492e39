"""One writer per run directory: an advisory lock held while a run (or resume) writes ``RUN_DIR``.

Two runs started at once with the same ``output.name`` both pass the "directory is empty" check; then
their ``config.yaml``, ``metrics.json`` and checkpoints interleave. :class:`RunLock` closes that race:
the writer takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.fedtalora.lock`` before it writes anything,
and a second writer gets :class:`~fedtalora.errors.ConfigError` at once (one line naming the directory
and the holder's pid) instead of waiting.

The lock belongs to the open file, not to the file's existence: the kernel drops it when the holder
exits, however it exits (SIGKILL included), so a stale lock file never blocks a later resume. The file
stays in the run directory (deleting it while held would let a third writer lock a new inode).

Platforms without ``fcntl`` (Windows) get no lock and a debug log line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".fedtalora.lock"
"""The lock file inside a run directory (a run directory that holds only it counts as empty)."""


class RunLock:
    """``with RunLock(run_dir): ...`` holds the run directory's lock (the directory must exist).

    Raises:
        ConfigError: another process (or another :class:`RunLock` in this one) holds it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            logger.debug("no fcntl: %s is not locked", self.path.parent)
            return self
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ConfigError(f"cannot lock the run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise ConfigError(f"run directory {self.path.parent} is in use by {who} (a run or resume is writing it); "
                              "wait for it to finish or choose another output.name") from None
        except OSError as e:  # e.g. a file system without locks: run unlocked, but say so
            logger.warning("cannot lock %s (%s); running without the one-writer guarantee", self.path,
                           e.strerror or e)
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
