"""Trackers fed by the engine's events (rounds.csv, tasks.csv, TensorBoard) and run provenance."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtalora.api import run
from fedtalora.app.cli import main
from fedtalora.config import resolve
from fedtalora.errors import ConfigError
from fedtalora.fed.build import git_commit, provenance
from fedtalora.fed.tracking import CSVTracker, check_tensorboard


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tiny_overrides, tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("tracking") / "run"
    events: list[dict[str, Any]] = []
    metrics = run(resolve("tiny-vit", [*tiny_overrides, "output.checkpoints=none"]), run_dir=run_dir,
                  progress=events.append).metrics
    return {"run_dir": run_dir, "metrics": metrics, "events": events}


def test_csv_files_equal_metrics_json(tiny_run) -> None:
    m = json.loads((tiny_run["run_dir"] / "metrics.json").read_text())
    rounds = _rows(tiny_run["run_dir"] / "rounds.csv")
    assert len(rounds) == len(m["rounds"]) == 4
    for i, (row, rec) in enumerate(zip(rounds, m["rounds"], strict=True)):
        assert int(row["global_round"]) == i
        assert (int(row["task"]), int(row["round"])) == (rec["task"], rec["round"])
        for key in ("train_loss", "aggregation_error", "aggregation_error_rounding", "aggregation_error_accumulated",
                    "aggregation_error_accumulated_rounding", "naive_aggregation_loss", "seconds"):
            assert float(row[key]) == rec[key], key
        for key in ("uplink_bytes", "downlink_bytes", "residual_bytes_dense", "residual_bytes_factored"):
            assert int(row[key]) == rec[key], key
        assert [int(c) for c in row["clients"].split()] == rec["clients"]
        assert [int(n) for n in row["num_samples"].split()] == rec["num_samples"]
    tasks = _rows(tiny_run["run_dir"] / "tasks.csv")
    assert len(tasks) == 2
    for row, rec in zip(tasks, m["tasks"], strict=True):
        assert float(row["seen_accuracy"]) == rec["seen_accuracy"]
        assert float(row["seconds"]) == rec["seconds"]
        for j in range(2):
            expected = rec["accuracy"][j] if j < len(rec["accuracy"]) else None
            assert (float(row[f"acc_task_{j}"]) if row[f"acc_task_{j}"] else None) == expected


def test_engine_events_and_end(tiny_run) -> None:
    kinds = [e["event"] for e in tiny_run["events"]]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("round") == 4 and kinds.count("task") == 2 and kinds.count("client") == 12
    task = next(e for e in tiny_run["events"] if e["event"] == "task")
    assert {"task", "classes", "accuracy", "seen_accuracy", "seconds"} <= set(task)


def test_environment_is_self_describing(tiny_run) -> None:
    env = tiny_run["metrics"]["environment"]
    assert env["device"] == "cpu"
    for key in ("fedtalora", "python", "torch", "timm", "peft", "numpy"):
        assert env[key], key
    assert tiny_run["metrics"]["seed"] == 0
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert env["git_commit"] == head.strip()
        assert isinstance(env["git_dirty"], bool)


def test_git_commit_outside_a_checkout_is_empty(tmp_path) -> None:
    assert git_commit(tmp_path) == {}
    assert "git_commit" not in provenance("cpu") or len(provenance("cpu")["git_commit"]) == 40


def _round(t: int, r: int, loss: float) -> dict[str, Any]:
    return {"event": "round", "task": t, "round": r, "clients": [0], "num_samples": [5], "train_loss": loss,
            "aggregation_error": 0.0, "uplink_bytes": 1, "downlink_bytes": 2, "seconds": 0.1}


def test_csv_tracker_on_resume_replaces_replayed_rounds(tmp_path) -> None:
    """A resumed run continues the files: rows before the checkpoint stay, later ones are rewritten."""
    tr = CSVTracker(tmp_path)
    tr({"event": "start", "num_tasks": 2, "rounds_per_task": 2, "clients_per_round": 1, "completed_rounds": 0})
    for i, (t, r) in enumerate([(0, 0), (0, 1), (1, 0)]):
        tr(_round(t, r, float(i)))
    tr({"event": "task", "task": 0, "accuracy": [0.5], "seen_accuracy": 0.5, "seconds": 1.0})
    # The process dies after round (1, 0) ran but before its checkpoint: the resume starts at 2 rounds.
    tr2 = CSVTracker(tmp_path)
    tr2({"event": "start", "num_tasks": 2, "rounds_per_task": 2, "clients_per_round": 1, "completed_rounds": 2})
    tr2(_round(1, 0, 10.0))
    tr2(_round(1, 1, 11.0))
    rows = _rows(tmp_path / "rounds.csv")
    assert [(r["task"], r["round"], float(r["train_loss"])) for r in rows] == [
        ("0", "0", 0.0), ("0", "1", 1.0), ("1", "0", 10.0), ("1", "1", 11.0)]
    assert [r["task"] for r in _rows(tmp_path / "tasks.csv")] == ["0"]
    # A fresh run in the same directory (output.overwrite) starts the files over.
    tr3 = CSVTracker(tmp_path)
    tr3({"event": "start", "num_tasks": 2, "rounds_per_task": 2, "clients_per_round": 1, "completed_rounds": 0})
    tr3(_round(0, 0, 7.0))
    assert [float(r["train_loss"]) for r in _rows(tmp_path / "rounds.csv")] == [7.0]
    assert _rows(tmp_path / "tasks.csv") == []


def test_tensorboard_missing_is_one_line_before_any_work(tiny_overrides, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = resolve("tiny-vit", [*tiny_overrides, "output.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"pip install fedtalora\[tensorboard\]"):
        check_tensorboard(cfg)
    rc = main(["run", "tiny-vit", *tiny_overrides, "output.tensorboard=true", f"output.dir={tmp_path}", "output.name=tb"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err == ("fedtalora: error: output.tensorboard=true needs TensorBoard: "
                   "pip install fedtalora[tensorboard]\n")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_events(tiny_overrides, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    m = run(resolve("tiny-vit", [*tiny_overrides, "output.tensorboard=true", "output.checkpoints=none"]),
            run_dir=run_dir).metrics
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("round/train_loss")
    assert [e.step for e in losses] == [0, 1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in m["rounds"]], rel=1e-6)
    seen = acc.Scalars("task/seen_accuracy")
    assert [e.value for e in seen] == pytest.approx(m["seen_accuracy"], rel=1e-6)
    assert [e.value for e in acc.Scalars("task/accuracy_task_0")] == pytest.approx(
        [row[0] for row in m["accuracy_matrix"]], rel=1e-6)
