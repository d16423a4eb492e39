"""Hostile input, as a table: every case is one argv (plus the files it needs), and must end with exit
code 2 and ONE line on stderr naming the problem, quickly, without a traceback, and (unless the case says
otherwise) without changing any file (the run directory's lock file aside).

The cases are the patterns of issue 21 (``#N`` below numbers that issue's failures in the order it lists
them), not one test per bug: alias bombs, deep nesting, encodings, FIFOs under innocent names,
non-finite numbers and tensors, values of the wrong type in every JSON document read back, third-party
errors (Pillow, timm, torch.load, safetensors, Flower), files and folders in the way, run directories in
use, finished runs resumed or overwritten. A case marked ``phase2`` would be a known failure kept as a
strict xfail (fixing it turns its mark into a failure that asks for the mark to go); none is left.

All cases run in-process (``fedtalora.app.cli.main``), each under a 60 s alarm, so a hang is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from fedtalora.api import run
from fedtalora.app.cli import MAX_MESSAGE, main
from fedtalora.config import resolve
from fedtalora.fed.rundir import FINAL_MODEL, latest_path
from fedtalora.runlock import LOCK_NAME

TINY = "<tiny>"  # the tiny run's overrides, with output.dir={tmp}/runs
RUN = "{run}"  # a copy of a finished tiny run, made by the case's setup


# --- files the cases need ---------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` 1-bit pixels, with one tiny zlib stream as data
    (Pillow reads the size from the header and refuses before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def _real_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(tmp: Path, bad: Callable[[Path], None]) -> None:
    for split, name in (("train", "x.png"), ("test", "y.png")):
        (tmp / "imgs" / split / "a").mkdir(parents=True)
        (tmp / "imgs" / split / "a" / name).write_bytes(_real_png())
    target = tmp / "imgs" / "train" / "a" / "x.png"
    target.unlink()
    bad(target)


def _bomb_yaml(levels: int, flow: bool = False) -> str:
    if flow:
        items = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
        return "[" + ", ".join(items) + "]"
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


Setup = Callable[[Path, dict[str, Any]], None]
"""A case's setup: ``setup(tmp, ctx)``; ``ctx["model_kwargs"]`` is the tiny ViT's ``model.kwargs``."""


def _write(rel: str, content: str | bytes) -> Setup:
    def setup(tmp: Path, ctx: dict[str, Any]) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return setup


def _fifo(rel: str) -> Setup:
    def setup(tmp: Path, ctx: dict[str, Any]) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / rel)
    return setup


def _edit_latest_json(run_dir: Path, **changes: object) -> None:
    path = latest_path(run_dir)
    assert path is not None
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def _rewrite_latest_tensors(run_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    js = latest_path(run_dir)
    assert js is not None
    st = js.with_suffix(".safetensors")
    tensors = st_load(st.read_bytes())
    edit(tensors)
    blob = st_save(tensors)
    st.write_bytes(blob)
    _edit_latest_json(run_dir, tensors_bytes=len(blob), tensors_sha256=hashlib.sha256(blob).hexdigest())


def _final_meta(run_dir: Path, **changes: str) -> None:
    from safetensors import safe_open

    path = run_dir / FINAL_MODEL
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def _nan_final(run_dir: Path) -> None:
    from safetensors import safe_open

    path = run_dir / FINAL_MODEL
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["global/head.bias"][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)


def _tiny_weights(tmp: Path, ctx: dict[str, Any], edit: Callable[[dict[str, torch.Tensor]], None], name: str) -> None:
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, **ctx["model_kwargs"])
    sd = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    edit(sd)
    save_file(sd, str(tmp / name))


def _hold_lock(run_dir: Path, ctx: dict[str, Any]) -> None:
    """Another writer holds ``run_dir``'s lock (a second open file description: refused like another process)."""
    from fedtalora.runlock import RunLock

    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.setdefault("locks", []).append(RunLock(run_dir).acquire())


