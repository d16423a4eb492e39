"""Checkpoint and resume: a run killed at any point and resumed ends exactly like an uninterrupted one.

"Exactly" means: ``metrics.json`` equal except the timing fields (``engine.TIMING_FIELDS``), and the
final checkpoint (global LoRA + head, every adapted base weight) equal byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedtalora.api import run
from fedtalora.app.cli import main
from fedtalora.config import resolve
from fedtalora.fed import rundir
from fedtalora.fed.history import TIMING_FIELDS, without_timing

# 2 tasks x 3 rounds; 3 of 4 clients per round; LoRA dropout (the model's own randomness) and
# injected faults on, so that every kind of state a round leaves behind has to survive a resume.
TASKS, ROUNDS = 2, 3
TOTAL = TASKS * ROUNDS
EXTRA = ["fed.rounds_per_task=3", "fed.num_clients=4", "fed.clients_per_round=3", "lora.dropout=0.1",
         "faults.client_dropout=0.15", "faults.corrupt_update=0.15", "fed.min_clients=2"]


@pytest.fixture(scope="module")
def overrides(tiny_overrides) -> list[str]:
    return [*tiny_overrides, *EXTRA]


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run: its metrics and the bytes of its final checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    m = run(resolve("tiny-vit", overrides), run_dir=run_dir).metrics
    assert m["complete"] is True
    rel = m["reliability"]
    assert rel["dropped_clients"] and rel["rejected_updates"], "the faults must actually happen in this config"
    return {"metrics": m, "tensors": _final_tensors(run_dir), "run_dir": run_dir}


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    path = rundir.latest_path(run_dir)
    assert path is not None and path.name == f"round-{TOTAL:06d}.json"
    return load_file(path.with_suffix(".safetensors"))


def _latest_round(run_dir: Path) -> int:
    path = rundir.latest_path(run_dir)
    return 0 if path is None else int(path.stem.split("-")[1])


def _assert_same_as_reference(run_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["complete"] is True
    assert without_timing(m) == without_timing(reference["metrics"])
    got, expected = _final_tensors(run_dir), reference["tensors"]
    assert set(got) == set(expected)
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ
    return m


class _Crash(Exception):
    pass


def _crash_at(index: int):
    """A progress callback that raises while round ``index`` (0-based over the run) ends, before it is
    checkpointed: what a crash in the middle of that round leaves behind."""

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "round" and event["task"] * ROUNDS + event["round"] == index:
            raise _Crash

    return progress


def test_without_timing_drops_exactly_the_timing_fields(reference) -> None:
    m = reference["metrics"]
    assert TIMING_FIELDS == ("wall_seconds", "rounds[*].seconds", "rounds[*].method_server_seconds",
                             "tasks[*].seconds")
    stripped = without_timing(m)
    assert set(m) - set(stripped) == {"wall_seconds"}
    assert all(set(a) - set(b) == {"seconds", "method_server_seconds"}
               for a, b in zip(m["rounds"], stripped["rounds"], strict=True))
    assert all(set(a) - set(b) == {"seconds"} for a, b in zip(m["tasks"], stripped["tasks"], strict=True))
    assert "seconds" in m["rounds"][0]  # the input is not modified
    # the method's server time (e.g. target's generator training) is a timing field; its sample counts are not
    timed = {**m, "rounds": [{**r, "method_server_seconds": 1.5, "synthetic_samples": 3} for r in m["rounds"]]}
    assert all(set(a) - set(b) == {"seconds", "method_server_seconds"}
               for a, b in zip(timed["rounds"], without_timing(timed)["rounds"], strict=True))


def test_sigkill_at_a_random_round_then_resume(overrides, reference, tmp_path, cli_env) -> None:
    """A real process, killed with SIGKILL once the checkpoint of a random round exists (plus a random
    few milliseconds, so the kill lands anywhere in the next round, writes included)."""
    rng = random.Random()
    target, delay = rng.randint(1, TOTAL - 1), rng.uniform(0.0, 0.03)
    info = f"(killed after round {target} + {delay * 1000:.0f} ms)"
    run_dir = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtalora", "run", "tiny-vit", "--quiet", *overrides,
             f"output.dir={tmp_path}", "output.name=killed"],
            env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            deadline = time.monotonic() + 300  # a guard against a hung child, not a timing assertion
            while _latest_round(run_dir) < target:
                assert proc.poll() is None, f"the run ended before it could be killed {info}"
                assert time.monotonic() < deadline, f"no checkpoint {target} appeared {info}"
                time.sleep(0.002)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, info
    resumed_from = _latest_round(run_dir)
    assert target <= resumed_from < TOTAL, info
    if (run_dir / "metrics.json").exists():  # absent when the kill landed between round 1's checkpoint and it
        assert json.loads((run_dir / "metrics.json").read_text())["complete"] is False

    assert main(["resume", str(run_dir), "--quiet"]) == 0, info
    _assert_same_as_reference(run_dir, reference)
    state = json.loads(rundir.latest_path(run_dir).read_text())
    assert state["resumes"] == [{"completed_rounds": resumed_from}], info


@pytest.mark.parametrize("crash", [0, ROUNDS - 1, ROUNDS + 1])
def test_crash_in_any_round_then_resume(crash: int, overrides, reference, tmp_path) -> None:
    """0: before any checkpoint (resume starts over); ROUNDS-1: in the last round of task 0, before its
    evaluation; ROUNDS+1: in the middle of task 1."""
    cfg = resolve("tiny-vit", overrides)
    run_dir = tmp_path / "run"
    with pytest.raises(_Crash):
        run(cfg, run_dir=run_dir, progress=_crash_at(crash))
    assert _latest_round(run_dir) == crash
    events: list[dict[str, Any]] = []
    run(resolve("tiny-vit", overrides), run_dir=run_dir, progress=events.append, resume=True)
    _assert_same_as_reference(run_dir, reference)
    # Only the rounds after the checkpoint ran again.
    rounds = [(e["task"], e["round"]) for e in events if e["event"] == "round"]
    assert rounds == [(t, r) for t in range(TASKS) for r in range(ROUNDS)][crash:]
    assert events[0]["completed_rounds"] == crash


def test_resume_of_a_finished_run_changes_nothing(overrides, reference, tmp_path) -> None:
    run_dir = tmp_path / "done"
    run(resolve("tiny-vit", overrides), run_dir=run_dir)
    events: list[dict[str, Any]] = []
    run(resolve("tiny-vit", overrides), run_dir=run_dir, progress=events.append, resume=True)
    assert not [e for e in events if e["event"] in ("client", "round", "task")]
    _assert_same_as_reference(run_dir, reference)


def test_torn_writes_are_ignored(overrides, reference, tmp_path) -> None:
    """A crash while writing round k+1 leaves temporary files, or the tensors of k+1 without their JSON
    (the JSON is written last): resume continues from round k."""
    run_dir = tmp_path / "run"
    with pytest.raises(_Crash):
        run(resolve("tiny-vit", overrides), run_dir=run_dir, progress=_crash_at(3))
    folder = run_dir / rundir.DIRNAME
    (folder / "round-000004.safetensors").write_bytes(b"half a file")
    (folder / "round-000004.json.tmp").write_text('{"format": 1, "complet')
    (run_dir / "metrics.json.tmp").write_text("{")
    assert _latest_round(run_dir) == 3
    run(resolve("tiny-vit", overrides), run_dir=run_dir, resume=True)
    _assert_same_as_reference(run_dir, reference)
    assert not list(folder.glob("*.tmp"))


def test_keep_all_and_none(overrides, reference, tmp_path) -> None:
    every = tmp_path / "all"
    run(resolve("tiny-vit", [*overrides, "output.checkpoints=all"]), run_dir=every)
    names = sorted(p.name for p in (every / rundir.DIRNAME).iterdir())
    assert names == sorted([f"round-{i:06d}.{ext}" for i in range(1, TOTAL + 1) for ext in ("json", "safetensors")])
    # Each one is a valid, verified checkpoint of its round.
    cfg = resolve("tiny-vit", [*overrides, "output.checkpoints=all"]).to_dict()
    for i in range(1, TOTAL + 1):
        ck = rundir.load(every / rundir.DIRNAME / f"round-{i:06d}.json", cfg)
        assert ck.completed_rounds == i and len(ck.metrics["rounds"]) == i
        assert (ck.task, ck.round) == divmod(i - 1, ROUNDS)

    none = tmp_path / "none"
    cfg_none = resolve("tiny-vit", [*overrides, "output.checkpoints=none"])
    with pytest.raises(_Crash):
        run(cfg_none, run_dir=none, progress=_crash_at(4))
    assert not (none / rundir.DIRNAME).exists()
    run(cfg_none, run_dir=none, resume=True)  # nothing to resume from: starts over, same result
    m = json.loads((none / "metrics.json").read_text())
    assert without_timing(m) == without_timing(reference["metrics"])


def test_run_with_resume_flag_and_matching_config(overrides, reference, tmp_path, capsys) -> None:
    run_dir = tmp_path / "flag"
    with pytest.raises(_Crash):
        run(resolve("tiny-vit", [*overrides, f"output.dir={tmp_path}", "output.name=flag"]), run_dir=run_dir,
            progress=_crash_at(2))
    # Other output.* values are fine: --resume names the directory.
    assert main(["run", "tiny-vit", *overrides, "output.name=elsewhere", "--quiet", "--resume", str(run_dir)]) == 0
    assert str(run_dir) in capsys.readouterr().out
    _assert_same_as_reference(run_dir, reference)
    assert not (tmp_path / "elsewhere").exists()


def test_checkpoint_contents(reference, overrides) -> None:
    """The tensors are the global trainable state and the adapted base weights; the JSON names them."""
    run_dir = reference["run_dir"]
    ck = rundir.load_latest(run_dir, resolve("tiny-vit", overrides).to_dict())
    assert ck is not None and ck.completed_rounds == TOTAL and (ck.task, ck.round) == (TASKS - 1, ROUNDS - 1)
    assert len(ck.base) == 8  # 2 blocks x qkv, proj, fc1, fc2
    assert all(".lora_A" in k or ".lora_B" in k or k.startswith("head.") for k in ck.global_state)
    assert all(torch.isfinite(t).all() for t in [*ck.global_state.values(), *ck.base.values()])
    assert ck.metrics["rounds"] == json.loads(json.dumps(ck.metrics["rounds"]))
    assert ck.ledger["cumulative"] and all(len(v) == TOTAL + 1 for v in ck.ledger["cumulative"].values())
    # The exact base: the float64 accumulator D of every adapted layer, from which the base is materialised.
    assert set(ck.exact) == set(ck.base) and all(d.dtype == torch.float64 for d in ck.exact.values())
    w0 = _fresh_bases(overrides)
    for layer, d in ck.exact.items():
        assert d.abs().sum() > 0 and torch.equal((w0[layer].double() + d).float(), ck.base[layer]), layer


def _fresh_bases(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The adapted layers' base weights as a run of ``overrides`` builds them (``W0`` of its exact base)."""
    from fedtalora.fed.build import prepare

    model = prepare(resolve("tiny-vit", overrides)).model
    return {p.layer: model.base_weight(p.layer).detach().clone() for p in model.lora_pairs()}


