"""Round checkpoints of a run, written atomically, and their verified loading for resume.

After every round the loop (:mod:`fedtalora.engine`) writes one checkpoint into ``RUN_DIR/checkpoints``:

``round-NNNNNN.safetensors``
    the tensors: ``global/<key>`` the global trainable state (LoRA factors, head, whatever the
    method trains and sends), ``base/<layer>`` the current frozen base weight of every adapted layer,
    ``method/<key>`` optional server-side state of the method.
``round-NNNNNN.json``
    the small state: position (task, round, rounds completed), the communication ledger, the
    metrics so far, a fingerprint of the config, the name, size and SHA-256 of the tensor file.

``NNNNNN`` counts completed rounds. The tensor file is written first and the JSON last, each to a
temporary file that is fsync'ed and then renamed over the final name (and the folder fsync'ed), so
a JSON that exists always describes a complete tensor file: a crash at any instant leaves either
the previous checkpoint or the new one, never a torn one. With ``output.checkpoints=latest`` older
checkpoints are deleted only after the new JSON is in place.

Base weights, not residual sums. The residuals are folded into the base every round in float32;
re-adding their stored sum to the initial weights would round differently from the sequence of
in-place additions the uninterrupted run made, and a resumed run would drift by an ulp. Storing
the adapted layers' base weights themselves (``d_out x d_in`` per layer, the same size as the
residual sum) makes resume bit-exact. Layers without LoRA never change and are rebuilt from the
config (pretrained weights or the seed).

Randomness needs no saved state: every generator of round ``r`` of task ``t`` derives from
``(seed, names, t, r, ...)`` (client sampling, shuffling, augmentation, faults), and the model's own
draws from the global torch RNG (LoRA dropout, drop-path) are seeded per client and round by the
loop. The position is the whole RNG state.

Only safetensors and JSON are read: no pickle, nothing executable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__, safeio
from .errors import CheckpointError
from .validation import tensor_mismatch

logger = logging.getLogger(__name__)

FORMAT = 1
DIRNAME = "checkpoints"
_NAME = re.compile(r"^round-(\d{6,})\.json$")


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``completed_rounds`` rounds."""

    completed_rounds: int
    task: int
    """Task of the last completed round."""
    round: int
    """Round (within its task) of the last completed round."""
    global_state: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    """Current base weight of every adapted layer."""
    ledger: dict[str, Any]
    metrics: dict[str, Any]
    elapsed_seconds: float
    """Wall time spent up to this checkpoint, over all sessions of the run."""
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    """One entry per earlier resume of this run (rounds completed when it resumed)."""
    path: Path | None = None
    """The JSON file this checkpoint was read from (None before it is written)."""