def _flwr_config(address: str) -> Setup:
    """Flower's ``config.toml`` (under the test's ``FLWR_HOME``) defining the connection ``dead`` at ``address``
    (``{free}``: a port nothing listens on)."""
    def setup(tmp: Path, ctx: dict[str, Any]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        home = tmp / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          'options.num-supernodes = 2\n\n[superlink.dead]\n'
                                          f'address = "{address.format(free=free)}"\ninsecure = true\n')
    return setup


def _edit_config(run_dir: Path, old: str, new: str) -> None:
    path = run_dir / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


class _Anything:
    """Unpickling this needs a class that ``weights_only=True`` does not allow (nothing runs)."""


# --- the table --------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]
    words: list[str]
    setup: Setup | None = None
    issue: str = ""
    """Which failure of issue 21 this reproduces (``#N``), or the pattern it guards."""
    phase2: str = ""
    """Not fixed yet: what phase 2 must do (the case is a strict xfail)."""
    needs_run: str = ""
    """Copy a tiny run to ``{tmp}/run`` first (before ``setup``): ``finished``, or ``interrupted`` (the same run
    stopped after its last checkpoint, before it wrote its final model and completed ``metrics.json``)."""
    changes_files: bool = False
    """The command may write before it fails (documented exceptions; see ``phase2``)."""
    absent: list[str] = field(default_factory=list)
    """Paths (relative to tmp) that must not exist afterwards (e.g. the run directory)."""


BLOCK_DEEP = "extends: tiny-vit\nmodel:\n  kwargs:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(80)) + \
    "  " * 82 + "1\n"

