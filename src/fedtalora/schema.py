"""Shape checks of the JSON documents fedtalora reads back: checkpoint state, ``partitions.json``,
``export.json``, the final model's metadata, and (through :func:`for_type`, from its typed records in
:mod:`fedtalora.fed.history`) ``metrics.json``.

A document that parses is not yet one we wrote: a hand edit, a truncated copy or another program can
leave ``"completed_rounds": "x"`` or ``"rounds": [1, 2]``, which would fail deep inside the code that
uses it, with a traceback. Each reader therefore checks the document against a schema right after
parsing it (:func:`fedtalora.safeio.read_json`), and reports the first problem as one line naming
the file and the field::

    problem(doc, CHECKPOINT)  ->  "completed_rounds must be an integer >= 1, got 'x'"

A schema is built from a few combinators (:class:`Int`, :class:`Float`, :class:`Str`, :class:`Bool`,
:class:`List`, :class:`Obj`, :class:`Map`, :class:`Maybe`, :class:`AnyValue`). Objects are *open*:
fields a schema does not name are allowed (documents written by a newer fedtalora still read), but
every named field that is present must have its type, and ``required`` fields must be present.

Pure functions of plain data: no file access, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .safeio import short

__all__ = [
    "CHECKPOINT",
    "EXPORT_INFO",
    "FINAL_META",
    "PARTITIONS",
    "AnyValue",
    "Bool",
    "Float",
    "Int",
    "List",
    "Map",
    "Maybe",
    "Obj",
    "Schema",
    "Str",
    "final_meta_problem",
    "for_type",
    "load_checked",
    "problem",
]


class Schema:
    """A check of one JSON value: :meth:`problem` returns None or what is wrong, naming ``where``."""

    description = "a value"

    def problem(self, value: Any, where: str) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _bad(self, value: Any, where: str) -> str:
        return f"{where or 'the document'} must be {self.description}, got {short(value, 60)}"


@dataclass(frozen=True)
class AnyValue(Schema):
    description = "any value"

    def problem(self, value: Any, where: str) -> str | None:
        return None


@dataclass(frozen=True)
class Bool(Schema):
    description = "true or false"

    def problem(self, value: Any, where: str) -> str | None:
        return None if isinstance(value, bool) else self._bad(value, where)


@dataclass(frozen=True)
class Int(Schema):
    """An integer (not a bool, not a float) in ``[min, max]``."""

    min: int | None = None
    max: int | None = None

    @property
    def description(self) -> str:  # type: ignore[override]
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return "an integer"

    def problem(self, value: Any, where: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return self._bad(value, where)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            return self._bad(value, where)
        return None


@dataclass(frozen=True)
class Float(Schema):
    """A number (an int is accepted, a bool is not), finite unless ``finite=False``, in ``[min, max]``."""

    min: float | None = None
    max: float | None = None
    finite: bool = True

    @property
    def description(self) -> str:  # type: ignore[override]
        what = "a finite number" if self.finite else "a number"
        if self.min is not None and self.max is not None:
            return f"{what} in [{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f"{what} >= {self.min:g}"
        return what

    def problem(self, value: Any, where: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self._bad(value, where)
        v = float(value)
        if math.isnan(v):
            return None if not self.finite else self._bad(value, where)
        if self.finite and math.isinf(v):
            return self._bad(value, where)
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            return self._bad(value, where)
        return None


@dataclass(frozen=True)
class Str(Schema):
    """A string, optionally non-empty and at most ``max_len`` characters."""

    non_empty: bool = False
    max_len: int | None = None

    @property
    def description(self) -> str:  # type: ignore[override]
        return "a non-empty string" if self.non_empty else "a string"

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str) or (self.non_empty and not value):
            return self._bad(value, where)
        if self.max_len is not None and len(value) > self.max_len:
            return f"{where or 'the document'} must be at most {self.max_len} characters long, got {len(value)}"
        return None


@dataclass(frozen=True)
class Maybe(Schema):
    """``null`` or ``inner``."""

    inner: Schema

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"null or {self.inner.description}"

    def problem(self, value: Any, where: str) -> str | None:
        return None if value is None else self.inner.problem(value, where)


@dataclass(frozen=True)
class List(Schema):
    """A JSON array whose every item has ``item``'s shape, with ``min_len <= len <= max_len``."""

    item: Schema = field(default_factory=AnyValue)
    min_len: int = 0
    max_len: int | None = None

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"a list of {self.item.description.removeprefix('a ').removeprefix('an ')}s" \
            if isinstance(self.item, (Int, Str, Bool)) else "a list"

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, list):
            return self._bad(value, where)
        if len(value) < self.min_len:
            return f"{where or 'the document'} must hold at least {self.min_len} item(s), got {len(value)}"
        if self.max_len is not None and len(value) > self.max_len:
            return f"{where or 'the document'} must hold at most {self.max_len} item(s), got {len(value)}"
        if isinstance(self.item, AnyValue):
            return None
        for i, v in enumerate(value):
            why = self.item.problem(v, f"{where}[{i}]")
            if why is not None:
                return why
        return None