def config_fingerprint(cfg_dict: Mapping[str, Any]) -> str:
    """SHA-256 of the config without its ``output``, ``engine`` and ``flower`` sections (where a run is
    written, and whether its clients run in-process or on Flower, do not change what it computes)."""
    data = {k: v for k, v in cfg_dict.items() if k not in ("output", "engine", "flower")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --- atomic files ---------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``
    (:func:`fedtalora.safeio.atomic_write_bytes`: unique temporary name, fsync, rename, fsync of the folder;
    :class:`~fedtalora.errors.OutputError` on failure, with nothing left behind)."""
    safeio.atomic_write_bytes(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    safeio.atomic_write_text(path, text)


# --- writing --------------------------------------------------------------------------------------


def _stem(completed_rounds: int) -> str:
    return f"round-{completed_rounds:06d}"


def save(run_dir: Path, ckpt: Checkpoint, cfg_dict: Mapping[str, Any], *, keep: str = "latest") -> Path:
    """Write ``ckpt`` into ``run_dir/checkpoints`` atomically; returns the JSON path.

    Args:
        keep: ``latest`` deletes the older checkpoints once this one is complete; ``all`` keeps them.
    """
    folder = run_dir / DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(ckpt.completed_rounds)
    tensors = {f"global/{k}": v for k, v in ckpt.global_state.items()}
    tensors.update({f"base/{k}": v for k, v in ckpt.base.items()})
    tensors.update({f"method/{k}": v for k, v in ckpt.method_state.items()})
    tensors = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}  # same bytes for same state
    blob = st_save(tensors, metadata={"format": str(FORMAT), "fedtalora": __version__})
    tensor_file = folder / f"{stem}.safetensors"
    atomic_write_bytes(tensor_file, blob)
    state = {
        "format": FORMAT,
        "fedtalora": __version__,
        "config_sha256": config_fingerprint(cfg_dict),
        "completed_rounds": ckpt.completed_rounds,
        "task": ckpt.task,
        "round": ckpt.round,
        "tensors": tensor_file.name,
        "tensors_bytes": len(blob),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "ledger": ckpt.ledger,
        "elapsed_seconds": ckpt.elapsed_seconds,
        "resumes": ckpt.resumes,
        "metrics": ckpt.metrics,
    }
    json_file = folder / f"{stem}.json"
    atomic_write_text(json_file, json.dumps(state))
    if keep == "latest":
        _prune(folder, ckpt.completed_rounds)
    return json_file


def _prune(folder: Path, current: int) -> None:
    """Delete every checkpoint but ``current`` (JSON first: a JSON never outlives its tensors)."""
    for path in sorted(folder.glob("round-*.json")):
        m = _NAME.match(path.name)
        if m and int(m.group(1)) != current:
            path.unlink(missing_ok=True)
    for path in folder.glob("round-*.safetensors"):
        if path.name != f"{_stem(current)}.safetensors":
            path.unlink(missing_ok=True)


# --- reading --------------------------------------------------------------------------------------


def latest_path(run_dir: Path) -> Path | None:
    """The JSON of the most advanced checkpoint in ``run_dir`` (None if there is none)."""
    folder = run_dir / DIRNAME
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load(json_path: Path, cfg_dict: Mapping[str, Any]) -> Checkpoint:
    """Read and verify one checkpoint.

    Raises:
        CheckpointError: naming the file, if it cannot be read, is corrupted (bad JSON, wrong size
            or checksum of the tensor file, unreadable safetensors) or belongs to another config.
    """

    def fail(path: Path, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {why}")

    try:
        state = json.loads(json_path.read_text())
    except OSError as e:
        raise fail(json_path, f"cannot be read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(json_path, f"is corrupted (not valid JSON: {str(e).splitlines()[0]})") from None
    required = ("format", "config_sha256", "completed_rounds", "task", "round", "tensors", "tensors_bytes",
                "tensors_sha256", "ledger", "elapsed_seconds", "metrics")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise fail(json_path, f"is corrupted (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise fail(json_path, f"has format {state['format']!r}; this fedtalora reads format {FORMAT}")
    if state["config_sha256"] != config_fingerprint(cfg_dict):
        raise fail(json_path, "was written by a different config than the run's config.yaml (edited since, or "
                   "a fedtalora version with other config fields); it cannot continue this run")
    tensor_path = json_path.parent / str(state["tensors"])
    if tensor_path.parent != json_path.parent:
        raise fail(json_path, f"names a tensor file outside {json_path.parent}")
    try:
        blob = tensor_path.read_bytes()
    except OSError as e:
        raise fail(tensor_path, f"cannot be read: {e.strerror}") from None
    if len(blob) != state["tensors_bytes"] or hashlib.sha256(blob).hexdigest() != state["tensors_sha256"]:
        raise fail(tensor_path, f"is corrupted ({len(blob)} bytes, checksum does not match {json_path.name})")
    try:
        tensors = st_load(blob)
    except SafetensorError as e:
        raise fail(tensor_path, f"is corrupted ({e})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"global": {}, "base": {}, "method": {}}
    for name, t in tensors.items():
        prefix, _, key = name.partition("/")
        if prefix not in groups or not key:
            raise fail(tensor_path, f"holds an unexpected tensor {name!r}")
        groups[prefix][key] = t
    return Checkpoint(
        completed_rounds=int(state["completed_rounds"]), task=int(state["task"]), round=int(state["round"]),
        global_state=groups["global"], base=groups["base"], method_state=groups["method"],
        ledger=state["ledger"], metrics=state["metrics"], elapsed_seconds=float(state["elapsed_seconds"]),
        resumes=list(state.get("resumes", [])), path=json_path,
    )


def load_latest(run_dir: Path, cfg_dict: Mapping[str, Any]) -> Checkpoint | None:
    """The most advanced checkpoint of ``run_dir``, verified (None if the run has none yet)."""
    path = latest_path(run_dir)
    return None if path is None else load(path, cfg_dict)


def check_tensors(ckpt: Checkpoint, what: str, got: Mapping[str, torch.Tensor],
                  expected: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``got`` has exactly the keys and shapes of ``expected``."""
    where = ckpt.path if ckpt.path is not None else "checkpoint"
    reason = tensor_mismatch(got, expected)
    if reason is not None:
        raise CheckpointError(f"checkpoint {where} does not match the model: {what} {reason}")