CASES: list[Case] = [
    # Config values: finite, bounded, typed.
    Case("lr-inf", ["run", "tiny-vit", "train.lr=.inf"], ["train.lr=inf", "finite"], issue="#7"),
    Case("alpha-1e400", ["run", "tiny-vit", "lora.alpha=1e400"], ["lora.alpha=inf", "finite"], issue="#8"),
    Case("max-norm-inf", ["run", "tiny-vit", "fed.max_update_norm=.inf"], ["fed.max_update_norm", "finite"]),
    Case("kwargs-nan", ["run", "tiny-vit", "model.kwargs={drop_rate: .nan}"], ["model.kwargs.drop_rate=nan", "finite"]),
    Case("method-option-inf", ["run", "tiny-vit", "method=fedprox", "method_options={mu: .inf}"], ["mu", "finite"]),
    Case("threads-2^31", ["run", "tiny-vit", "train.threads=2147483648"], ["train.threads", "[0, 1024]"], issue="#28"),
    Case("seed-2^100", ["run", "tiny-vit", f"seed={2**100}"], ["seed", "2**63"]),
    Case("int-5000-digits", ["run", "tiny-vit", "train.batch_size=" + "9" * 5000], ["train.batch_size", "4300 digits"]),
    Case("output-name-300", ["run", "tiny-vit", "output.name=" + "n" * 300], ["output.name", "255 bytes"], issue="#29"),
    Case("options-type", ["run", "tiny-vit", "data.dataset=text-csv", "data.root={tmp}", "data.options={test_fraction: abc}"],
         ["data.options.test_fraction='abc'", "float"], issue="#19"),
    Case("options-list-type", ["run", "tiny-vit", "data.dataset=omniglot", "data.options={parts: 3}"],
         ["data.options.parts=3", "list[str]"]),
    Case("huge-value-message", ["run", "{tmp}/zeros.yaml"], ["lora.blocks=[0, 0, 0", "distinct"],
         setup=_write("zeros.yaml", "extends: tiny-vit\nlora: {blocks: [" + ", ".join(["0"] * 9000) + "]}\n"),
         issue="#10 (a long value in a message)"),
    # YAML: encoding, size, depth, aliases, special files.
    Case("preset-latin1", ["run", "{tmp}/latin.yaml"], ["latin.yaml", "not UTF-8", "0xe9"],
         setup=_write("latin.yaml", "extends: tiny-vit\n# caf\xe9\n".encode("latin-1")), issue="#12"),
    Case("preset-alias-bomb-1e9", ["run", "{tmp}/bomb.yaml"], ["bomb.yaml", "expands to more than 10,000 nodes"],
         setup=_write("bomb.yaml", _bomb_yaml(9)), issue="#9"),
    Case("preset-alias-bomb-1e5", ["run", "{tmp}/bomb5.yaml"], ["bomb5.yaml", "expands to more than"],
         setup=_write("bomb5.yaml", _bomb_yaml(5)), issue="#10"),
    Case("preset-self-alias", ["run", "{tmp}/loop.yaml"], ["loop.yaml", "refers to a node containing it"],
         setup=_write("loop.yaml", "extends: tiny-vit\nmodel: &m {kwargs: {x: *m}}\n")),
    Case("preset-flow-deep", ["run", "{tmp}/deep.yaml"], ["deep.yaml", "not valid YAML", "nesting depth"],
         setup=_write("deep.yaml", "extends: tiny-vit\nlora: {blocks: " + "[" * 5000 + "]" * 5000 + "}\n"), issue="#14"),
    Case("preset-block-deep", ["run", "{tmp}/deep2.yaml"], ["deep2.yaml", "nested too deeply"],
         setup=_write("deep2.yaml", BLOCK_DEEP), issue="#14"),
    Case("preset-fifo", ["run", "{tmp}/fifo.yaml"], ["fifo.yaml", "not a regular file"], setup=_fifo("fifo.yaml")),
    Case("preset-too-big", ["run", "{tmp}/big.yaml"], ["big.yaml", "too large"],
         setup=_write("big.yaml", "extends: tiny-vit\n" + "#" * (2**20 + 10) + "\n")),
    Case("override-deep", ["run", "tiny-vit", "lora.blocks=" + "[" * 100 + "]" * 100], ["lora.blocks", "nested too deeply"],
         issue="#15"),
    Case("override-bomb", ["run", "tiny-vit", "model.kwargs=" + _bomb_yaml(6, flow=True)], ["model.kwargs", "expands"]),
    Case("override-bad-date", ["run", "tiny-vit", "seed=2020-13-45"], ["seed", "not valid YAML"]),
    # Dataset files: only regular files, UTF-8, bounded JSON, decodable images.
    Case("wnids-latin1", ["run", "tiny-vit", "data.dataset=tiny-imagenet", "data.root={tmp}/tiny"],
         ["wnids.txt", "not UTF-8"], issue="#13",
         setup=lambda t, ctx: (_write("tiny/tiny-imagenet-200/wnids.txt", "n0144\xe9\n".encode("latin-1"))(t, ctx),
                          (t / "tiny/tiny-imagenet-200/train").mkdir())),
    Case("clinc-deep", ["run", "tiny-vit", "data.dataset=clinc150", "data.root={tmp}/clinc"],
         ["data_full.json", "nested too deeply"], issue="#16",
         setup=_write("clinc/data_full.json", '{"train": ' + "[" * 100_000 + "]" * 100_000 + "}")),
    Case("image-fifo", ["run", "tiny-vit", "data.dataset=imagefolder", "data.root={tmp}/imgs"],
         ["x.png", "not a regular file"], issue="#11", setup=lambda t, ctx: _imagefolder(t, os.mkfifo)),
    Case("image-bomb", ["run", "tiny-vit", "data.dataset=imagefolder", "data.root={tmp}/imgs"],
         ["x.png", "too large to decode safely"], issue="#23",
         setup=lambda t, ctx: _imagefolder(t, lambda p: p.write_bytes(_png(20_000, 20_000)))),
    Case("image-bomb-warning-range", ["run", "tiny-vit", "data.dataset=imagefolder", "data.root={tmp}/imgs"],
         ["x.png", "too large to decode safely"], issue="#23",
         setup=lambda t, ctx: _imagefolder(t, lambda p: p.write_bytes(_png(10_000, 10_000)))),
    Case("image-garbage", ["run", "tiny-vit", "data.dataset=imagefolder", "data.root={tmp}/imgs"],
         ["cannot decode image", "x.png"], setup=lambda t, ctx: _imagefolder(t, lambda p: p.write_bytes(b"\x89PNG junk"))),
    # The model: not a ViT, geometry, weight files. The run directory must not be created.
    Case("not-a-vit", ["run", "tiny-vit", TINY, "model.backbone=resnet18"], ["resnet18", "not a ViT"], issue="#39",
         absent=["runs"]),
    Case("heads-divide", ["run", "tiny-vit", TINY, "model.kwargs={patch_size: 4, depth: 2, embed_dim: 30, num_heads: 4}"],
         ["divisible by num_heads"], issue="#24", absent=["runs"]),
    Case("image-smaller-than-patch", ["run", "tiny-vit", TINY, "data.image_size=3"],
         ["data.image_size=3", "cannot take 3x3 images"], issue="#25", absent=["runs"]),
    Case("img-size-mismatch", ["run", "tiny-vit", TINY, "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, "
                                                    "img_size: 16}"], ["cannot take 8x8 images"], absent=["runs"]),
    Case("pth-text", ["run", "tiny-vit", TINY, "model.checkpoint={tmp}/w.pth"], ["w.pth", "not a valid .pth"],
         setup=_write("w.pth", "these are not weights\n"), issue="#27", absent=["runs"]),
    Case("pth-pickle", ["run", "tiny-vit", TINY, "model.checkpoint={tmp}/p.pth"], ["p.pth", "never unpickles"],
         setup=lambda t, ctx: torch.save({"w": torch.zeros(1), "obj": _Anything()}, t / "p.pth"), issue="#35",
         absent=["runs"]),
    Case("safetensors-1d-pos-embed", ["run", "tiny-vit", TINY, "model.checkpoint={tmp}/w.safetensors"],
         ["w.safetensors", "does not fit"], issue="#26", absent=["runs"],
         setup=lambda t, ctx: _tiny_weights(t, ctx, lambda sd: sd.update(pos_embed=torch.zeros(32)), "w.safetensors")),
    Case("weights-nan", ["run", "tiny-vit", TINY, "model.checkpoint={tmp}/nan.safetensors"], ["nan.safetensors", "non-finite"],
         setup=lambda t, ctx: _tiny_weights(t, ctx, lambda sd: sd["cls_token"].fill_(float("nan")), "nan.safetensors"),
         issue="#6",
         absent=["runs"]),
    # Output locations in the way.
    Case("partitions-is-a-dir", ["run", "tiny-vit", TINY, "output.name=x", "output.overwrite=true"],
         ["partitions.json", "is a directory"],
         setup=lambda t, ctx: (t / "runs" / "x" / "partitions.json").mkdir(parents=True), issue="#30"),
    Case("overwrite-not-a-run-dir", ["run", "tiny-vit", TINY, "output.name=x", "output.overwrite=true"],
         ["output.overwrite=true", "notes.txt", "not a file fedtalora writes"],
         setup=_write("runs/x/notes.txt", "mine\n"), issue="#3"),
    Case("run-dir-locked", ["run", "tiny-vit", TINY, "output.name=x"], ["runs/x", "in use by process"], issue="#4",
         setup=lambda t, ctx: _hold_lock(t / "runs" / "x", ctx)),
    Case("resume-locked", ["resume", RUN], ["run", "in use by process"], needs_run="interrupted", issue="#4",
         setup=lambda t, ctx: _hold_lock(t / "run", ctx)),
    Case("resume-complete-edited", ["resume", RUN], ["complete", "config.yaml was edited"], needs_run="finished",
         issue="#1", setup=lambda t, ctx: _edit_config(t / "run", "lr: 0.003", "lr: 0.5")),
    Case("sweep-output-a-file", ["sweep", "{tmp}/grid.yaml", "--quiet"], ["sweep folder", "output"], issue="#31",
         setup=lambda t, ctx: (_write("out", "a file")(t, ctx), _write("grid.yaml", "presets: [tiny-vit]\noutput: " + str(t / "out")
                                                             + "\n")(t, ctx))),
    Case("sweep-grid-latin1", ["sweep", "{tmp}/g.yaml"], ["g.yaml", "not UTF-8"],
         setup=_write("g.yaml", "presets: [tiny-vit]  # \xe9\n".encode("latin-1"))),
    Case("sweep-grid-fifo", ["sweep", "{tmp}/g.yaml"], ["g.yaml", "not a regular file"], setup=_fifo("g.yaml")),
    Case("sweep-grid-bomb", ["sweep", "{tmp}/g.yaml"], ["g.yaml", "expands"], setup=_write("g.yaml", _bomb_yaml(7))),
    Case("flower-app-into-file", ["flower-app", "{tmp}/f"], ["flower-app", "not a folder"], issue="#32",
         setup=_write("f", "x")),
    Case("flower-app-unwritable", ["flower-app", "/proc/fedtalora-app"], ["flower-app", "cannot create"], issue="#33"),
    Case("flower-app-bad-data", ["flower-app", "{tmp}/app", "tiny-vit", "data.dataset=cifar100", "data.root={tmp}/none"],
         ["CIFAR-100", "not found"], issue="#2 (dest written before the config was checked)", absent=["app"]),
    Case("flower-app-existing", ["flower-app", "{tmp}/app"], ["pyproject.toml", "--force"],
         setup=_write("app/pyproject.toml", "# mine\n"), issue="#2"),
    Case("flower-app-existing-config", ["flower-app", "{tmp}/app", "tiny-vit", "seed=3"], ["config.yaml", "--force"],
         setup=_write("app/config.yaml", "# mine\n"), issue="#2"),
    Case("flower-app-bad-override", ["flower-app", "{tmp}/app", "tiny-vit", "fed.bogus=1"], ["fed.bogus"],
         setup=_write("app/config.yaml", "# mine\n"), issue="#2"),
    Case("superlink-missing", ["run", "tiny-vit", "engine=flower", "flower.superlink=nonexistent", "output.dir={tmp}/runs"],
         ["flower.superlink='nonexistent'", "no such SuperLink connection"], issue="#36", absent=["runs"]),
    Case("superlink-unreachable", ["run", "tiny-vit", "engine=flower", "flower.superlink=dead", "output.dir={tmp}/runs"],
         ["flower.superlink='dead'", "unreachable at 127.0.0.1:", "is it running?"], issue="#36 (defined, unreachable)",
         setup=_flwr_config("127.0.0.1:{free}"), absent=["runs"]),
    Case("superlink-bad-address", ["run", "tiny-vit", "engine=flower", "flower.superlink=dead", "output.dir={tmp}/runs"],
         ["flower.superlink='dead'", "expected HOST:PORT"], setup=_flwr_config("nowhere"), absent=["runs"]),
    # Documents read back: report, compare, export.
    Case("report-metrics-deep", ["report", "{tmp}/r"], ["metrics.json", "nested too deeply"], issue="#18",
         setup=_write("r/metrics.json", "[" * 100_000 + "]" * 100_000)),
    Case("report-rounds-ints", ["report", "{tmp}/r"], ["metrics.json", "rounds[0] must be an object"], issue="#22",
         setup=_write("r/metrics.json", json.dumps({"rounds": [1, 2]}))),
    Case("report-metrics-fifo", ["report", "{tmp}/r"], ["metrics.json", "not a regular file"],
         setup=_fifo("r/metrics.json")),
    Case("compare-metrics-list", ["compare", "{tmp}/r"], ["metrics.json", "must be an object"],
         setup=_write("r/metrics.json", "[]")),
    Case("export-meta-num-classes", ["export", RUN], ["final_model.safetensors", "num_classes"], issue="#34",
         needs_run="finished", setup=lambda t, ctx: _final_meta(t / "run", num_classes="abc")),
    Case("export-meta-fingerprint", ["export", RUN], ["final_model.safetensors", "fingerprint"], issue="#34",
         needs_run="finished", setup=lambda t, ctx: _final_meta(t / "run", fingerprint="{not json")),
    Case("export-nan", ["export", RUN], ["non-finite"], needs_run="finished", setup=lambda t, ctx: _nan_final(t / "run"),
         issue="#37"),
    # Checkpoints of an interrupted run being resumed: schema, finite tensors, partitions.
    Case("ckpt-json-deep", ["resume", RUN], ["round-000004.json", "nested too deeply"], issue="#17", needs_run="interrupted",
         setup=lambda t, ctx: latest_path(t / "run").write_text("[" * 100_000 + "]" * 100_000)),
    Case("ckpt-completed-rounds-x", ["resume", RUN], ["round-000004.json", "completed_rounds"], issue="#20",
         needs_run="interrupted", setup=lambda t, ctx: _edit_latest_json(t / "run", completed_rounds="x")),
    Case("ckpt-metrics-list", ["resume", RUN], ["round-000004.json", "metrics"], issue="#21", needs_run="interrupted",
         setup=lambda t, ctx: _edit_latest_json(t / "run", metrics=[])),
    Case("ckpt-nan", ["resume", RUN], ["round-000004.safetensors", "non-finite"], issue="#5", needs_run="interrupted",
         setup=lambda t, ctx: _rewrite_latest_tensors(t / "run", lambda ts: ts["global/head.bias"].fill_(float("nan")))),
    Case("partitions-json-deep", ["resume", RUN], ["partitions.json", "nested too deeply"], needs_run="interrupted",
         setup=lambda t, ctx: (t / "run" / "partitions.json").write_text("[" * 100_000 + "]" * 100_000)),
]


