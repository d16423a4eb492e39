"""Tests of the command line: an end-to-end run, the run directory's files, and one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedtalora.app.cli import main
from fedtalora.config import from_dict, resolve
from fedtalora.data import load_digits
from fedtalora.methods import METHODS

# The tiny run (see conftest): 2 tasks x 2 rounds, 3 clients all sampled every round, LoRA rank 4 on
# qkv/proj/fc1/fc2 of 2 blocks of width 32 (MLP 128), head 32 -> 10.
NUM_TASKS, ROUNDS, CLIENTS, RANK = 2, 2, 3, 4
LAYERS = {"qkv": (96, 32), "proj": (32, 32), "fc1": (128, 32), "fc2": (32, 128)}  # (d_out, d_in)
LORA_PARAMS = 2 * sum(RANK * (d_out + d_in) for d_out, d_in in LAYERS.values())
HEAD_PARAMS = 32 * 10 + 10
CLIENT_BYTES = 4 * (LORA_PARAMS + HEAD_PARAMS)
# Per block and round, the residual of the exact base travels as the K live clients' factors (float32
# B_k, A_k: (d_out + d_in) K r floats) and their weights (K float64), or dense as the float64 accumulator D
# (d_out d_in doubles); a client receives per layer the smaller of the two.
FACTORED = {name: 4 * (d_out + d_in) * CLIENTS * RANK + 8 * CLIENTS for name, (d_out, d_in) in LAYERS.items()}
DENSE = {name: 8 * d_out * d_in for name, (d_out, d_in) in LAYERS.items()}
RESIDUAL_CATCH_UP = 2 * sum(min(FACTORED[name], DENSE[name]) for name in LAYERS)
RESIDUAL_DENSE = 2 * sum(DENSE.values())
RESIDUAL_FACTORED = 2 * sum(FACTORED.values())
ROUND_KEYS = {"task", "round", "clients", "aggregation_error", "uplink_bytes", "downlink_bytes", "seconds"}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fedtalora: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --- end to end through the real entry point ------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(run_cli, tiny_overrides, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("e2e")
    overrides = [*tiny_overrides, f"output.dir={out}", "output.name=e2e"]
    rc, stdout, stderr = run_cli(["run", "tiny-vit", *overrides], cwd=out)
    run_dir = out / "e2e"
    res: dict[str, Any] = {"rc": rc, "stdout": stdout, "stderr": stderr, "run_dir": run_dir,
                           "overrides": overrides}
    if rc == 0:
        res["metrics"] = json.loads((run_dir / "metrics.json").read_text())
        res["partitions"] = json.loads((run_dir / "partitions.json").read_text())
    return res


def test_e2e_exit_code_and_files(e2e) -> None:
    assert e2e["rc"] == 0, e2e["stderr"]
    assert "Traceback" not in e2e["stderr"]
    assert sorted(p.name for p in e2e["run_dir"].iterdir()) == [
        ".fedtalora.lock", "checkpoints", "config.yaml", "final_model.safetensors", "metrics.json", "partitions.json",
        "rounds.csv", "tasks.csv"]  # the lock file stays (the lock itself died with the process)
    # output.checkpoints=latest (the default): only the final round's checkpoint is kept.
    last = f"round-{NUM_TASKS * ROUNDS:06d}"
    assert sorted(p.name for p in (e2e["run_dir"] / "checkpoints").iterdir()) == [
        f"{last}.json", f"{last}.safetensors"]
    cfg = from_dict(yaml.safe_load((e2e["run_dir"] / "config.yaml").read_text()))
    assert cfg == resolve("tiny-vit", e2e["overrides"])


def test_e2e_metrics(e2e) -> None:
    assert e2e["rc"] == 0, e2e["stderr"]
    m = e2e["metrics"]
    assert m["complete"] is True and m["pretrained"] is False and m["method"] == "fedtalora"
    acc = m["accuracy_matrix"]
    assert len(acc) == NUM_TASKS and all(len(row) == NUM_TASKS for row in acc)
    for t, row in enumerate(acc):
        for j, v in enumerate(row):
            if j > t:
                assert v is None
            else:
                assert isinstance(v, float) and 0.0 <= v <= 1.0
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting"):
        assert isinstance(m[key], float), key
    # F_AA is the accuracy over all classes after the last task: the last row weighted by test sizes.
    digits = load_digits(seed=0)
    sizes = [int(np.isin(digits.test.labels, t["classes"]).sum()) for t in e2e["partitions"]["tasks"]]
    assert m["final_average_accuracy"] == pytest.approx(np.average(acc[-1], weights=sizes))
    assert m["average_incremental_accuracy"] == pytest.approx(np.mean(m["seen_accuracy"]))
    assert m["forgetting"] == pytest.approx(acc[0][0] - acc[1][0])
    assert m["trainable_parameters"] == LORA_PARAMS + HEAD_PARAMS


def test_e2e_rounds_errors_and_bytes(e2e) -> None:
    assert e2e["rc"] == 0, e2e["stderr"]
    m = e2e["metrics"]
    rounds = m["rounds"]
    assert len(rounds) == NUM_TASKS * ROUNDS
    assert [(r["task"], r["round"]) for r in rounds] == [(t, r) for t in range(NUM_TASKS) for r in range(ROUNDS)]
    for i, r in enumerate(rounds):
        assert ROUND_KEYS <= set(r), set(r)
        assert r["clients"] == list(range(CLIENTS))  # all 3 of 3 sampled
        assert 0.0 <= r["aggregation_error"] <= 1e-5  # fed.residual=true (the default): exact ...
        assert 0.0 <= r["aggregation_error_rounding"] <= 2  # ... to float32 resolution, per round
        assert 0.0 <= r["aggregation_error_accumulated_rounding"] <= 2  # and since the start
        assert r["uplink_bytes"] == CLIENTS * CLIENT_BYTES
        # Round 0 sends only the state; afterwards each client also catches up one round's residual.
        expected_down = CLIENTS * CLIENT_BYTES + (CLIENTS * RESIDUAL_CATCH_UP if i > 0 else 0)
        assert r["downlink_bytes"] == expected_down
        # The same downlink with the residual always sent dense, and the round's residual in both encodings.
        assert r["downlink_bytes_dense"] == CLIENTS * CLIENT_BYTES + (CLIENTS * RESIDUAL_DENSE if i > 0 else 0)
        assert r["residual_bytes_dense"] == RESIDUAL_DENSE
        assert r["residual_bytes_factored"] == RESIDUAL_FACTORED
        assert r["seconds"] >= 0
    for key in ("aggregation_error", "aggregation_error_rounding", "aggregation_error_accumulated",
                "aggregation_error_accumulated_rounding"):
        assert m[f"max_{key}"] == max(r[key] for r in rounds), key
    assert m["uplink_bytes_total"] == NUM_TASKS * ROUNDS * CLIENTS * CLIENT_BYTES
    for key in ("downlink_bytes", "downlink_bytes_dense", "residual_bytes_dense", "residual_bytes_factored"):
        assert m[f"{key}_total"] == sum(r[key] for r in rounds), key
    assert m["downlink_bytes_total"] < m["downlink_bytes_dense_total"]


def test_e2e_partitions(e2e) -> None:
    assert e2e["rc"] == 0, e2e["stderr"]
    p = e2e["partitions"]
    tasks = p["tasks"]
    assert len(tasks) == NUM_TASKS
    labels = load_digits(seed=0).train.labels
    all_classes: list[int] = []
    for t, task in enumerate(tasks):
        assert task["task"] == t
        all_classes += task["classes"]
        clients = task["clients"]
        assert [c["client"] for c in clients] == list(range(CLIENTS))
        seen: set[int] = set()
        for c in clients:
            idx = c["indices"]
            assert len(idx) == c["num_samples"] >= 5  # partition.min_samples
            assert seen.isdisjoint(idx), "clients of a task must hold disjoint samples"
            seen.update(idx)
            classes, counts = np.unique(labels[idx], return_counts=True)
            assert c["class_counts"] == {str(k): int(n) for k, n in zip(classes, counts, strict=True)}
            assert set(classes.tolist()) <= set(task["classes"])
        assert seen == set(np.flatnonzero(np.isin(labels, task["classes"])).tolist())
    assert sorted(all_classes) == list(range(10))


def test_e2e_stdout(e2e) -> None:
    assert e2e["rc"] == 0, e2e["stderr"]
    out = e2e["stdout"]
    for needle in ("F_AA", "AIA", "forgetting", "max aggregation error", "uplink per round"):
        assert needle in out
    assert "not pretrained" in out.lower()
    assert str(e2e["run_dir"]) in out
    m = e2e["metrics"]
    assert f"{m['final_average_accuracy']:.4f}" in out


def test_run_in_process_matches_subprocess(e2e, tiny_overrides, tmp_path, capsys) -> None:
    """A run is reproducible across processes: in-process ``main`` equals the ``e2e`` subprocess run."""
    assert e2e["rc"] == 0, e2e["stderr"]
    rc = main(["run", "tiny-vit", *tiny_overrides, f"output.dir={tmp_path}", "output.name=again", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m["accuracy_matrix"] == e2e["metrics"]["accuracy_matrix"]
    assert [r["train_loss"] for r in m["rounds"]] == [r["train_loss"] for r in e2e["metrics"]["rounds"]]
    assert json.loads((tmp_path / "again" / "partitions.json").read_text()) == e2e["partitions"]
    assert str(tmp_path / "again") in captured.out


# The demo preset, shrunk to a few seconds: 4 training / 2 test utterances per intent, 2 clients, LoRA in layer 0,
# a small random expansion. Still the pre-trained MiniLM, the shipped data and 7 tasks x 11 intents.
SMALL_DEMO = ["data.train_per_class=4", "data.test_per_class=2", "fed.num_clients=2", "fed.clients_per_round=2",
              "partition.min_samples=1", "lora.blocks=[0]", "classifier.projection_dim=64"]


def test_demo_command_is_run_demo(tmp_path, capsys) -> None:
    """``fedtalora demo`` is ``fedtalora run demo``: the pre-trained MiniLM on the shipped Banking77 subset."""
    runs = {}
    for name, argv in (("demo", ["demo"]), ("run", ["run", "demo"])):
        rc = main([*argv, *SMALL_DEMO, f"output.dir={tmp_path}", f"output.name={name}", "--quiet"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        runs[name] = (json.loads((tmp_path / name / "metrics.json").read_text()), captured.out)
    (m, out), (m_run, out_run) = runs["demo"], runs["run"]
    assert m["accuracy_matrix"] == m_run["accuracy_matrix"] and len(m["accuracy_matrix"]) == 7
    assert [r["train_loss"] for r in m["rounds"]] == [r["train_loss"] for r in m_run["rounds"]]

    def same(text: str, run_dir: Path) -> list[str]:  # the summary, less its run directory and wall time
        return [line for line in text.replace(str(run_dir), "RUN_DIR").splitlines() if not line.startswith("wall time")]

    assert same(out, tmp_path / "demo") == same(out_run, tmp_path / "run")
    assert "all-MiniLM-L6-v2 (pre-trained" in out and "Banking77" in out and "CC BY 4.0" in out
    assert m["final_average_accuracy"] > 1 / 77  # better than chance even at this size
    assert "precomputed" not in out  # the shrunk config is not the reference's: no reference lines


def test_naive_averaging_has_aggregation_error(tiny_overrides) -> None:
    from fedtalora.api import run

    m = run(resolve("tiny-vit", [*tiny_overrides, "fed.residual=false"])).metrics
    errors = [r["aggregation_error"] for r in m["rounds"]]
    assert len(errors) == NUM_TASKS * ROUNDS
    assert max(errors) > 1e-5
    assert max(r["aggregation_error_rounding"] for r in m["rounds"]) > 100  # far beyond float32 rounding
    assert m["max_aggregation_error_accumulated"] is None  # no exact base without a residual to fold
    assert all(r["residual_bytes_factored"] == 0 for r in m["rounds"])
    assert all(r["downlink_bytes"] == r["uplink_bytes"] for r in m["rounds"])  # nothing to catch up


# --- user errors: one line, exit 2 ---------------------------------------------------------------

TINY = "<tiny>"
BAD_INPUTS: list[tuple[str, list[str], list[str]]] = [
    # (id, argv with {tmp} / <tiny> placeholders, words the message must contain)
    ("unknown-key", ["run", "tiny-vit", "fed.resdual=true"], ["fed.resdual", "did you mean", "residual"]),
    ("string-for-int", ["run", "tiny-vit", "fed.num_clients=abc"], ["fed.num_clients", "int"]),
    ("bool-for-int", ["run", "tiny-vit", "train.batch_size=true"], ["train.batch_size", "int"]),
    ("float-for-int", ["run", "tiny-vit", "lora.rank=1.5"], ["lora.rank", "int"]),
    ("int-for-bool", ["run", "tiny-vit", "fed.residual=1"], ["fed.residual", "bool"]),
    ("rank-0", ["run", "tiny-vit", "lora.rank=0"], ["lora.rank", ">= 1"]),
    ("beta-0", ["run", "tiny-vit", "partition.beta=0"], ["partition.beta", "> 0"]),
    ("beta-negative", ["run", "tiny-vit", "partition.beta=-1"], ["partition.beta", "> 0"]),
    ("clients-per-round", ["run", "tiny-vit", "fed.clients_per_round=9"], ["fed.clients_per_round", "fed.num_clients"]),
    ("partition-kind", ["run", "tiny-vit", "partition.kind=foo"], ["partition.kind", "dirichlet"]),
    ("lora-target", ["run", "tiny-vit", "lora.targets=[qkv,foo]"], ["lora.targets", "foo"]),
    ("lora-blocks-empty", ["run", "tiny-vit", "lora.blocks=[]"], ["lora.blocks", "non-empty"]),
    ("num-tasks-0", ["run", "tiny-vit", "scenario.num_tasks=0"], ["scenario.num_tasks"]),
    ("unknown-preset", ["run", "no_such_preset"], ["no_such_preset", "tiny-vit"]),
    ("missing-file", ["run", "{tmp}/missing.yaml"], ["missing.yaml", "does not exist"]),
    ("yaml-syntax", ["run", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    ("yaml-list", ["run", "{tmp}/list.yaml"], ["list.yaml", "mapping"]),
    ("no-equals", ["run", "tiny-vit", "fedresidual"], ["fedresidual", "key=value"]),
    ("empty-key", ["run", "tiny-vit", "=3"], ["empty key"]),
    ("not-a-section", ["run", "tiny-vit", "seed.x=1"], ["seed", "section"]),
    ("unknown-method", ["run", "tiny-vit", "method=nope"], ["method", "nope", "fedtalora"]),
    ("exemplar-free-memory", ["run", "tiny-vit", "method=target", "method_options.memory_per_class=5"],
     ["memory_per_class", "exemplar-free"]),
    ("device", ["run", "tiny-vit", "train.device=tpu"], ["train.device", "tpu"]),
    ("demo-subcommand", ["demo", "lora.rank=-2"], ["lora.rank"]),
    # Errors raised after the config validated (dataset, partition, model, run directory).
    ("num-tasks-too-many", ["run", "tiny-vit", TINY, "scenario.num_tasks=11"], ["scenario.num_tasks", "10 classes"]),
    ("unknown-dataset", ["run", "tiny-vit", TINY, "data.dataset=nope"], ["dataset", "nope", "digits"]),
    ("quantity-alpha", ["run", "tiny-vit", TINY, "scenario.num_tasks=5", "partition.kind=quantity",
                        "partition.alpha=5"], ["partition.alpha", "2 classes"]),
    ("min-samples", ["run", "tiny-vit", TINY, "fed.num_clients=500", "fed.clients_per_round=2"],
     ["partition.min_samples", "fed.num_clients"]),
    ("block-out-of-range", ["run", "tiny-vit", TINY, "lora.blocks=[7]"], ["lora.blocks", "2 blocks"]),
    ("backbone", ["run", "tiny-vit", TINY, "model.backbone=not_a_model"], ["model.backbone", "not_a_model"]),
    ("model-kwargs", ["run", "tiny-vit", TINY, "model.kwargs={foo: 1}"], ["model.kwargs", "foo"]),
    ("checkpoint", ["run", "tiny-vit", TINY, "model.checkpoint={tmp}/nope.pth"], ["model.checkpoint", "nope.pth"]),
    ("cifar-missing", ["run", "tiny-vit", TINY, "data.dataset=cifar100", "data.root={tmp}/empty"],
     ["CIFAR-100", "cifar-100-python.tar.gz", "empty"]),
    ("run-dir-exists", ["run", "tiny-vit", TINY, "output.name=exists"], ["exists", "output.overwrite"]),
]


@pytest.fixture
def bad_inputs_dir(tmp_path: Path) -> Path:
    (tmp_path / "bad.yaml").write_text("fed: {num_clients: 3\n  x: [\n")
    (tmp_path / "list.yaml").write_text("- seed\n- 1\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "runs" / "exists").mkdir(parents=True)
    (tmp_path / "runs" / "exists" / "keep.txt").write_text("mine")
    return tmp_path


def _argv(template: list[str], tmp: Path, tiny: list[str]) -> list[str]:
    argv: list[str] = []
    if TINY in template:  # errors after logging starts: --quiet keeps INFO progress lines off stderr
        argv += [template[0], "--quiet"]
        template = template[1:]
    for a in template:
        if a == TINY:
            argv += [*tiny, f"output.dir={tmp}/runs"]
        else:
            argv.append(a.replace("{tmp}", str(tmp)))
    return argv


@pytest.mark.parametrize(("argv", "words"), [pytest.param(a, w, id=i) for i, a, w in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(argv, words, bad_inputs_dir, tiny_overrides, capsys) -> None:
    rc = main(_argv(argv, bad_inputs_dir, tiny_overrides))
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = _one_error_line(captured.err)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert captured.out == ""
    assert (bad_inputs_dir / "runs" / "exists" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(("argv", "prog", "word"), [
    pytest.param([], "fedtalora", "command", id="no-subcommand"),
    pytest.param(["frobnicate"], "fedtalora", "frobnicate", id="unknown-subcommand"),
    pytest.param(["run", "tiny-vit", "--bogus"], "fedtalora", "--bogus", id="unknown-flag"),
    pytest.param(["presets", "x"], "fedtalora", "unrecognized", id="extra-arg"),
    # argparse reports errors of a subcommand's own arguments under the subcommand's prog.
    pytest.param(["run"], "fedtalora run", "PRESET_OR_PATH", id="missing-preset"),
])
def test_argparse_errors_are_one_line_exit_2(argv, prog, word, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: ") and word in lines[0]
    assert captured.out == ""


def test_real_entry_point_errors(run_cli, tiny_overrides, tmp_path) -> None:
    # A config error: exactly one line.
    rc, out, err = run_cli(["run", "tiny-vit", "fed.resdual=true"], cwd=tmp_path)
    assert rc == 2 and out == ""
    assert "did you mean" in _one_error_line(err)
    # An argparse error: exactly one line.
    rc, out, err = run_cli([], cwd=tmp_path)
    assert rc == 2 and out == ""
    assert "required" in _one_error_line(err)
    # An error raised while building the partition, after logging started. Without a terminal the
    # CLI logs progress at INFO on stderr, so only the last line is the error; every other line is
    # a log record.
    rc, out, err = run_cli(["run", "tiny-vit", *tiny_overrides, "scenario.num_tasks=5", "partition.kind=quantity",
                            "partition.alpha=5", f"output.dir={tmp_path}"], cwd=tmp_path)
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("fedtalora: error: partition.alpha=5")
    assert all(" INFO " in line or " WARNING " in line for line in lines[:-1]), err


# --- listing commands -----------------------------------------------------------------------------


def test_presets_lists_tiny_vit(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "tiny-vit" in names
    line = next(line for line in out.splitlines() if line.startswith("tiny-vit"))
    assert "digits" in line and "not the demo" in line  # the preset's one-line description


def test_presets_lists_the_demo_first(capsys) -> None:
    assert main(["presets"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split()[0] == "demo" and "pre-trained" in first and "Banking77" in first


def test_methods_lists_fedtalora_and_planned(capsys) -> None:
    assert main(["methods"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    by_name = {line.split()[0]: line for line in lines}
    assert "fedtalora" in by_name and "(planned)" not in by_name["fedtalora"]
    planned = set(METHODS.planned())  # none at the moment
    assert planned <= set(by_name)
    for name in planned:
        assert "(planned)" in by_name[name]
    assert set(by_name) == planned | set(METHODS.names())


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip().startswith("fedtalora ")
