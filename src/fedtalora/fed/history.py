"""What a run measured, as typed records: the schema of ``metrics.json`` lives here and nowhere else.

:class:`History` is one run's record: a header (method, seed, backbone, environment), one
:class:`RoundRecord` per aggregated (or skipped) round, one :class:`TaskRecord` per finished task, the
accuracy matrix and its summaries (F_AA, AIA, forgetting), and the totals added when the run completes.
The loop fills it; ``metrics.json`` is :meth:`History.to_dict` (rewritten after every round, so an
interrupted run keeps what it computed); readers (CLI summary, sweep, report, compare, export) load it
with :meth:`History.from_dict` / :func:`load_history`, which also read the files of older fedtalora
versions (fields they lack get their defaults).

The records are also the file's validator: the JSON schema of ``metrics.json`` is derived from the
dataclasses' type annotations (:func:`fedtalora.schema.for_type`; a field's ``metadata["schema"]``
narrows its type, e.g. an accuracy is a finite number in ``[0, 1]``), so a hand-edited or foreign file
(``"rounds": [1, 2]``, ``"task": "x"``, ``"seed": true``) is refused by :meth:`History.from_dict` with
one line naming the field, never a traceback later in a reader. There is no second schema of this file.

Engines may add fields: a :class:`RoundRecord`'s :attr:`~RoundRecord.extra` (e.g. the bytes that went over
Flower's wire, ``wire_*``) and the history's :attr:`~History.extra` (run totals of those), written after the
standard fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.metrics import summarize
from ..errors import CheckpointError
from ..safeio import read_json
from ..schema import Float, Int, List, Maybe, Schema, for_type, problem

__all__ = ["TIMING_FIELDS", "History", "RoundRecord", "TaskRecord", "history_problem", "load_history",
           "without_timing"]

_ACC = Float(min=0.0, max=1.0)
"""An accuracy: finite, in [0, 1]."""


def _narrow(schema: Schema) -> dict[str, Schema]:
    """Field metadata narrowing the schema derived from a field's type (see :func:`fedtalora.schema.for_type`)."""
    return {"schema": schema}