# --- the walk ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_overrides, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    run(resolve("tiny-vit", list(tiny_overrides)), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def interrupted(finished, tmp_path_factory) -> Path:
    """``finished`` as it was after its last checkpoint and before its end: the checkpoint's metrics, no final
    model (a resume continues it instead of finding it complete)."""
    run_dir = tmp_path_factory.mktemp("hostile-interrupted") / "run"
    shutil.copytree(finished, run_dir)
    latest = latest_path(run_dir)
    assert latest is not None
    (run_dir / "metrics.json").write_text(json.dumps(json.loads(latest.read_text())["metrics"], indent=1))
    (run_dir / FINAL_MODEL).unlink()
    return run_dir


def _argv(template: list[str], tmp: Path, tiny: list[str]) -> list[str]:
    out: list[str] = []
    for a in template:
        if a == TINY:
            out += [*tiny, f"output.dir={tmp}/runs"]
        else:
            out.append(a.replace(RUN, str(tmp / "run")).replace("{tmp}", str(tmp)))
    if out and out[0] in ("run", "resume"):
        out.insert(1 if out[0] == "resume" else 2, "--quiet")
    return out


def _snapshot(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.relative_to(folder).parts[0] in ("cache", "flwr-home"):  # the environment's folders (font caches)
            continue
        if p.name == LOCK_NAME:  # taken (and released) by a command that writes the run directory: no content
            continue
        st = p.lstat()
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else st.st_mode
    return out


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout("the command took more than 60 s (a hang?)")


def _params() -> list[object]:
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=f"phase 2: {c.phase2}")] if c.phase2 else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_the_table_is_large_and_named() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 50
    fixed = {c.issue.split()[0] for c in CASES if c.issue.startswith("#") and not c.phase2}
    assert len(fixed) >= 25, sorted(fixed)


