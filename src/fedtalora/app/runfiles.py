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
* :func:`resume_state` -- ``resume`` of a complete run does nothing; of a complete run whose ``config.yaml`` was
  edited after it computed its results it refuses (the final model's metadata carries the config's
  fingerprint: :func:`final_config_sha256`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, FedTaLoRAError
from ..fed.history import History, load_history
from ..fed.rundir import DIRNAME, FINAL_MODEL, METRICS, config_fingerprint
from ..fed.tracking import ROUNDS_CSV, TASKS_CSV, TENSORBOARD_DIR
from ..runlock import LOCK_NAME, RunLock
from .report import PLOTS

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["RUN_FILES", "RUN_FOLDERS", "check_overwrite", "clear_for_overwrite", "entries", "final_config_sha256",
           "is_empty", "resume_state", "writer_lock"]

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


def final_config_sha256(run_dir: Path) -> str | None:
    """The config fingerprint in the final model's metadata (None: no readable final model, or one written by an
    older fedtalora without it). Reads the metadata only, not the tensors."""
    from safetensors import safe_open

    path = run_dir / FINAL_MODEL
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("config_sha256")
    except Exception:  # noqa: BLE001 - not safetensors, truncated, ...: no fingerprint to compare
        return None
    return value if isinstance(value, str) and value else None


def resume_state(run_dir: Path, cfg: RunConfig) -> History | None:
    """The run's history if it is already complete under ``cfg`` (``resume`` then has nothing to do), else None.

    A complete run's final model carries the fingerprint of the config that computed it
    (:func:`fedtalora.fed.rundir.config_fingerprint`, in its metadata); a complete run without one (an older
    fedtalora's) is taken as it is.

    Raises:
        ConfigError: the run is complete but ``config.yaml`` was edited after it computed its results (resuming
            would recompute and replace them).
    """
    try:
        history = load_history(run_dir / METRICS)
    except FedTaLoRAError:  # no results yet, or unreadable ones: the checkpoint (if any) decides
        return None
    if not history.complete:
        return None
    saved = final_config_sha256(run_dir)
    if saved is not None and saved != config_fingerprint(cfg.to_dict()):
        raise ConfigError(f"cannot resume {run_dir}: the run is complete, but its config.yaml was edited after it "
                          "computed its results; nothing to resume (restore config.yaml, or start a new run "
                          "with `fedtalora run`)")
    return history
