"""Schemas of the JSON documents fedtalora reads back (:mod:`fedtalora.schema`), the finite check of
tensors (:mod:`fedtalora.integrity`) and the run-directory lock (:mod:`fedtalora.runlock`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedtalora import checkpoint
from fedtalora.config import resolve
from fedtalora.engine import run
from fedtalora.errors import CheckpointError, ConfigError
from fedtalora.integrity import LARGE_UPDATE_RATIO, first_nonfinite, nonfinite_message, relative_update_norm
from fedtalora.runlock import LOCK_NAME, RunLock
from fedtalora.schema import (
    CHECKPOINT,
    EXPORT_INFO,
    METRICS,
    PARTITIONS,
    Float,
    Int,
    List,
    Map,
    Maybe,
    Obj,
    Str,
    check_metrics,
    final_meta_problem,
    load_checked,
    problem,
)
from fedtalora.state import FINAL_MODEL

# --- real documents ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents(tiny_overrides, tmp_path_factory) -> dict[str, Any]:
    """Every JSON document of a finished tiny run, its export, and the final model's metadata."""
    from fedtalora.export import export

    run_dir = tmp_path_factory.mktemp("docs") / "run"
    run(resolve("demo", [*tiny_overrides, "output.checkpoints=all"]), run_dir=run_dir)
    exported = export(run_dir)
    with safe_open(str(run_dir / FINAL_MODEL), framework="pt") as f:
        meta = dict(f.metadata())
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "checkpoint": json.loads(checkpoint.latest_path(run_dir).read_text()),
        "first_checkpoint": json.loads((run_dir / "checkpoints" / "round-000001.json").read_text()),
        "partitions": json.loads((run_dir / "partitions.json").read_text()),
        "export": json.loads(exported.info.read_text()),
        "meta": meta,
        "run_dir": run_dir,
    }


SCHEMAS = {"metrics": METRICS, "checkpoint": CHECKPOINT, "first_checkpoint": CHECKPOINT, "partitions": PARTITIONS,
           "export": EXPORT_INFO}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_what_fedtalora_writes_passes_its_schema(documents, name: str) -> None:
    assert problem(documents[name], SCHEMAS[name]) is None
    assert check_metrics(documents["metrics"]) is None
    assert final_meta_problem(documents["meta"]) is None


