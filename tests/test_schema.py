"""Schemas of the JSON documents fedtalora reads back (:mod:`fedtalora.schema`): the combinators, the documents
a run writes (checkpoint state, ``partitions.json``, ``export.json``, the final model's metadata) and
:func:`~fedtalora.schema.for_type`, which derives the schema of a typed record (``metrics.json``: see
``tests/fed/test_history.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedtalora.errors import CheckpointError
from fedtalora.schema import (
    CHECKPOINT,
    EXPORT_INFO,
    PARTITIONS,
    AnyValue,
    Bool,
    Float,
    Int,
    List,
    Map,
    Maybe,
    Obj,
    Str,
    final_meta_problem,
    for_type,
    load_checked,
    problem,
)

SCHEMAS = {"checkpoint": CHECKPOINT, "first_checkpoint": CHECKPOINT, "partitions": PARTITIONS, "export": EXPORT_INFO}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_what_fedtalora_writes_passes_its_schema(run_documents, name: str) -> None:
    assert problem(run_documents[name], SCHEMAS[name]) is None
    assert final_meta_problem(run_documents["meta"]) is None


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("seed", range(3))
def test_any_field_of_the_wrong_type_is_named(run_documents, wrong_types, name: str, seed: int) -> None:
    """Property: replacing any schema-governed value of a real document by a value of another JSON type
    is reported, naming that field (``ledger.dense``, ``tasks[0].clients[2].indices``, ...)."""
    schema = SCHEMAS[name]
    for path, edited in wrong_types.cases(run_documents[name], schema, seed):
        why = problem(edited, schema)
        assert why is not None, path
        assert why.startswith(str(path[0])), (why, path)
        at = why.split(" must ")[0]
        assert all(str(p) in at for p in path), (why, path)  # names the field, Map keys as ['key']


def test_schema_hand_examples() -> None:
    assert problem({"completed_rounds": "x"}, Obj({"completed_rounds": Int(min=1)})) == \
        "completed_rounds must be an integer >= 1, got 'x'"
    assert problem({"metrics": []}, Obj({"metrics": CHECKPOINT.fields["metrics"]})) == "metrics must be an object, got []"
    assert problem({"a": 1}, Obj(required=("a", "b"))) == "the document lacks 'b'"
    assert problem([1], Obj()) == "the document must be an object, got [1]"
    assert problem(True, Int()) is not None and problem(True, Float()) is not None  # a bool is not a number
    assert problem(float("nan"), Float()) is not None and problem(float("nan"), Float(finite=False)) is None
    assert problem(float("inf"), Float(finite=False)) is None
    assert problem(1.5, Float(min=0.0, max=1.0)) == "the document must be a finite number in [0, 1], got 1.5"
    assert problem({"1": 2, "x": 3}, Map(Int(), int_keys=True)) == "the document has the key 'x', expected integers"
    assert problem({"a": "s" * 300}, Obj({"a": Str(max_len=10)})) == "a must be at most 10 characters long, got 300"
    assert problem([1, 2, 3], List(Int(), max_len=2)) == "the document must hold at most 2 item(s), got 3"
    assert final_meta_problem({"format": "f", "num_classes": "abc", "fingerprint": "{}"}).startswith("num_classes")
    assert final_meta_problem({"format": "f", "num_classes": "3", "fingerprint": "{not"}) == \
        "fingerprint is not valid JSON"
    assert final_meta_problem({"format": "f", "num_classes": "3"}) == "the document lacks 'fingerprint'"


def test_load_checked_names_the_file_and_the_field(run_documents, tmp_path: Path) -> None:
    path = tmp_path / "round-000004.json"
    state = dict(run_documents["checkpoint"], completed_rounds="x")
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as info:
        load_checked(path, CHECKPOINT, error=CheckpointError, what=f"checkpoint {path}")
    assert str(info.value) == (f"checkpoint {path} is malformed: completed_rounds must be an integer >= 1, "
                               "got 'x'")
    path.write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checked(path, CHECKPOINT, error=CheckpointError)
    path.write_text(json.dumps(run_documents["checkpoint"]))
    assert load_checked(path, CHECKPOINT, error=CheckpointError) == run_documents["checkpoint"]


# --- schemas derived from types ---------------------------------------------------------------------


@dataclass
class _Inner:
    n: int = 0
    share: float = field(default=0.0, metadata={"schema": Float(min=0.0, max=1.0)})


@dataclass
class _Record:
    name: str = ""
    flag: bool = False
    maybe: float | None = None
    items: list[_Inner] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    anything: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def test_for_type_hand_example() -> None:
    schema = for_type(_Record, ints=Int(min=0))
    assert schema == Obj({
        "name": Str(), "flag": Bool(), "maybe": Maybe(Float(finite=False)),
        "items": List(Obj({"n": Int(min=0), "share": Float(min=0.0, max=1.0)})),
        "table": Map(Int(min=0)), "free": Obj(), "anything": AnyValue(),
    })  # ``extra`` holds a record's unknown fields: never checked
    assert problem({"items": [{"n": 1}, {"n": -1}]}, schema) == "items[1].n must be an integer >= 0, got -1"
    assert problem({"items": [{"share": 2}]}, schema) == "items[0].share must be a finite number in [0, 1], got 2"
    assert problem({"maybe": None, "table": {"a": 1}, "free": {"x": [1]}, "anything": [{}]}, schema) is None
    assert problem({"table": {"a": "b"}}, schema) == "table['a'] must be an integer >= 0, got 'b'"
    with pytest.raises(TypeError, match="no JSON schema"):
        for_type(tuple[int, int])


@pytest.mark.parametrize(("hint", "good", "bad"), [
    (int, 3, 3.0), (float, 3, "3"), (bool, False, 0), (str, "", None), (list[str], ["a"], ["a", 1]),
    (int | None, None, "x"), (dict[str, float], {"a": 1.5}, {"a": None}), (list[list[int]], [[1], []], [[1], 1]),
])
def test_for_type_accepts_its_type_and_refuses_others(hint: Any, good: Any, bad: Any) -> None:
    assert problem(good, for_type(hint)) is None
    assert problem(bad, for_type(hint)) is not None