@pytest.mark.parametrize("case", _params())
def test_hostile_input_is_one_line_exit_2(case: Case, tmp_path: Path, finished: Path, interrupted: Path,
                                          tiny_overrides, tiny_model_kwargs, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # never the user's Flower config
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if case.needs_run:
        shutil.copytree({"finished": finished, "interrupted": interrupted}[case.needs_run], tmp_path / "run")
    ctx: dict[str, Any] = {"model_kwargs": tiny_model_kwargs}
    if case.setup is not None:
        case.setup(tmp_path, ctx)
    before = _snapshot(tmp_path)
    argv = _argv(case.argv, tmp_path, tiny_overrides)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    t0 = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for lock in ctx.get("locks", []):
            lock.release()
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}; stderr:\n{captured.err[-3000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{captured.err[-3000:]}"
    line = lines[0]
    assert line.startswith("fedtalora: error: ") and "Traceback" not in captured.err
    assert len(line) <= MAX_MESSAGE + 40
    for w in case.words:
        assert w in line, f"{w!r} not in {line!r}"
    assert captured.out == ""
    assert seconds < 30, f"took {seconds:.1f} s"
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), f"{rel} was created"
    after = _snapshot(tmp_path)
    leftovers = [k for k in after if k.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if not case.changes_files:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"a failed command changed files: {changed[:5]}"


# --- the boundary itself ----------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_exit_1_with_a_traceback_log(tmp_path, tiny_overrides, capsys,
                                                                     monkeypatch) -> None:
    import fedtalora.api

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def boom(cfg: object) -> None:
        raise RuntimeError("a third-party library failed\nwith a second line " + "x" * 5000)

    monkeypatch.setattr(fedtalora.api, "prepare", boom)
    rc = main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("fedtalora: error: unexpected RuntimeError: a third-party library failed with a second")
    assert len(lines[0]) < MAX_MESSAGE + 200 and "more characters" in lines[0]
    log = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert log.parent == tmp_path / "cache" / "fedtalora" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "def boom" not in text and "in boom" in text


def test_an_unexpected_error_inside_a_run_logs_into_the_run_directory(tmp_path, tiny_overrides, capsys,
                                                                      monkeypatch) -> None:
    import fedtalora.api

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError("inside the loop")

    monkeypatch.setattr(fedtalora.api, "run", boom)
    rc = main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={tmp_path}/runs", "output.name=r"])
    err = capsys.readouterr().err
    assert rc == 1 and f"traceback in {tmp_path / 'runs' / 'r' / 'error.log'}" in err
    assert "ValueError: inside the loop" in (tmp_path / "runs" / "r" / "error.log").read_text()


@pytest.mark.parametrize("checkpoints", ["latest", "none"])
def test_ctrl_c_names_the_real_run_directory(tmp_path, tiny_overrides, capsys, monkeypatch, checkpoints) -> None:
    import fedtalora.api

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedtalora.api, "run", interrupted)
    rc = main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={tmp_path}/runs", "output.name=r",
               f"output.checkpoints={checkpoints}"])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "RUN_DIR" not in err
    assert f"fedtalora resume {tmp_path / 'runs' / 'r'}" in err
    assert ("starts it over" in err) == (checkpoints == "none")