@dataclass
class RoundRecord:
    """One round of one task, as the server saw it."""

    task: int = 0
    round: int = 0
    clients: list[int] = field(default_factory=list)
    """The sampled clients, in the order the server processed their updates."""
    aggregated: list[int] = field(default_factory=list)
    """The clients whose update was aggregated."""
    num_samples: list[int] = field(default_factory=list)
    """Samples of each aggregated client (their aggregation weights with ``fed.weighting=samples``)."""
    dropped: list[int] = field(default_factory=list)
    corrupted: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """``{client, reason}`` of every update the server's screening refused."""
    large_updates: list[int] = field(default_factory=list)
    """Clients whose accepted update changed the global state by more than ``LARGE_UPDATE_RATIO`` times its norm
    (flagged only when ``fed.max_update_norm=0`` sets no bound: :mod:`fedtalora.fed.screening`)."""
    skipped: bool = False
    """Fewer valid updates than ``fed.min_clients``: the global model stayed as it was."""
    train_loss: float | None = None
    """Sample-weighted mean of the aggregated clients' training losses (None in a skipped round)."""
    aggregation_error: float | None = None
    """Fraction of the clients' averaged update that the round lost, largest over adapted layers:
    ``||E_new - (E_old + sum_k p_k dE_k)|| / ||sum_k p_k dE_k||`` with ``E`` the effective weight each layer
    computes with, as the model holds it after the round (in float64, :func:`fedtalora.core.exact.round_error`;
    0.0 for methods that aggregate no LoRA factors). With tiny updates one float32 rounding of the weight is a
    large fraction of the update: read :attr:`aggregation_error_rounding` beside it."""
    aggregation_error_rounding: float | None = None
    """The same error in units of one float32 rounding of the weight, ``u ||W||`` (``u = 2**-24``), largest
    over layers: <= 2 is float32 resolution and nothing more (None: no LoRA factors aggregated)."""
    aggregation_error_accumulated: float | None = None
    """Distance of the model from the exact chain since the start of the run (with the residual: of the
    weighted averages of the clients' models; for a method that merges into the base, of what it merged),
    relative to the accumulated update ``||E*_t - E*_0||``, largest over layers. Only for methods that change
    the base, which keep it exactly (:func:`fedtalora.core.exact.accumulated_error`); else None."""
    aggregation_error_accumulated_rounding: float | None = None
    """:attr:`aggregation_error_accumulated` in units of ``u ||W||`` (<= 1: one float32 rounding)."""
    naive_aggregation_loss: float | None = None
    """What averaging the LoRA factors alone would have lost this round, largest over layers: the error of
    :attr:`aggregation_error` without the round's change of the base (the residual), relative to the same
    update (equal to it without the residual). Files written before the truthful metrics hold it relative to
    the clients' averaged LoRA product ``s sum_k p_k B_k A_k`` instead."""
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    downlink_bytes_dense: int = 0
    """The downlink with every residual catch-up sent dense."""
    residual_bytes_dense: int = 0
    """This round's residual as dense matrices (0: no residual)."""
    residual_bytes_factored: int = 0
    """This round's residual as its factors."""
    seconds: float = field(default=0.0, metadata=_narrow(Float(min=0.0)))
    # --- the method's own costs (:class:`fedtalora.methods.base.MethodCosts`; 0 / empty for most methods) ---
    method_server_seconds: float = field(default=0.0, metadata=_narrow(Float(min=0.0)))
    """Server time of the method's own work this round: a generator's training (target, lander: in the last
    round of every task but the last), GLFC's proxy (gradient inversion, monitoring). A timing field."""
    method_downlink_bytes: int = 0
    """What the server sent beyond the global state and residuals (a generator, the old model); included in
    :attr:`downlink_bytes`."""
    synthetic_samples: int = 0
    """Synthetic samples the clients trained on this round (target, lander)."""
    synthetic_samples_per_client: dict[str, int] = field(default_factory=dict)
    """Client id -> its synthetic samples this round."""
    memory_samples: int | None = None
    """Exemplars the clients hold after the round (glfc with ``memory_per_class``; None: no memory)."""
    memory_samples_per_client: dict[str, int] = field(default_factory=dict)
    """Client id -> the exemplars it holds."""
    proxy_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """GLFC: the new global model's accuracy on the proxy server's reconstructed monitor set."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific fields (e.g. Flower's ``wire_*`` bytes, ``client_errors``)."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        return _from_dict(cls, data)


@dataclass
class TaskRecord:
    """The evaluation after a task's last round."""

    task: int = 0
    classes: list[int] = field(default_factory=list)
    """The original class ids of the task."""
    accuracy: list[float] = field(default_factory=list, metadata=_narrow(List(_ACC)))
    """Accuracy on the test data of each task seen so far (row ``task`` of the accuracy matrix)."""
    seen_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """Accuracy on the test data of every class seen so far (``A_t``)."""
    val_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """Accuracy on the clients' validation samples of every class seen so far (``data.val_fraction``; absent
    without a validation split): what tuning reads."""
    seconds: float = field(default=0.0, metadata=_narrow(Float(min=0.0)))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["val_accuracy"] is None:  # no validation split: the field is left out, as before it existed
            del out["val_accuracy"]
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        return _from_dict(cls, data)


_SUMMARY = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "seen_accuracy")
_VAL_SUMMARY = ("val_final_average_accuracy", "val_average_incremental_accuracy")
_TOTALS = ("uplink_bytes_total", "downlink_bytes_total", "downlink_bytes_dense_total", "residual_bytes_dense_total",
           "residual_bytes_factored_total", "max_aggregation_error", "max_aggregation_error_rounding",
           "max_aggregation_error_accumulated", "max_aggregation_error_accumulated_rounding",
           "naive_aggregation_loss_mean", "naive_aggregation_loss_max", "reliability")