def _leaves(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every value in a document (containers included), depth first."""
    out = [path] if path else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _leaves(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _leaves(v, (*path, i))
    return out


def _covered(schema: Any, path: tuple[Any, ...]) -> Any:
    """The schema that governs ``path`` (None where the document is free-form)."""
    for part in path:
        while isinstance(schema, Maybe):
            schema = schema.inner
        if isinstance(schema, Obj) and isinstance(part, str):
            schema = schema.fields.get(part)
        elif isinstance(schema, List) and isinstance(part, int):
            schema = schema.item
        elif isinstance(schema, Map) and isinstance(part, str):
            schema = schema.value
        else:
            return None
        if schema is None:
            return None
    while isinstance(schema, Maybe):
        schema = schema.inner
    return schema


def _wrong_value(schema: Any) -> Any:
    """A value of the wrong JSON type for ``schema``."""
    if isinstance(schema, (Int, Float)):
        return "x"
    if isinstance(schema, Str):
        return 7
    if isinstance(schema, (List,)):
        return {"not": "a list"}
    if isinstance(schema, (Obj, Map)):
        return [1, 2]
    return None  # bool: None is not a bool either


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("seed", range(3))
def test_any_field_of_the_wrong_type_is_named(documents, name: str, seed: int) -> None:
    """Property: replacing any schema-governed value of a real document by a value of another JSON type
    is reported, naming that field (``rounds[3].train_loss``, ``ledger.dense``, ...)."""
    doc, schema = documents[name], SCHEMAS[name]
    paths = [p for p in _leaves(doc) if _covered(schema, p) is not None]
    assert len(paths) > 5
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(paths), size=min(40, len(paths)), replace=False):
        path = paths[int(i)]
        bad_value = _wrong_value(_covered(schema, path))
        why = problem(_set(doc, path, bad_value), schema)
        assert why is not None, path
        assert why.startswith(str(path[0])), (why, path)
        at = why.split(" must ")[0]
        assert all(str(p) in at for p in path), (why, path)  # names the field, Map keys as ['key']


def test_schema_hand_examples() -> None:
    assert problem({"completed_rounds": "x"}, Obj({"completed_rounds": Int(min=1)})) == \
        "completed_rounds must be an integer >= 1, got 'x'"
    assert problem({"rounds": [1, 2]}, METRICS) == "rounds[0] must be an object, got 1"
    assert problem({"metrics": []}, Obj({"metrics": METRICS})) == "metrics must be an object, got []"
    assert problem({"a": 1}, Obj(required=("a", "b"))) == "the document lacks 'b'"
    assert problem([1], Obj()) == "the document must be an object, got [1]"
    assert problem(True, Int()) is not None and problem(True, Float()) is not None  # a bool is not a number
    assert problem(float("nan"), Float()) is not None and problem(float("nan"), Float(finite=False)) is None
    assert problem(float("inf"), Float(finite=False)) is None
    assert problem(1.5, Float(min=0.0, max=1.0)) == "must be a finite number in [0, 1], got 1.5".replace(
        "must", "the document must")
    assert problem({"1": 2, "x": 3}, Map(Int(), int_keys=True)) == "the document has the key 'x', expected integers"
    assert problem({"a": "s" * 300}, Obj({"a": Str(max_len=10)})) == "a must be at most 10 characters long, got 300"
    assert problem([1, 2, 3], List(Int(), max_len=2)) == "the document must hold at most 2 item(s), got 3"
    assert problem({"complete": True}, METRICS) is None
    assert check_metrics({"complete": True}).startswith("says complete but lacks 'rounds'")
    assert final_meta_problem({"format": "f", "num_classes": "abc", "fingerprint": "{}"}).startswith("num_classes")
    assert final_meta_problem({"format": "f", "num_classes": "3", "fingerprint": "{not"}) == \
        "fingerprint is not valid JSON"
    assert final_meta_problem({"format": "f", "num_classes": "3"}) == "the document lacks 'fingerprint'"


def test_load_checked_names_the_file_and_the_field(documents, tmp_path: Path) -> None:
    path = tmp_path / "round-000004.json"
    state = dict(documents["checkpoint"], completed_rounds="x")
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as info:
        load_checked(path, CHECKPOINT, error=CheckpointError, what=f"checkpoint {path}")
    assert str(info.value) == (f"checkpoint {path} is malformed: completed_rounds must be an integer >= 1, "
                               "got 'x'")
    path.write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checked(path, CHECKPOINT, error=CheckpointError)
    path.write_text(json.dumps(documents["checkpoint"]))
    assert load_checked(path, CHECKPOINT, error=CheckpointError) == documents["checkpoint"]


# --- finite tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_first_nonfinite_finds_the_first_bad_tensor_and_counts_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    tensors = {f"t{i}": torch.randn(int(rng.integers(1, 5)), int(rng.integers(1, 5)), generator=g) for i in range(n)}
    tensors["ints"] = torch.arange(6)
    assert first_nonfinite(tensors) is None and nonfinite_message(tensors, "x") is None
    bad = int(rng.integers(0, n))
    flat = tensors[f"t{bad}"].view(-1)
    k = int(rng.integers(1, flat.numel() + 1))
    positions = rng.choice(flat.numel(), size=k, replace=False)
    flat[torch.from_numpy(positions)] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
        torch.from_numpy(rng.integers(0, 3, size=k))]
    later = [i for i in range(bad + 1, n)]
    if later:  # a later bad tensor must not be reported first
        tensors[f"t{later[0]}"].view(-1)[0] = float("nan")
    assert first_nonfinite(tensors) == (f"t{bad}", k)


def test_first_nonfinite_hand_example() -> None:
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]]),
               "c": torch.tensor([float("nan")])}
    assert first_nonfinite(tensors) == ("b", 2)
    assert first_nonfinite(list(tensors.items())[:1]) is None
    assert nonfinite_message(tensors, "model.checkpoint='w.pth'") == (
        "model.checkpoint='w.pth': tensor 'b' has 2 non-finite value(s) (NaN or infinity); refusing to use it")
    assert first_nonfinite({"h": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}) == ("h", 1)


def test_relative_update_norm_hand_example() -> None:
    g = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # ||g|| = 5
    u = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([[12.0]])}  # ||u - g|| = sqrt(36 + 64) = 10
    assert relative_update_norm(u, g) == 2.0
    assert relative_update_norm(g, g) == 0.0
    zero = {"a": torch.zeros(2)}
    assert relative_update_norm(zero, zero) == 0.0 and relative_update_norm({"a": torch.ones(2)}, zero) == float("inf")


@pytest.mark.parametrize("seed", range(10))
def test_relative_update_norm_properties(seed: int) -> None:
    """Property: invariant to scaling update and state together; a 'scale' fault (the difference times
    1000) multiplies it by 1000 and crosses LARGE_UPDATE_RATIO from any ordinary update."""
    gen = torch.Generator().manual_seed(seed)
    g = {f"k{i}": torch.randn(3, 4, generator=gen) for i in range(3)}
    u = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    r = relative_update_norm(u, g)
    assert 0 < r < 1
    c = float(torch.rand(1, generator=gen)) * 10 + 0.1
    assert relative_update_norm({k: c * v for k, v in u.items()}, {k: c * v for k, v in g.items()}) == \
        pytest.approx(r, rel=1e-6)  # the scaled float32 tensors round
    scaled = {k: g[k] + 1000 * (u[k] - g[k]) for k in g}
    assert relative_update_norm(scaled, g) == pytest.approx(1000 * r, rel=1e-6)
    assert relative_update_norm(scaled, g) > LARGE_UPDATE_RATIO * r


# --- the run-directory lock -------------------------------------------------------------------------


def test_a_second_writer_is_refused_in_one_line(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError) as info:
            RunLock(tmp_path).acquire()
        msg = str(info.value)
        assert "\n" not in msg and f"is in use by process {os.getpid()}" in msg and str(tmp_path) in msg
    with RunLock(tmp_path) as again:  # released on exit
        assert again.held
    assert not again.held


def test_the_lock_dies_with_its_holder_even_on_sigkill(tmp_path: Path) -> None:
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from fedtalora.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), src], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {proc.pid}"):
            RunLock(tmp_path).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while True:  # the kernel drops the lock with the process
            try:
                RunLock(tmp_path).acquire().release()
                break
            except ConfigError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def test_lock_on_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot lock the run directory .*No such file"):
        RunLock(tmp_path / "nope").acquire()
