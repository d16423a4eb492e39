"""The run directory as the commands see it (:mod:`fedtalora.app.runfiles`): empty means nothing but the lock,
``output.overwrite=true`` deletes a run's files and nothing else, and ``resume`` knows a complete run and a
config edited after its results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedtalora.app.runfiles import (
    RUN_FILES,
    RUN_FOLDERS,
    check_overwrite,
    clear_for_overwrite,
    entries,
    final_config_sha256,
    is_empty,
    resume_state,
    writer_lock,
)
from fedtalora.config import resolve
from fedtalora.errors import ConfigError
from fedtalora.fed.rundir import FINAL_MODEL, config_fingerprint
from fedtalora.runlock import LOCK_NAME, RunLock


def _tree(root: Path, files: list[str], folders: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_text(name)
    for name in folders:
        (root / name).mkdir()
        (root / name / "inside.bin").write_bytes(b"x")


def test_empty_means_nothing_but_the_lock(tmp_path: Path) -> None:
    assert is_empty(tmp_path / "missing") and entries(tmp_path / "missing") == []
    with RunLock(tmp_path):
        assert is_empty(tmp_path) and (tmp_path / LOCK_NAME).exists()
        (tmp_path / "metrics.json").write_text("{}")
        assert not is_empty(tmp_path) and [p.name for p in entries(tmp_path)] == ["metrics.json"]


@pytest.mark.parametrize("seed", range(6))
def test_overwrite_deletes_every_run_file_and_only_run_files(tmp_path: Path, seed: int) -> None:
    """Property: any subset of a run's files and folders is deleted (the lock stays); one foreign entry among
    them refuses the whole directory and deletes nothing."""
    rng = np.random.default_rng(seed)
    files = [f for f in RUN_FILES if rng.random() < 0.6] + (["metrics.json.123.ab.tmp"] if rng.random() < 0.5 else [])
    folders = [f for f in RUN_FOLDERS if rng.random() < 0.6]
    run = tmp_path / "run"
    _tree(run, files, folders)
    (run / LOCK_NAME).write_text("1\n")
    foreign = tmp_path / "foreign"
    _tree(foreign, files, folders)
    (foreign / "thesis.tex").write_text("mine")
    assert sorted(clear_for_overwrite(run)) == sorted(files + folders)
    assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    before = sorted(p.name for p in foreign.iterdir())
    with pytest.raises(ConfigError, match="'thesis.tex', which is not a file fedtalora writes"):
        clear_for_overwrite(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == before


def test_overwrite_hand_examples(tmp_path: Path) -> None:
    (tmp_path / "a" / "partitions.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match="partitions.json is a directory, not the file a run writes"):
        check_overwrite(tmp_path / "a")
    _tree(tmp_path / "b", ["checkpoints"], [])
    with pytest.raises(ConfigError, match="checkpoints is not a folder"):
        check_overwrite(tmp_path / "b")
    assert clear_for_overwrite(tmp_path / "empty") == []


def test_the_writer_lock_is_taken_unless_a_flower_server_app_takes_it(tmp_path: Path) -> None:
    with writer_lock(tmp_path, "inprocess"), pytest.raises(ConfigError, match="in use by process"):
        RunLock(tmp_path).acquire()
    with writer_lock(tmp_path, "flower"):  # the ServerApp, on the SuperLink's machine, holds it
        RunLock(tmp_path).acquire().release()


def test_resume_state(tmp_path: Path, tiny_overrides, run_documents) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(run_documents["run_dir"], run_dir)
    cfg = resolve("tiny-vit", [*tiny_overrides, "output.checkpoints=none"])  # output.* is not part of the fingerprint
    edited = resolve("tiny-vit", [*tiny_overrides, "train.lr=0.5"])
    assert final_config_sha256(run_dir) == config_fingerprint(cfg.to_dict())
    done = resume_state(run_dir, cfg)
    assert done is not None and done.complete and done.to_dict() == run_documents["metrics"]
    with pytest.raises(ConfigError, match="complete, but its config.yaml was edited"):
        resume_state(run_dir, edited)
    partial = json.loads(next((run_dir / "checkpoints").glob("round-000001.json")).read_text())["metrics"]
    (run_dir / "metrics.json").write_text(json.dumps(partial))
    assert resume_state(run_dir, edited) is None  # not complete: the checkpoint's own fingerprint decides
    (run_dir / "metrics.json").write_text("{not json")
    assert resume_state(run_dir, cfg) is None  # unreadable results: the checkpoint decides
    (run_dir / "metrics.json").unlink()
    assert resume_state(run_dir, cfg) is None  # no results yet


def test_a_final_model_without_a_fingerprint_is_taken_as_it_is(tmp_path: Path, tiny_overrides, run_documents) -> None:
    """An older fedtalora's complete run (no ``config_sha256`` in the final model), or one whose final model is gone:
    complete is complete, nothing to resume."""
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    shutil.copytree(run_documents["run_dir"], run_dir)
    meta = {k: v for k, v in run_documents["meta"].items() if k != "config_sha256"}
    save_file(load_file(str(run_dir / FINAL_MODEL)), str(run_dir / FINAL_MODEL), metadata=meta)
    edited = resolve("tiny-vit", [*tiny_overrides, "train.lr=0.5"])
    assert final_config_sha256(run_dir) is None and resume_state(run_dir, edited) is not None
    (run_dir / FINAL_MODEL).write_bytes(b"not safetensors")
    assert final_config_sha256(run_dir) is None and resume_state(run_dir, edited) is not None