@dataclass
class History:
    """Everything a run measured; ``metrics.json`` is :meth:`to_dict`."""

    method: str = ""
    seed: int = 0
    complete: bool = False
    backbone: str = ""
    pretrained: bool = False
    accuracy_matrix: list[list[float | None]] = field(default_factory=list, metadata=_narrow(List(List(Maybe(_ACC)))))
    """``T x T``; row ``t``: accuracy on each task's test data after training task ``t`` (None above the diagonal)."""
    rounds: list[RoundRecord] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)
    trainable_parameters: int | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    final_average_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """F_AA: accuracy on all classes seen after the last evaluated task."""
    average_incremental_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """AIA: mean over the evaluated tasks of the accuracy on all classes seen so far."""
    forgetting: float | None = field(default=None, metadata=_narrow(Maybe(Float(min=-1.0, max=1.0))))
    seen_accuracy: list[float] | None = field(default=None, metadata=_narrow(Maybe(List(_ACC))))
    wall_seconds: float | None = field(default=None, metadata=_narrow(Maybe(Float(min=0.0))))
    val_final_average_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """F_AA on the validation split (``data.val_fraction``; absent without one)."""
    val_average_incremental_accuracy: float | None = field(default=None, metadata=_narrow(Maybe(_ACC)))
    """AIA on the validation split (``data.val_fraction``; absent without one)."""
    # --- run totals (set by :meth:`finish`) ---
    uplink_bytes_total: int | None = None
    downlink_bytes_total: int | None = None
    downlink_bytes_dense_total: int | None = None
    residual_bytes_dense_total: int | None = None
    residual_bytes_factored_total: int | None = None
    max_aggregation_error: float | None = None
    max_aggregation_error_rounding: float | None = None
    """Largest :attr:`RoundRecord.aggregation_error_rounding` (None when no round measured it)."""
    max_aggregation_error_accumulated: float | None = None
    """Largest :attr:`RoundRecord.aggregation_error_accumulated` (None without the exact base)."""
    max_aggregation_error_accumulated_rounding: float | None = None
    """Largest :attr:`RoundRecord.aggregation_error_accumulated_rounding` (None without the exact base)."""
    naive_aggregation_loss_mean: float | None = None
    naive_aggregation_loss_max: float | None = None
    reliability: dict[str, int] | None = None
    """``{dropped_clients, corrupted_updates, rejected_updates, skipped_rounds}`` (plus engine counts)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific run fields (e.g. ``engine``, Flower's ``wire`` totals)."""

    # --- filling ------------------------------------------------------------------------------------

    def add_task(self, record: TaskRecord, num_tasks: int, test_sizes: list[int]) -> None:
        """Record a task's evaluation: a new row of the accuracy matrix and the summaries up to it."""
        rows = [[v for v in r if v is not None] for r in self.accuracy_matrix] + [list(record.accuracy)]
        self.accuracy_matrix = [r + [None] * (num_tasks - len(r)) for r in rows]
        summary = summarize([r + [None] * (len(rows) - len(r)) for r in rows], test_sizes[: len(rows)])
        for key in _SUMMARY:
            setattr(self, key, summary[key])
        record.seen_accuracy = self.seen_accuracy[-1]  # type: ignore[index]
        self.tasks.append(record)
        vals = [r.val_accuracy for r in self.tasks]
        if all(v is not None for v in vals):
            self.val_final_average_accuracy = vals[-1]
            self.val_average_incremental_accuracy = float(np.mean(vals))

    def finish(self) -> None:
        """Run totals, once every round is done."""
        rounds = self.rounds
        self.complete = True
        self.uplink_bytes_total = sum(r.uplink_bytes for r in rounds)
        self.downlink_bytes_total = sum(r.downlink_bytes for r in rounds)
        self.downlink_bytes_dense_total = sum(r.downlink_bytes_dense for r in rounds)
        self.residual_bytes_dense_total = sum(r.residual_bytes_dense for r in rounds)
        self.residual_bytes_factored_total = sum(r.residual_bytes_factored for r in rounds)
        self.max_aggregation_error = max((r.aggregation_error for r in rounds if r.aggregation_error is not None),
                                         default=0.0)
        for total, key in (("max_aggregation_error_rounding", "aggregation_error_rounding"),
                           ("max_aggregation_error_accumulated", "aggregation_error_accumulated"),
                           ("max_aggregation_error_accumulated_rounding", "aggregation_error_accumulated_rounding")):
            values = [getattr(r, key) for r in rounds if getattr(r, key) is not None]
            setattr(self, total, max(values) if values else None)
        naive = [r.naive_aggregation_loss for r in rounds if r.naive_aggregation_loss is not None]
        self.naive_aggregation_loss_mean = float(np.mean(naive)) if naive else None
        self.naive_aggregation_loss_max = max(naive) if naive else None
        self.reliability = {
            "dropped_clients": sum(len(r.dropped) for r in rounds),
            "corrupted_updates": sum(len(r.corrupted) for r in rounds),
            "rejected_updates": sum(len(r.rejected) for r in rounds),
            "skipped_rounds": sum(bool(r.skipped) for r in rounds),
        }

    # --- reading ------------------------------------------------------------------------------------

    def per_round(self, total: int | None) -> float | None:
        """A run total per round (None without rounds or total)."""
        return None if total is None or not self.rounds else total / len(self.rounds)

    # --- (de)serialising ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "seed": self.seed, "complete": self.complete, "backbone": self.backbone,
            "pretrained": self.pretrained, "accuracy_matrix": self.accuracy_matrix,
            "rounds": [r.to_dict() for r in self.rounds], "tasks": [t.to_dict() for t in self.tasks],
            "trainable_parameters": self.trainable_parameters, "environment": self.environment,
        }
        if self.tasks:  # the summaries exist once a task is evaluated
            out.update({k: getattr(self, k) for k in _SUMMARY})
            if self.val_final_average_accuracy is not None:
                out.update({k: getattr(self, k) for k in _VAL_SUMMARY})
        if self.wall_seconds is not None:
            out["wall_seconds"] = self.wall_seconds
        if self.complete:
            out.update({k: getattr(self, k) for k in _TOTALS})
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """A history from ``metrics.json`` content (missing fields get their defaults; unknown ones are kept
        in :attr:`extra`).

        Raises:
            ValueError: one line naming the first field whose value does not have its record's type
                (:func:`history_problem`).
        """
        why = history_problem(data)
        if why is not None:
            raise ValueError(why)
        return _from_dict(cls, data, nested={"rounds": RoundRecord, "tasks": TaskRecord})