@dataclass(frozen=True)
class Obj(Schema):
    """A JSON object with (at least) the ``required`` fields; every field named in ``fields`` that is
    present must match its schema; other fields are allowed."""

    fields: Mapping[str, Schema] = field(default_factory=dict)
    required: Sequence[str] = ()
    description = "an object"

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return self._bad(value, where)
        missing = [k for k in self.required if k not in value]
        if missing:
            return f"{where or 'the document'} lacks {', '.join(repr(k) for k in missing[:3])}"
        prefix = f"{where}." if where else ""
        for key, schema in self.fields.items():
            if key in value:
                why = schema.problem(value[key], f"{prefix}{key}")
                if why is not None:
                    return why
        return None


@dataclass(frozen=True)
class Map(Schema):
    """A JSON object used as a mapping: every key matches ``key`` (keys are strings in JSON; ``key`` may
    require them to spell integers) and every value matches ``value``."""

    value: Schema = field(default_factory=AnyValue)
    int_keys: bool = False
    description = "an object"

    def problem(self, value: Any, where: str) -> str | None:
        if not isinstance(value, dict):
            return self._bad(value, where)
        for k, v in value.items():
            if self.int_keys and not (isinstance(k, str) and k.lstrip("-").isdigit() and len(k) < 20):
                return f"{where or 'the document'} has the key {short(k, 40)}, expected integers"
            why = self.value.problem(v, f"{where}[{short(k, 40)}]")
            if why is not None:
                return why
        return None


def for_type(hint: Any, *, ints: Schema | None = None, floats: Schema | None = None) -> Schema:
    """The schema of JSON values of the Python type ``hint``, so that a typed record (a dataclass) is its own
    schema: ``bool``, ``int`` (``ints``, default :class:`Int`), ``float`` (``floats``, default
    :class:`Float` with NaN and infinities allowed), ``str``, ``X | None``, ``list[X]``, ``dict[str, X]``,
    ``Any`` and dataclasses (an :class:`Obj` of their fields; a field's ``metadata["schema"]`` refines its
    type, e.g. an accuracy in ``[0, 1]``).

    Raises:
        TypeError: a type this mapping does not cover (a programming error, not bad input).
    """
    import dataclasses
    import types
    import typing

    ints = ints if ints is not None else Int()
    floats = floats if floats is not None else Float(finite=False)

    def of(tp: Any) -> Schema:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return AnyValue()
        if tp is bool:
            return Bool()
        if tp is int:
            return ints
        if tp is float:
            return floats
        if tp is str:
            return Str()
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1 and len(args) == 2:
                return Maybe(of(rest[0]))
        elif origin is list and len(args) == 1:
            return List(of(args[0]))
        elif origin is dict and len(args) == 2 and args[0] is str:
            return Obj() if args[1] is Any else Map(of(args[1]))
        elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
            hints = typing.get_type_hints(tp)
            fields = {f.name: f.metadata.get("schema") or of(hints[f.name]) for f in dataclasses.fields(tp)
                      if f.name != "extra"}
            return Obj(fields)
        raise TypeError(f"no JSON schema for the type {tp!r}")

    return of(hint)


def problem(doc: Any, schema: Schema) -> str | None:
    """The first way ``doc`` differs from ``schema`` (one line naming the field), or None."""
    return schema.problem(doc, "")


# --------------------------------------------------------------------------------------------------
# The documents
# --------------------------------------------------------------------------------------------------

_COUNT = Int(min=0)
_SECONDS = Float(min=0.0)
_ACC = Float(min=0.0, max=1.0)
_CLIENTS = List(Int(min=0))

LEDGER = Obj({"dense": Map(_COUNT), "cumulative": Map(List(_COUNT)), "last_sync": Map(Int(min=-1), int_keys=True)},
             required=("dense", "cumulative", "last_sync"))