def test_ctrl_c_before_the_run_directory_exists(tmp_path, tiny_overrides, capsys, monkeypatch) -> None:
    import fedtalora.api

    def interrupted(cfg: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedtalora.api, "prepare", interrupted)
    assert main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={tmp_path}/runs"]) == 130
    err = capsys.readouterr().err
    assert "no run directory had been created yet" in err and "RUN_DIR" not in err


@pytest.mark.parametrize("checkpoints", ["latest", "none"])
def test_resume_of_a_complete_run_does_nothing_and_says_so(finished, tmp_path, capsys, checkpoints) -> None:
    """#1: resuming a finished run recomputes nothing and changes no file, with or without checkpoints; with its
    config.yaml edited since, it is refused (the table's ``resume-complete-edited``)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    if checkpoints == "none":
        shutil.rmtree(run_dir / "checkpoints")
        _edit_config(run_dir, "checkpoints: latest", "checkpoints: none")  # output.* is not part of the fingerprint
    before = _snapshot(run_dir)
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run_dir} is already complete; nothing to resume")
    assert "final average accuracy (F_AA)" in out
    assert _snapshot(run_dir) == before


def test_overwrite_clears_the_old_run_before_writing_anything(finished, tmp_path, tiny_overrides, capsys,
                                                              monkeypatch) -> None:
    """#3: ``output.overwrite=true`` into a finished run, interrupted as soon as the new run starts: none of the
    old run's results are left beside the new config, so nothing can mix them up."""
    import fedtalora.api

    runs = tmp_path / "runs"
    shutil.copytree(finished, runs / "x")
    (runs / "x" / "report.md").write_text("# the old run's report\n")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedtalora.api, "run", interrupted)
    rc = main(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={runs}", "output.name=x",
               "output.overwrite=true", "seed=7"])
    assert rc == 130
    capsys.readouterr()
    left = sorted(p.name for p in (runs / "x").iterdir())
    assert left == [".fedtalora.lock"], left  # metrics.json, final model, checkpoints, CSVs, report: all gone
