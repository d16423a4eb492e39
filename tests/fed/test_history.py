"""``metrics.json`` and its one definition, the typed records of :mod:`fedtalora.fed.history`: what a run writes
reads back identically, and a document whose fields do not have the records' types is refused by
:meth:`History.from_dict` / :func:`load_history` with one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtalora.errors import CheckpointError, DataError
from fedtalora.fed.history import History, RoundRecord, TaskRecord, history_problem, load_history
from fedtalora.schema import Float, Int, Maybe, Obj, for_type


def test_what_a_run_writes_reads_back_identically(run_documents) -> None:
    doc = run_documents["metrics"]
    assert history_problem(doc) is None
    history = History.from_dict(doc)
    assert history.complete and history.to_dict() == doc
    checkpoint_metrics = run_documents["checkpoint"]["metrics"]  # the history inside the last checkpoint
    assert History.from_dict(checkpoint_metrics).to_dict() == checkpoint_metrics


@pytest.mark.parametrize("seed", range(4))
def test_any_field_of_the_wrong_type_is_named(run_documents, wrong_types, seed: int) -> None:
    """Property: replacing any typed value of a real ``metrics.json`` by a value of another JSON type is refused,
    naming the field (``rounds[3].train_loss``, ``tasks[1].classes[0]``, ``reliability['skipped_rounds']``)."""
    schema = for_type(History, ints=Int(min=0))
    for path, edited in wrong_types.cases(run_documents["metrics"], schema, seed):
        with pytest.raises(ValueError) as info:
            History.from_dict(edited)
        why = str(info.value)
        assert "\n" not in why and why.startswith(str(path[0])), (why, path)
        assert all(str(p) in why.split(" must ")[0] for p in path), (why, path)


def test_the_schema_is_the_records_own_fields() -> None:
    """Adding a field to a record adds it to the check: no second list of metrics.json's fields exists."""
    schema = for_type(History, ints=Int(min=0))
    assert isinstance(schema, Obj)
    names = {f for f in History.__dataclass_fields__ if f != "extra"}
    assert set(schema.fields) == names
    rounds = schema.fields["rounds"].item  # type: ignore[attr-defined]
    assert set(rounds.fields) == {f for f in RoundRecord.__dataclass_fields__ if f != "extra"}
    tasks = schema.fields["tasks"].item  # type: ignore[attr-defined]
    assert set(tasks.fields) == {f for f in TaskRecord.__dataclass_fields__ if f != "extra"}
    assert schema.fields["final_average_accuracy"] == Maybe(Float(min=0.0, max=1.0))


def test_history_hand_examples() -> None:
    assert history_problem({"rounds": [1, 2]}) == "rounds[0] must be an object, got 1"
    assert history_problem({"seed": True}) == "seed must be an integer >= 0, got True"
    assert history_problem({"tasks": [{"task": "x"}]}) == "tasks[0].task must be an integer >= 0, got 'x'"
    assert history_problem({"accuracy_matrix": [[0.5, None], [1.5]]}) == \
        "accuracy_matrix[1][0] must be a finite number in [0, 1], got 1.5"
    assert history_problem({"rounds": [{"train_loss": float("nan")}]}) is None  # a diverged loss is a measurement
    assert history_problem([]) == "the document must be an object, got []"
    assert history_problem({"complete": True, "final_average_accuracy": 0.25}) is None  # a sparse engine's record
    assert history_problem({"future_field": {"x": 1}}) is None  # files of a newer fedtalora still read
    assert History.from_dict({"future_field": 1}).extra == {"future_field": 1}


def test_load_history_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"rounds": [{"task": -1}]}))
    with pytest.raises(CheckpointError) as info:
        load_history(path)
    assert str(info.value) == f"{path} is not a fedtalora metrics file: rounds[0].task must be an integer >= 0, got -1"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_history(path, error=DataError)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_history(tmp_path / "missing.json")
    path.write_text(json.dumps({"method": "fedtalora", "seed": 3}))
    assert load_history(path).seed == 3
