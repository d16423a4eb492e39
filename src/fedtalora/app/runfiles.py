"""A run directory as the commands that write it see it: one writer at a time, what counts as empty, what
``output.overwrite=true`` clears, and whether a run is already complete.

* :func:`writer_lock` -- the :class:`~fedtalora.runlock.RunLock` a command holds while a run writes the
  directory (``run``, ``resume``, a sweep's runs). With ``engine=flower`` the ServerApp takes it instead, on
  the machine where it writes: the submitting command does not hold it, or a SuperLink on the same machine
  would find the directory locked by its own submitter.
* :func:`entries` / :func:`is_empty` -- a directory that holds only the lock file is empty.
* :func:`clear_for_overwrite` -- ``output.overwrite=true`` deletes the files of the run that was there (known
  by name: :data:`RUN_FILES`, :data:`RUN_FOLDERS`) *before* the new run writes anything, under the lock, so
  the directory never holds one run's config beside another's results. A directory that holds anything
  else is refused: it may not be a run directory at all, and nothing is deleted then.
* :func:`resume_state` -- ``resume`` of a complete run does nothing; of a run whose ``config.yaml`` was edited
  after it computed its results it refuses (the results carry the config's fingerprint:
  :attr:`~fedtalora.fed.history.History.config_sha256`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, FedTaLoRAError
from ..fed.history import History, load_history
from ..fed.rundir import DIRNAME, FINAL_MODEL, METRICS, config_fingerprint, latest_path
from ..fed.tracking import ROUNDS_CSV, TASKS_CSV, TENSORBOARD_DIR
from ..runlock import LOCK_NAME, RunLock
from .report import PLOTS

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["RUN_FILES", "RUN_FOLDERS", "check_overwrite", "clear_for_overwrite", "entries", "is_empty", "resume_state", "writer_lock"]

RUN_FILES = ("config.yaml", "partitions.json", METRICS, FINAL_MODEL, ROUNDS_CSV, TASKS_CSV, "error.log",
             "config.flower.yaml", "report.md", *PLOTS)
"""Files a run (and ``fedtalora report``, whose default output is the run directory) writes into it."""
RUN_FOLDERS = (DIRNAME, TENSORBOARD_DIR, "export")
"""Folders a run (and ``fedtalora export``, by default) writes into it."""


def entries(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds, without the lock file (sorted; empty when it does not exist).

    Raises:
        OSError: ``run_dir`` cannot be listed (the caller names the config key).
    """
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)


def is_empty(run_dir: Path) -> bool:
    """Whether ``run_dir`` is missing or holds nothing but the lock file."""
    return not entries(run_dir)


def writer_lock(run_dir: Path, engine: str) -> contextlib.AbstractContextManager[object]:
    """The lock to hold while a run of ``engine`` writes ``run_dir`` (see the module docstring)."""
    if engine == "flower":
        return contextlib.nullcontext()
    return RunLock(run_dir)


def check_overwrite(run_dir: Path) -> list[Path]:
    """What :func:`clear_for_overwrite` would delete, checked: every entry is a run's file or folder.

    Raises:
        ConfigError: one line naming the directory and the first entry that is not a run's (a name a run
            does not write, or a run's file name that is a folder, or the reverse).
    """
    found = entries(run_dir)
    for p in found:
        if p.name in RUN_FILES and (p.is_dir() and not p.is_symlink()):
            raise ConfigError(f"output.overwrite=true: cannot clear {run_dir}: {p.name} is a directory, not the "
                              "file a run writes; move it away")
        if p.name in RUN_FOLDERS and not p.is_dir():
            raise ConfigError(f"output.overwrite=true: cannot clear {run_dir}: {p.name} is not a folder")
        if p.name not in RUN_FILES and p.name not in RUN_FOLDERS and not p.name.endswith(".tmp"):
            raise ConfigError(f"output.overwrite=true: {run_dir} holds {p.name!r}, which is not a file fedtalora "
                              "writes; refusing to delete anything in a folder that may not be a run directory "
                              "(move it away or choose another output.name)")
    return found


def clear_for_overwrite(run_dir: Path) -> list[str]:
    """Delete the files of the run that ``run_dir`` holds (``output.overwrite=true``); returns their names.
    Everything is checked (:func:`check_overwrite`) before anything is deleted.

    Raises:
        ConfigError: an entry is not a run's, or one cannot be deleted.
    """
    found = check_overwrite(run_dir)
    try:
        for p in found:  # the results first: a crash in between leaves no results beside a stale config
            if p.name in (METRICS, FINAL_MODEL):
                p.unlink()
        for p in found:
            if p.name in (METRICS, FINAL_MODEL):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except OSError as e:
        raise ConfigError(f"output.overwrite=true: cannot clear {run_dir}: {e.strerror or e}") from None
    return [p.name for p in found]


def resume_state(run_dir: Path, cfg: RunConfig) -> History | None:
    """The run's history if it is already complete under ``cfg`` (``resume`` then has nothing to do), else None.

    Raises:
        ConfigError: ``config.yaml`` was edited after the run computed its results: it is complete (resuming
            would recompute and replace them), or it has results but no checkpoint (resuming would start
            over and replace them). With a checkpoint, the checkpoint's own fingerprint decides
            (:func:`fedtalora.fed.rundir.load`).
    """
    try:
        history = load_history(run_dir / METRICS)
    except FedTaLoRAError:  # no results yet, or unreadable ones: the checkpoint (if any) decides
        return None
    fingerprint = config_fingerprint(cfg.to_dict())
    edited = bool(history.config_sha256) and history.config_sha256 != fingerprint
    if history.complete:
        if edited:
            raise ConfigError(f"cannot resume {run_dir}: the run is complete, but its config.yaml was edited after it "
                              "computed its results; nothing to resume (restore config.yaml, or start a new run "
                              "with `fedtalora run`)")
        return history
    if edited and latest_path(run_dir) is None:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml was edited after {METRICS} was written, and "
                          "without a checkpoint resuming would start over and replace those results (restore "
                          "config.yaml, or start a new run with `fedtalora run`)")
    return None
