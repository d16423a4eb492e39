"""Reliability through the command line: bad input of every kind (config values, files, run
directories, checkpoints) is one line on stderr and exit code 2 and changes nothing; a run with injected
faults completes and reports them; the same config gives the same metrics; nothing we read unpickles
arbitrary objects.

The config-error table of ``test_cli.py`` covers the core keys; this one covers the rest (reliability
keys, remaining domains, files, resume) without repeating those cases.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtalora.api import run
from fedtalora.app.cli import main
from fedtalora.config import resolve
from fedtalora.fed import rundir
from fedtalora.fed.history import without_timing
from fedtalora.runlock import LOCK_NAME

SRC = Path(__file__).resolve().parents[2] / "src" / "fedtalora"


def _one_error_line(err: str, prog: str = "fedtalora") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --- a finished tiny run to damage ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_overrides, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(resolve("tiny-vit", [*tiny_overrides, f"output.dir={run_dir.parent}", "output.name=run"]), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def interrupted_run(finished_run, tmp_path_factory) -> Path:
    """``finished_run`` as it was after its last checkpoint, before its end (the checkpoint's metrics, no final
    model): ``resume`` continues it from that checkpoint (a complete run it would leave alone)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(json.loads(_latest(run_dir).read_text())["metrics"]))
    (run_dir / rundir.FINAL_MODEL).unlink()
    return run_dir


def _latest(run_dir: Path) -> Path:
    path = rundir.latest_path(run_dir)
    assert path is not None
    return path