def _rewrite_checkpoint(json_path: Path, tensors: dict[str, torch.Tensor], **fields: Any) -> None:
    """Replace a checkpoint's tensors (and JSON fields), keeping its size and checksum consistent."""
    import hashlib

    from safetensors.torch import save

    state = json.loads(json_path.read_text())
    blob = save(tensors, metadata={"format": str(fields.get("format", state["format"]))})
    (json_path.parent / state["tensors"]).write_bytes(blob)
    state.update(tensors_bytes=len(blob), tensors_sha256=hashlib.sha256(blob).hexdigest(), **fields)
    json_path.write_text(json.dumps(state))


def test_a_checkpoint_whose_accumulator_does_not_round_to_its_base_is_refused(overrides, tmp_path) -> None:
    from fedtalora.errors import CheckpointError

    run_dir = tmp_path / "run"
    with pytest.raises(_Crash):
        run(resolve("tiny-vit", overrides), run_dir=run_dir, progress=_crash_at(2))
    path = rundir.latest_path(run_dir)
    tensors = load_file(path.with_suffix(".safetensors"))
    key = next(k for k in tensors if k.startswith("exact/"))
    tensors[key] = tensors[key] + 1e-3
    _rewrite_checkpoint(path, tensors)
    with pytest.raises(CheckpointError, match="does not round to its stored base weight"):
        run(resolve("tiny-vit", overrides), run_dir=run_dir, resume=True)