CHECKPOINT = Obj({
    "format": Int(), "fedtalora": Str(), "config_sha256": Str(non_empty=True, max_len=128),
    "completed_rounds": Int(min=1), "task": _COUNT, "round": _COUNT, "tensors": Str(non_empty=True, max_len=255),
    "tensors_bytes": _COUNT, "tensors_sha256": Str(non_empty=True, max_len=128), "ledger": LEDGER,
    "elapsed_seconds": _SECONDS, "resumes": List(Obj({"completed_rounds": _COUNT})), "metrics": Obj(),
}, required=("format", "config_sha256", "completed_rounds", "task", "round", "tensors", "tensors_bytes",
             "tensors_sha256", "ledger", "elapsed_seconds", "metrics"))
"""``RUN_DIR/checkpoints/round-NNNNNN.json`` (written by :func:`fedtalora.fed.rundir.save`). Its ``metrics``
(the run's history so far) is checked where it is read, by :meth:`fedtalora.fed.history.History.from_dict`,
the one definition of what ``metrics.json`` holds."""

PARTITIONS = Obj({
    "dataset": Str(), "split": Str(), "num_clients": Int(min=1), "partition": Obj(),
    "tasks": List(Obj({
        "task": _COUNT, "classes": List(Int(min=0)),
        "clients": List(Obj({"client": _COUNT, "num_samples": _COUNT, "indices": List(Int(min=0)),
                             "class_counts": Map(_COUNT, int_keys=True)},
                            required=("client", "indices"))),
    }, required=("task", "clients"))),
}, required=("num_clients", "tasks"))
"""``RUN_DIR/partitions.json`` (the partition manifest Flower clients read)."""

EXPORT_INFO = Obj({
    "format": Str(non_empty=True), "fedtalora": Str(), "run_dir": Str(), "backbone": Str(non_empty=True),
    "timm_kwargs": Obj(), "num_classes": Int(min=1), "image_size": Int(min=1),
    "mean": List(Float(), min_len=3, max_len=3), "std": List(Float(min=0.0), min_len=3, max_len=3),
    "class_order": Maybe(List(Int(min=0))),
    "lora": Obj({"rank": Int(min=1), "alpha": Float(), "layers": List(Str())}),
    "files": Obj({"merged": Str(non_empty=True), "base": Str(non_empty=True), "adapter": Str(non_empty=True)}),
}, required=("format", "backbone", "timm_kwargs", "num_classes", "files"))
"""``OUT/export.json`` (written by :func:`fedtalora.app.export.export`)."""

FINAL_META = Obj({
    "format": Str(non_empty=True), "fedtalora": Str(), "num_classes": Str(non_empty=True),
    "fingerprint": Str(non_empty=True), "config_sha256": Str(non_empty=True, max_len=128),
}, required=("format", "num_classes", "fingerprint"))
"""The string metadata of ``final_model.safetensors`` (safetensors metadata values are strings;
``num_classes`` must spell a positive integer and ``fingerprint`` a JSON object of floats: see
:func:`final_meta_problem`)."""


def final_meta_problem(meta: Mapping[str, str]) -> str | None:
    """:data:`FINAL_META`, plus what the strings must spell."""
    import json

    why = problem(dict(meta), FINAL_META)
    if why is not None:
        return why
    n = meta["num_classes"]
    if not (n.isdigit() and len(n) < 10 and int(n) >= 1):
        return f"num_classes must spell an integer >= 1, got {short(n, 40)}"
    try:
        fp = json.loads(meta["fingerprint"])
    except (ValueError, RecursionError):
        return "fingerprint is not valid JSON"
    return problem(fp, Map(Float(finite=False)))


def load_checked(path: Any, schema: Schema, *, error: Any, what: str | None = None,
                 check: Any = None) -> Any:
    """Read the JSON file ``path`` with :func:`fedtalora.safeio.read_json` (regular file, UTF-8, size and
    depth limits) and check it against ``schema`` (or with ``check(doc) -> str | None``); one-line ``error`` naming the file and the first bad field otherwise.

    The one call a reader of a run document needs::

        state = load_checked(json_path, CHECKPOINT, error=CheckpointError, what=f"checkpoint {json_path}")
    """
    from .safeio import read_json

    label = what if what is not None else str(path)
    doc = read_json(path, what=label, error=error)
    why = check(doc) if check is not None else problem(doc, schema)
    if why is not None:
        raise error(f"{label} is malformed: {why}")
    return doc
