"""Metric trackers fed by the engine's events, and the provenance that makes a run directory self-describing.

The loop (:mod:`fedtalora.fed.loop`) emits one event dict per client, round and task (``start``,
``client``, ``round``, ``task``, ``end``). A tracker is any callable taking such a dict. Two ship here:

- :class:`CSVTracker` (always on when there is a run directory): ``rounds.csv``, one row per round,
  and ``tasks.csv``, one row per task with the accuracy on every task seen so far. Each file is
  rewritten atomically from rows keyed by position, so a resumed run that replays a round replaces
  that row instead of duplicating it, and the files always parse.
- :class:`TensorBoardTracker` (``output.tensorboard=true``, needs ``pip install fedtalora[tensorboard]``):
  the same scalars as TensorBoard event files under ``RUN_DIR/tensorboard``.

The provenance of a run (device, library versions, git commit) is recorded by the loop itself
(:func:`fedtalora.fed.build.environment`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..safeio import atomic_write_text

if TYPE_CHECKING:

    from ..config import RunConfig

logger = logging.getLogger(__name__)

Event = Mapping[str, Any]
Tracker = Callable[[Event], None]

ROUNDS_CSV = "rounds.csv"
TASKS_CSV = "tasks.csv"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "pip install fedtalora[tensorboard]"

ROUND_COLUMNS = (
    "task", "round", "global_round", "clients", "num_samples", "train_loss", "aggregation_error",
    "aggregation_error_rounding", "uplink_bytes", "downlink_bytes", "residual_bytes_dense", "residual_bytes_factored", "seconds",
)
"""Leading columns of ``rounds.csv``; scalar fields of a round event not listed here follow, sorted."""


def _cell(value: Any) -> Any:
    """A CSV cell: numbers as they are (full precision), lists space-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(_cell(v)) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}:{_cell(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return int(value)
    return value


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


class CSVTracker:
    """``rounds.csv`` and ``tasks.csv`` in a run directory, rewritten after every round and task.

    Rows already in the files (a resumed run) are kept up to the position the run continues from.

    Args:
        run_dir: the run directory (must exist).
    """

    def __init__(self, run_dir: Path) -> None:
        self.rounds_path = run_dir / ROUNDS_CSV
        self.tasks_path = run_dir / TASKS_CSV
        self._rounds_per_task: int | None = None
        self._num_tasks: int | None = None
        self._rounds: dict[tuple[int, int], dict[str, Any]] = {
            (int(r["task"]), int(r["round"])): dict(r) for r in _read_rows(self.rounds_path)
            if r.get("task", "").isdigit() and r.get("round", "").isdigit()
        }
        self._tasks: dict[int, dict[str, Any]] = {
            int(r["task"]): dict(r) for r in _read_rows(self.tasks_path) if r.get("task", "").isdigit()
        }

    def __call__(self, event: Event) -> None:
        kind = event.get("event")
        if kind == "start":
            self._rounds_per_task = int(event["rounds_per_task"])
            self._num_tasks = int(event["num_tasks"])
            done = int(event.get("completed_rounds", 0) or 0)
            R = self._rounds_per_task
            # A fresh run (done == 0) drops everything; a resumed one keeps the rounds and tasks before it.
            self._rounds = {k: v for k, v in self._rounds.items() if k[0] * R + k[1] < done}
            self._tasks = {k: v for k, v in self._tasks.items() if (k + 1) * R <= done}
            self._write_rounds()
            self._write_tasks()
        elif kind == "round":
            self._round(event)
        elif kind == "task":
            self._task(event)

    def _round(self, event: Event) -> None:
        t, r = int(event["task"]), int(event["round"])
        row = {k: _cell(v) for k, v in event.items() if k != "event"}
        if self._rounds_per_task is not None:
            row["global_round"] = t * self._rounds_per_task + r
        self._rounds = {k: v for k, v in self._rounds.items() if k < (t, r)}  # a replayed round replaces its successors
        self._rounds[(t, r)] = row
        self._write_rounds()

    def _task(self, event: Event) -> None:
        t = int(event["task"])
        acc = list(event.get("accuracy", []))
        row: dict[str, Any] = {"task": t, "seen_accuracy": _cell(event.get("seen_accuracy"))}
        for j, v in enumerate(acc):
            row[f"acc_task_{j}"] = _cell(v)
        if "seconds" in event:
            row["seconds"] = _cell(event["seconds"])
        self._tasks = {k: v for k, v in self._tasks.items() if k < t}
        self._tasks[t] = row
        self._write_tasks()

    def _write_rounds(self) -> None:
        extra = sorted({k for v in self._rounds.values() for k in v} - set(ROUND_COLUMNS))
        self._write(self.rounds_path, [*ROUND_COLUMNS, *extra], [self._rounds[k] for k in sorted(self._rounds)])

    def _write_tasks(self) -> None:
        T = max([self._num_tasks or 0, *(k + 1 for k in self._tasks)])
        columns = ["task", "seen_accuracy", *(f"acc_task_{j}" for j in range(T)), "seconds"]
        self._write(self.tasks_path, columns, [self._tasks[k] for k in sorted(self._tasks)])

    @staticmethod
    def _write(path: Path, columns: Iterable[str], rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())


def _summary_writer_class() -> Any:
    """torch's ``SummaryWriter``, or a one-line :class:`ConfigError` saying what to install."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"output.tensorboard=true needs TensorBoard: {TENSORBOARD_HINT}") from None
    return SummaryWriter


def check_tensorboard(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` now (before any work) if the config asks for TensorBoard and it is missing."""
    if cfg.output.tensorboard:
        _summary_writer_class()


class TensorBoardTracker:
    """The round and task scalars as TensorBoard events in ``RUN_DIR/tensorboard``.

    Steps: rounds count globally over tasks (``task * rounds_per_task + round``); task scalars use the
    task index. Events are flushed after every round and task.
    """

    def __init__(self, run_dir: Path) -> None:
        self._writer = _summary_writer_class()(log_dir=str(run_dir / TENSORBOARD_DIR))
        self._rounds_per_task = 1

    def __call__(self, event: Event) -> None:
        kind = event.get("event")
        w = self._writer
        if kind == "start":
            self._rounds_per_task = int(event["rounds_per_task"])
        elif kind == "round":
            step = int(event["task"]) * self._rounds_per_task + int(event["round"])
            for key in ("train_loss", "aggregation_error", "aggregation_error_rounding",
                        "aggregation_error_accumulated_rounding", "uplink_bytes", "downlink_bytes",
                        "residual_bytes_dense", "residual_bytes_factored", "seconds"):
                value = event.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    w.add_scalar(f"round/{key}", value, step)
            w.flush()
        elif kind == "task":
            t = int(event["task"])
            if event.get("seen_accuracy") is not None:
                w.add_scalar("task/seen_accuracy", event["seen_accuracy"], t)
            for j, v in enumerate(event.get("accuracy", [])):
                if v is not None:
                    w.add_scalar(f"task/accuracy_task_{j}", v, t)
            w.flush()
        elif kind == "end":
            w.close()


def open_trackers(cfg: RunConfig, run_dir: Path | None) -> list[Tracker]:
    """The trackers a run writes: CSV always (with a run directory), TensorBoard when configured."""
    if run_dir is None:
        return []
    trackers: list[Tracker] = [CSVTracker(run_dir)]
    if cfg.output.tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    return trackers


def fan_out(*callbacks: Tracker | None) -> Tracker:
    """One callback that forwards every event to each of ``callbacks`` (None entries are skipped)."""
    live = [c for c in callbacks if c is not None]

    def emit(event: Event) -> None:
        for c in live:
            c(event)

    return emit