def test_a_format_1_checkpoint_still_resumes(overrides, reference, tmp_path) -> None:
    """A checkpoint written before the exact base (format 1: base weights only) resumes with D = b - W0: the
    rounds it holds are kept, the run completes with its errors at float32 resolution, and ends within a few
    float32 roundings of the uninterrupted run (which kept D exactly from the start)."""
    run_dir = tmp_path / "v1"
    with pytest.raises(_Crash):
        run(resolve("tiny-vit", overrides), run_dir=run_dir, progress=_crash_at(ROUNDS + 1))
    path = rundir.latest_path(run_dir)
    tensors = {k: v for k, v in load_file(path.with_suffix(".safetensors")).items() if not k.startswith("exact/")}
    _rewrite_checkpoint(path, tensors, format=1)
    assert rundir.load(path, resolve("tiny-vit", overrides).to_dict()).exact == {}
    m = run(resolve("tiny-vit", overrides), run_dir=run_dir, resume=True).metrics
    ref = reference["metrics"]
    assert m["complete"] and without_timing(m)["rounds"][:ROUNDS + 1] == without_timing(ref)["rounds"][:ROUNDS + 1]
    assert all(r["aggregation_error_rounding"] <= 2 and r["aggregation_error_accumulated_rounding"] <= 2
               for r in m["rounds"] if not r["skipped"])
    final, expected = _final_tensors(run_dir), reference["tensors"]
    for key, t in expected.items():
        if key.startswith("base/"):
            assert (final[key] - t).abs().max() <= 4 * 2.0 ** -24 * t.abs().max(), key