@functools.cache
def _schema() -> Schema:
    return for_type(History, ints=Int(min=0))


def history_problem(data: Any) -> str | None:
    """The first way ``data`` is not a ``metrics.json`` document (one line naming the field), or None.

    The schema is :class:`History`'s own fields and types (counts are integers >= 0, accuracies finite
    numbers in [0, 1], losses any number). Every field is optional, even in a complete run: another engine
    (a sweep runner) may record only the accuracies, and readers show what is missing as such.
    """
    return problem(data, _schema())


def _from_dict(cls: type, data: dict[str, Any], nested: dict[str, type] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs: dict[str, Any] = {}
    for k in names & set(data):
        v = data[k]
        if nested and k in nested:
            if not isinstance(v, list):
                raise ValueError(f"{k} must be a list, got {type(v).__name__}")
            v = [nested[k].from_dict(x) for x in v]
        kwargs[k] = v
    extra = {k: v for k, v in data.items() if k not in names}
    return cls(**kwargs, extra=extra)


def load_history(path: Path, *, error: Callable[[str], Exception] = CheckpointError,
                 what: str | None = None) -> History:
    """Read a ``metrics.json`` through the guarded reader (a regular file, UTF-8, size and depth limits) and
    check it (:meth:`History.from_dict`).

    Raises:
        The ``error`` exception (default :class:`~fedtalora.errors.CheckpointError`), one line naming the file
        (``what``, default its path): missing, unreadable, not JSON, or not a fedtalora metrics file.
    """
    label = what if what is not None else str(path)
    data = read_json(path, what=label, error=error)
    try:
        return History.from_dict(data)
    except ValueError as e:
        raise error(f"{label} is not a fedtalora metrics file: {e}") from None


TIMING_FIELDS = ("wall_seconds", "rounds[*].seconds", "rounds[*].method_server_seconds", "tasks[*].seconds")
"""The fields of ``metrics.json`` that measure time: the only ones that differ between two runs of the
same config on CPU, or between an interrupted-and-resumed run and an uninterrupted one."""


def without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``metrics.json`` dict without :data:`TIMING_FIELDS` (for comparing runs)."""
    out = {k: v for k, v in metrics.items() if k != "wall_seconds"}
    for key in ("rounds", "tasks"):
        if key in out:
            out[key] = [{k: v for k, v in rec.items() if k not in ("seconds", "method_server_seconds")}
                        for rec in out[key]]
    return out