def _edit_json(path: Path, **changes: Any) -> None:
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def _rewrite_tensors(run_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors of the latest checkpoint and update its size and checksum (a consistent,
    well-formed checkpoint that does not fit the model)."""
    js = _latest(run_dir)
    st = js.with_suffix(".safetensors")
    tensors = st_load(st.read_bytes())
    edit(tensors)
    blob = st_save(tensors)
    st.write_bytes(blob)
    _edit_json(js, tensors_bytes=len(blob), tensors_sha256=hashlib.sha256(blob).hexdigest())


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "none": lambda d: None,
    "json-garbage": lambda d: _latest(d).write_text("{not json"),
    "json-binary": lambda d: _latest(d).write_bytes(b"\xff\xfe\x00garbage"),
    "json-unreadable": lambda d: _replace_with_dir(_latest(d)),
    "json-fields": lambda d: _latest(d).write_text('{"format": 1}'),
    "json-format": lambda d: _edit_json(_latest(d), format=99),
    "tensors-truncated": lambda d: _latest(d).with_suffix(".safetensors").write_bytes(
        _latest(d).with_suffix(".safetensors").read_bytes()[:100]),
    "tensors-flipped": lambda d: _flip_byte(_latest(d).with_suffix(".safetensors")),
    "tensors-missing": lambda d: _latest(d).with_suffix(".safetensors").unlink(),
    "tensors-outside": lambda d: _edit_json(_latest(d), tensors="../../config.yaml"),
    "tensors-not-safetensors": lambda d: _rewrite_tensors(d, lambda t: None) or _edit_json(
        _latest(d), tensors_bytes=5, tensors_sha256=hashlib.sha256(b"hello").hexdigest()) or
        _latest(d).with_suffix(".safetensors").write_bytes(b"hello"),
    "tensor-missing-key": lambda d: _rewrite_tensors(d, lambda t: t.pop("global/head.bias")),
    "tensor-wrong-shape": lambda d: _rewrite_tensors(d, lambda t: t.update({"global/head.bias": torch.zeros(3)})),
    "tensor-foreign-group": lambda d: _rewrite_tensors(d, lambda t: t.update({"optimizer/x": torch.zeros(1)})),
    "method-state": lambda d: _rewrite_tensors(d, lambda t: t.update({"method/x": torch.zeros(1)})),
    "ledger": lambda d: _edit_json(_latest(d), ledger={"dense": {"nope": 1}}),
    "other-config": lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace(
        "seed: 0", "seed: 1", 1)),
    "config-invalid": lambda d: (d / "config.yaml").write_text("fed: [\n"),
    "config-unknown-key": lambda d: (d / "config.yaml").write_text(
        (d / "config.yaml").read_text() + "bogus_section: 1\n"),
    "config-missing": lambda d: (d / "config.yaml").unlink(),
    "partitions": lambda d: (d / "partitions.json").write_text(
        (d / "partitions.json").read_text().replace('"indices": [', '"indices": [100000, ', 1)),
}

RUN = "<run>"  # a copy of the finished run, damaged by the case's DAMAGE entry
TINY = "<tiny>"

# (id, damage, argv, words the single stderr line must contain)
BAD_INPUTS: list[tuple[str, str, list[str], list[str]]] = [
    # Config values: reliability keys and the domains test_cli's table does not try.
    ("dropout-above-1", "none", ["run", "tiny-vit", "faults.client_dropout=1.5"], ["faults.client_dropout", "[0, 1]"]),
    ("corrupt-negative", "none", ["run", "tiny-vit", "faults.corrupt_update=-0.1"], ["faults.corrupt_update", "[0, 1]"]),
    ("corrupt-nan", "none", ["run", "tiny-vit", "faults.corrupt_update=.nan"], ["faults.corrupt_update"]),
    ("corrupt-kind", "none", ["run", "tiny-vit", "faults.corrupt_kind=zeros"], ["faults.corrupt_kind", "nan", "shape"]),
    ("faults-scalar", "none", ["run", "tiny-vit", "faults=3"], ["faults", "mapping"]),
    ("faults-typo", "none", ["run", "tiny-vit", "faults.dropout=0.1"], ["faults.dropout", "faults.client_dropout"]),
    ("min-clients-0", "none", ["run", "tiny-vit", "fed.min_clients=0"], ["fed.min_clients", "fed.clients_per_round=5"]),
    ("min-clients-above", "none", ["run", "tiny-vit", "fed.min_clients=6"], ["fed.min_clients", "[1, "]),
    ("max-norm-negative", "none", ["run", "tiny-vit", "fed.max_update_norm=-1"], ["fed.max_update_norm", ">= 0"]),
    ("max-norm-string", "none", ["run", "tiny-vit", "fed.max_update_norm=big"], ["fed.max_update_norm", "float"]),
    ("checkpoints-kind", "none", ["run", "tiny-vit", "output.checkpoints=sometimes"], ["output.checkpoints", "latest"]),
    ("seed-negative", "none", ["run", "tiny-vit", "seed=-1"], ["seed", ">= 0"]),
    ("seed-float", "none", ["run", "tiny-vit", "seed=1e3"], ["seed", "int"]),
    ("lr-negative", "none", ["run", "tiny-vit", "train.lr=-0.1"], ["train.lr", ">= 0"]),
    ("momentum-1", "none", ["run", "tiny-vit", "train.momentum=1.0"], ["train.momentum", "[0, 1)"]),
    ("eval-batch-0", "none", ["run", "tiny-vit", "train.eval_batch_size=0"], ["train.eval_batch_size"]),
    ("precision", "none", ["run", "tiny-vit", "train.precision=fp16"], ["train.precision", "bf16"]),
    ("lora-dropout-1", "none", ["run", "tiny-vit", "lora.dropout=1"], ["lora.dropout", "[0, 1)"]),
    ("lora-alpha-0", "none", ["run", "tiny-vit", "lora.alpha=0"], ["lora.alpha", "> 0"]),
    ("lora-blocks-dup", "none", ["run", "tiny-vit", "lora.blocks=[0,0]"], ["lora.blocks", "distinct"]),
    ("image-size-0", "none", ["run", "tiny-vit", "data.image_size=0"], ["data.image_size", ">= 1"]),
    ("partition-alpha-0", "none", ["run", "tiny-vit", "partition.alpha=0"], ["partition.alpha", ">= 1"]),
    ("yaml-nested-unknown", "none", ["run", "{tmp}/nested.yaml"], ["fed.bogus"]),
    ("yaml-extends-unknown", "none", ["run", "{tmp}/extends.yaml"], ["nope_preset", "unknown preset"]),
    # Paths found missing only once the run starts.
    ("data-root-missing", "none", ["run", "tiny-vit", TINY, "data.dataset=cifar100", "data.root={tmp}/no/such/dir"],
     ["CIFAR-100", "not found", "no/such/dir"]),
    ("data-root-file", "none", ["run", "tiny-vit", TINY, "data.dataset=cifar100", "data.root={tmp}/nested.yaml"],
     ["CIFAR-100", "nested.yaml"]),
    ("output-dir-file", "none", ["run", "tiny-vit", TINY, "output.dir={tmp}/nested.yaml"],
     ["cannot create run directory", "nested.yaml"]),
    # Resume: the directory, its config, its checkpoint.
    ("resume-missing-dir", "none", ["resume", "{tmp}/nope"], ["nope", "no such run directory"]),
    ("resume-a-file", "none", ["resume", "{tmp}/nested.yaml"], ["nested.yaml", "not a run directory"]),
    ("resume-not-a-run", "none", ["resume", "{tmp}"], ["config.yaml", "not a fedtalora run directory"]),
    ("resume-config-missing", "config-missing", ["resume", RUN], ["config.yaml", "missing"]),
    ("resume-config-invalid", "config-invalid", ["resume", RUN], ["config.yaml", "not valid YAML"]),
    ("resume-config-unknown", "config-unknown-key", ["resume", RUN], ["config.yaml", "bogus_section"]),
    ("ckpt-json-garbage", "json-garbage", ["resume", RUN], ["round-000004.json", "corrupted", "JSON"]),
    ("ckpt-json-binary", "json-binary", ["resume", RUN], ["round-000004.json", "corrupted"]),
    ("ckpt-unreadable", "json-unreadable", ["resume", RUN], ["round-000004.json", "is a directory, not a file"]),
    ("ckpt-json-fields", "json-fields", ["resume", RUN], ["round-000004.json", "missing", "tensors_sha256"]),
    ("ckpt-format", "json-format", ["resume", RUN], ["round-000004.json", "format 99"]),
    ("ckpt-truncated", "tensors-truncated", ["resume", RUN], ["round-000004.safetensors", "corrupted"]),
    ("ckpt-bit-flip", "tensors-flipped", ["resume", RUN], ["round-000004.safetensors", "checksum"]),
    ("ckpt-tensors-missing", "tensors-missing", ["resume", RUN], ["round-000004.safetensors", "cannot be read"]),
    ("ckpt-tensors-outside", "tensors-outside", ["resume", RUN], ["round-000004.json", "outside"]),
    ("ckpt-not-safetensors", "tensors-not-safetensors", ["resume", RUN], ["round-000004.safetensors", "corrupted"]),
    ("ckpt-missing-tensor", "tensor-missing-key", ["resume", RUN],
     ["round-000004.json", "does not match the model", "head.bias"]),
    ("ckpt-wrong-shape", "tensor-wrong-shape", ["resume", RUN], ["round-000004.json", "head.bias", "(3,)", "(10,)"]),
    ("ckpt-foreign-tensor", "tensor-foreign-group", ["resume", RUN], ["round-000004.safetensors", "optimizer/x"]),
    ("ckpt-method-state", "method-state", ["resume", RUN], ["round-000004.json", "fedtalora", "keeps no checkpoint state"]),
    ("ckpt-ledger", "ledger", ["resume", RUN], ["round-000004.json", "ledger"]),
    ("ckpt-other-config", "other-config", ["resume", RUN], ["round-000004.json", "different config"]),
    ("partitions-changed", "partitions", ["resume", RUN], ["partitions.json", "differs"]),
    ("resume-flag-mismatch", "none", ["run", "tiny-vit", TINY, "seed=1", "--resume", RUN],
     ["--resume", "seed=1", "seed=0", "config.yaml", "fedtalora resume"]),
]

# Errors argparse reports (its own prog and wording), for the new arguments.
ARGPARSE_ERRORS: list[tuple[str, list[str], list[str]]] = [
    ("resume-no-dir", ["resume"], ["RUN_DIR"]),
    ("resume-override", ["resume", "{tmp}", "fed.num_clients=3"], ["unrecognized", "fed.num_clients=3"]),
    ("resume-flag-no-value", ["run", "tiny-vit", "--resume"], ["--resume", "expected one argument"]),
]


@pytest.fixture
def bad_dir(tmp_path: Path, interrupted_run: Path) -> Path:
    (tmp_path / "nested.yaml").write_text("extends: tiny-vit\nfed: {bogus: 1}\n")
    (tmp_path / "extends.yaml").write_text("extends: nope_preset\n")
    shutil.copytree(interrupted_run, tmp_path / "run")
    return tmp_path


def _argv(template: list[str], tmp: Path, tiny: list[str]) -> list[str]:
    argv: list[str] = [template[0], "--quiet"] if template[0] in ("run", "resume") and len(template) > 1 else []
    rest = template[1:] if argv else template
    for a in rest:
        if a == TINY:
            argv += [*tiny, f"output.dir={tmp}/runs"]
        else:
            argv.append(a.replace(RUN, str(tmp / "run")).replace("{tmp}", str(tmp)))
    return argv


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes (the run directory's lock file, which a writing command takes, is no content)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
            if p.name != LOCK_NAME}


def test_tables_are_big_and_new() -> None:
    ids = [c[0] for c in BAD_INPUTS] + [c[0] for c in ARGPARSE_ERRORS]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("damage", "argv", "words"),
                         [pytest.param(d, a, w, id=i) for i, d, a, w in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(damage, argv, words, bad_dir, tiny_overrides,
                                                          capsys) -> None:
    DAMAGE[damage](bad_dir / "run")
    before = _snapshot(bad_dir)
    rc = main(_argv(argv, bad_dir, tiny_overrides))
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = _one_error_line(captured.err)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert captured.out == ""
    assert _snapshot(bad_dir) == before, "a failed command must not change any file"


@pytest.mark.parametrize(("argv", "words"), [pytest.param(a, w, id=i) for i, a, w in ARGPARSE_ERRORS])
def test_argparse_errors_for_resume(argv, words, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    line = [x for x in captured.err.splitlines() if x.strip()]
    assert len(line) == 1 and "Traceback" not in captured.err, captured.err
    for w in words:
        assert w in line[0], (w, line[0])


def test_real_entry_point_corrupted_checkpoint(run_cli, interrupted_run, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_run, run_dir)
    DAMAGE["tensors-flipped"](run_dir)
    rc, out, err = run_cli(["resume", str(run_dir)], cwd=tmp_path)
    assert rc == 2 and out == ""
    assert "round-000004.safetensors" in _one_error_line(err)


def test_resume_of_the_intact_copy_works(bad_dir, tiny_overrides, capsys) -> None:
    """The table's cases fail because of their damage, not because of the copy."""
    assert main(["resume", str(bad_dir / "run"), "--quiet"]) == 0
    assert str(bad_dir / "run") in capsys.readouterr().out


# --- no pickle ------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tiny_overrides, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    torch.save({"state_dict": _Exploit(marker)}, evil)
    rc = main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"model.checkpoint={evil}", f"output.dir={tmp_path}/runs"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "model.checkpoint" in line and "weights.pth" in line
    assert not marker.exists(), "unpickling ran the payload"


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def test_source_reads_no_pickle() -> None:
    """Every ``torch.load`` in the package passes ``weights_only=True``; nothing calls ``pickle.load(s)``,
    ``np.load(allow_pickle=True)`` or ``torch.load`` through another name."""
    files = sorted(SRC.rglob("*.py"))
    assert files
    torch_loads = 0
    for path in files:
        for name, call in _calls(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.name}:{call.lineno}"
            kw = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                torch_loads += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"), where
            if name.endswith("np.load") or name.endswith("numpy.load"):
                v = kw.get("allow_pickle")
                assert v is None or (isinstance(v, ast.Constant) and v.value is False), where
    assert torch_loads >= 1  # the scan does see the .pth loaders


# --- faults through the CLI -----------------------------------------------------------------------


def test_fault_injection_run_completes_and_reports(run_cli, tiny_overrides, tmp_path) -> None:
    overrides = [*tiny_overrides, "fed.rounds_per_task=3", "faults.client_dropout=0.25", "faults.corrupt_update=0.3",
                 "faults.corrupt_kind=shape", "fed.min_clients=2", f"output.dir={tmp_path}", "output.name=faulty"]
    rc, out, err = run_cli(["run", "tiny-vit", *overrides], cwd=tmp_path)
    assert rc == 0, err
    assert "Traceback" not in err
    m = json.loads((tmp_path / "faulty" / "metrics.json").read_text())
    assert m["complete"] is True and math.isfinite(m["final_average_accuracy"])
    rel = m["reliability"]
    assert rel["dropped_clients"] > 0 and rel["corrupted_updates"] > 0 and rel["skipped_rounds"] > 0
    assert rel["rejected_updates"] == rel["corrupted_updates"]  # every shape corruption caught, nothing else
    # The counts are the seeded draws, client by client.
    from fedtalora.fed.faults import draw_fault

    cfg = resolve("tiny-vit", overrides)
    for r in m["rounds"]:
        fates = {k: draw_fault(cfg.faults, cfg.seed, r["task"], r["round"], k) for k in r["clients"]}
        assert r["dropped"] == [k for k, f in fates.items() if f.dropped]
        assert r["corrupted"] == [k for k, f in fates.items() if f.corrupted]
    # Each one was logged, with its reason, and the summary reports the totals.
    assert err.count("dropped out (injected fault)") == rel["dropped_clients"]
    assert err.count("rejected the update of client") == rel["rejected_updates"]
    assert err.count("round skipped") == rel["skipped_rounds"]
    assert "has shape" in err
    summary = (f"{rel['dropped_clients']} / {rel['corrupted_updates']} / {rel['rejected_updates']} / "
               f"{rel['skipped_rounds']}")
    assert summary in out


# --- determinism ----------------------------------------------------------------------------------


def test_same_config_twice_gives_identical_metrics(tiny_overrides, tmp_path) -> None:
    """Two runs in one process (so nothing is reset between them), with the model's own randomness (LoRA
    dropout) and faults on: ``metrics.json`` equal except the timing fields, final tensors equal."""
    overrides = [*tiny_overrides, "lora.dropout=0.2", "faults.client_dropout=0.2", "faults.corrupt_update=0.2"]
    rng_before = torch.get_rng_state()
    runs = []
    for name in ("a", "b"):
        run(resolve("tiny-vit", overrides), run_dir=tmp_path / name)
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert torch.equal(torch.get_rng_state(), rng_before), "a run must not consume the global RNG"
    a, b = runs
    assert a != b  # the timing fields differ ...
    assert without_timing(a) == without_timing(b)  # ... and nothing else
    ta = st_load(rundir.latest_path(tmp_path / "a").with_suffix(".safetensors").read_bytes())
    tb = st_load(rundir.latest_path(tmp_path / "b").with_suffix(".safetensors").read_bytes())
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # The dropout is live: without it the losses differ (so the equality above is not vacuous).
    plain = run(resolve("tiny-vit", [*tiny_overrides, "faults.client_dropout=0.2", "faults.corrupt_update=0.2"])).metrics
    assert [r["train_loss"] for r in plain["rounds"]] != [r["train_loss"] for r in a["rounds"]]


def test_a_different_seed_gives_different_metrics(tiny_overrides) -> None:
    a = run(resolve("tiny-vit", tiny_overrides)).metrics
    b = run(resolve("tiny-vit", [*tiny_overrides, "seed=1"])).metrics
    assert without_timing(a) != without_timing(b)
