"""The run directory: its files, written atomically, and their verified reading for resume and loading.

``RUN_DIR/``
    ``config.yaml`` (the resolved config) and ``partitions.json`` (each client's samples per task), written
    when the run starts (:func:`open_run_dir`); ``metrics.json`` after every round (:mod:`.history`);
    ``checkpoints/round-NNNNNN.{safetensors,json}`` after every round; ``final_model.safetensors`` when
    the run ends.

**Round checkpoints.** ``round-NNNNNN.safetensors`` holds the tensors: ``global/<key>`` the global
trainable state (LoRA factors, head, whatever the method trains and sends), ``base/<layer>`` the current
frozen base weight of every adapted layer, ``exact/<layer>`` its float64 accumulator ``D`` when the model keeps
the exact base (``docs/exactness.md``), ``method/<key>`` optional server-side state of the method (and
of the classifier, as ``classifier.<key>``). ``round-NNNNNN.json`` holds the small state: position (task,
round, rounds completed), the communication ledger, the metrics so far, a fingerprint of the config, the
name, size and SHA-256 of the tensor file. ``NNNNNN`` counts completed rounds. The tensor file is written
first and the JSON last, each to a temporary file that is fsync'ed and then renamed over the final name
(and the folder fsync'ed), so a JSON that exists always describes a complete tensor file: a crash at any
instant leaves either the previous checkpoint or the new one, never a torn one. With
``output.checkpoints=latest`` older checkpoints are deleted only after the new JSON is in place.

The exact base and the base weights. A method that changes the base keeps it exactly: the untouched
pre-trained ``W0`` (rebuilt from the config) and the float64 accumulator ``D`` of every residual, with the
float32 weight the layer computes with ``b = fl32(W0 + D)``. A checkpoint stores ``D`` (``exact/``), which
is what the run continues from, and ``b`` (``base/``), against which the restored ``fl32(W0 + D)`` is checked
bit for bit: a resumed run is bit-exact. Without the exact base (methods that never change it) ``base/``
is all there is. Checkpoints of format 1 (before the exact base) hold only ``base/``; they resume with
``D = b - W0`` (exact in float64, so ``fl32(W0 + D) == b``), after which the run accumulates exactly.
Layers without LoRA never change and are rebuilt from the config (pretrained weights or the seed).

Randomness needs no saved state: every generator of round ``r`` of task ``t`` derives from
``(seed, names, t, r, ...)`` (client sampling, shuffling, augmentation, faults), and the model's own
draws from the global torch RNG (LoRA dropout, drop-path) are seeded per client and round by the
loop. The position is the whole RNG state.

**The final model** (``final_model.safetensors``) uses the checkpoints' tensor layout: ``global/<key>``
every tensor of :meth:`FedModel.parameters_by_key` (LoRA factors and head, and what a method trains beyond
them, e.g. the whole backbone for full fine-tuning), ``base/<layer>`` the base weight of every adapted
layer with every residual of the run folded in, and ``exact/<layer>`` its float64 accumulator ``D`` with the exact
base (so :func:`load_final` restores the exact ``W0 + D``, and ``fedtalora export`` writes it rounded once). Everything else in the backbone never changes during a
run and is rebuilt from ``config.yaml`` (pretrained weights, or the seeded random init; then
:meth:`Method.attach`). The file's metadata holds a fingerprint of those rebuilt tensors (their sums),
checked on loading, so different pretrained weights or a timm version that initialises differently fail
loudly instead of giving another model.

Only safetensors, JSON and YAML are read: no pickle, nothing executable. Every file is written through
:func:`atomic_write_bytes`, the project's one atomic write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from .. import __version__
from ..core.validation import tensor_mismatch
from ..errors import CheckpointError, ConfigError, ModelError
from ..safeio import atomic_write_bytes, atomic_write_text, short
from .history import History

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..core.comm import DownlinkLedger
    from ..methods import Method
    from ..methods.classifier import Classifier
    from ..model import FedModel
    from .build import Experiment, Setup

logger = logging.getLogger(__name__)

FORMAT = 2
READS = (1, 2)
"""Checkpoint formats this version resumes (1: before the exact base's ``exact/`` tensors)."""
DIRNAME = "checkpoints"
FINAL_MODEL = "final_model.safetensors"
FINAL_FORMAT = "fedtalora-final-2"
FINAL_READS = ("fedtalora-final-1", FINAL_FORMAT)
FINGERPRINT_RTOL = 1e-5
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
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    """The float64 accumulator ``D`` of every adapted layer (empty without the exact base, and in format 1)."""
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
    tensors.update({f"exact/{k}": v for k, v in ckpt.exact.items()})
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

    state = _read_state(json_path)
    if state["format"] not in READS:
        raise fail(json_path, f"has format {state['format']!r}; this fedtalora reads formats "
                   f"{', '.join(map(str, READS))}")
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
    _check_finite({k: t for k, t in tensors.items() if k.startswith(("global/", "base/", "exact/"))},  # weights
                  f"checkpoint {tensor_path}", CheckpointError)  # (method state may mark unknowns with NaN)
    groups: dict[str, dict[str, torch.Tensor]] = {"global": {}, "base": {}, "exact": {}, "method": {}}
    for name, t in tensors.items():
        prefix, _, key = name.partition("/")
        if prefix not in groups or not key:
            raise fail(tensor_path, f"holds an unexpected tensor {name!r}")
        groups[prefix][key] = t
    return Checkpoint(
        completed_rounds=int(state["completed_rounds"]), task=int(state["task"]), round=int(state["round"]),
        global_state=groups["global"], base=groups["base"], exact=groups["exact"], method_state=groups["method"],
        ledger=state["ledger"], metrics=state["metrics"], elapsed_seconds=float(state["elapsed_seconds"]),
        resumes=list(state.get("resumes", [])), path=json_path,
    )


def _read_state(json_path: Path) -> dict[str, Any]:
    """A checkpoint's JSON through the guarded reader (regular file, UTF-8, size and depth limits), checked
    against :data:`fedtalora.schema.CHECKPOINT` (every field's type: one line naming the first bad one)."""
    from ..safeio import MAX_JSON_BYTES, parse_json, read_bytes
    from ..schema import CHECKPOINT, problem

    what = f"checkpoint {json_path}"

    def unreadable(msg: str) -> CheckpointError:
        return CheckpointError(f"{what} cannot be read: {msg.removeprefix(f'cannot read {what}: ')}"
                               if msg.startswith(f"cannot read {what}: ") else msg)

    def corrupted(msg: str) -> CheckpointError:
        return CheckpointError(f"{what} is corrupted ({msg.removeprefix(what).strip().removeprefix('is ')})")

    state = parse_json(read_bytes(json_path, what=what, max_bytes=MAX_JSON_BYTES, error=unreadable), what,
                       error=corrupted)
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} is corrupted (a JSON {type(state).__name__}, not an object)")
    missing = [k for k in CHECKPOINT.required if k not in state]  # type: ignore[attr-defined]
    if missing:
        raise CheckpointError(f"{what} is corrupted (missing {', '.join(missing)})")
    why = problem(state, CHECKPOINT)
    if why is not None:
        raise CheckpointError(f"{what} is corrupted: {why}")
    return state


def _check_finite(tensors: Mapping[str, torch.Tensor], source: str, error: type[Exception]) -> None:
    """Refuse tensors holding a NaN or an infinity where they enter (a checkpoint, a final model)."""
    from ..core.integrity import nonfinite_message

    why = nonfinite_message(tensors, source)
    if why is not None:
        raise error(why)


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


def restore_base(model: FedModel, base: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> str | None:
    """Load stored adapted-layer bases into a freshly built ``model``; returns why they do not fit (None: loaded).

    With the exact base the accumulator ``D`` is loaded (``exact``; or ``D = b - W0`` from the base weights of
    a file written before the exact base, exact in float64) and every ``fl32(W0 + D)`` must equal the stored
    ``b`` bit for bit; without it the base weights are copied (``base`` must match the model's adapted layers,
    checked by the caller).
    """
    acc = model.exact_base
    bases = {p.layer: model.base_weight(p.layer) for p in model.lora_pairs()}
    if acc is None:
        if exact:
            return ("it holds the float64 accumulators of an exact base (exact/) but the model built from the "
                    "config keeps none (another method or fed.residual?)")
        with torch.no_grad():
            for layer, w in bases.items():
                w.copy_(base[layer])
        return None
    if exact:
        reason = tensor_mismatch(exact, acc.acc)
        if reason is not None:
            return f"exact base accumulators {reason}"
        state = dict(exact)
    else:  # a file from before the exact base: the difference of two float32 tensors is exact in float64
        state = {layer: base[layer].to(torch.float64) - acc.w0[layer].to("cpu", torch.float64) for layer in bases}
    acc.load_state_dict(state)
    model.sync_base()
    for layer, w in bases.items():
        if not torch.equal(w.detach().cpu(), base[layer].to(w.dtype)):
            return (f"the exact base of {layer} (W0 + D) does not round to its stored base weight: other "
                    "pretrained weights, or a corrupted accumulator")
    return None


# --- the final model -----------------------------------------------------------------------------


def _frozen_tensors(model: FedModel) -> dict[str, torch.Tensor]:
    """The backbone tensors a run never changes: all but the stored ones (:func:`final_state`)."""
    stored = {id(p) for p in model.parameters_by_key().values()}
    stored |= {id(model.base_weight(p.layer)) for p in model.lora_pairs()}
    out = {n: p for n, p in model.backbone.named_parameters() if id(p) not in stored}
    out.update(dict(model.backbone.named_buffers()))
    return out


def fingerprint(model: FedModel) -> dict[str, float]:
    """Per-tensor float64 sums of the tensors :func:`save_final` does not store."""
    return {k: float(t.detach().double().sum()) for k, t in sorted(_frozen_tensors(model).items())}


def final_state(model: FedModel) -> dict[str, torch.Tensor]:
    """``global/<key>``, ``base/<layer>`` and (with the exact base) ``exact/<layer>`` tensors of ``model`` (CPU,
    contiguous copies)."""
    tensors = {f"global/{k}": p for k, p in model.parameters_by_key().items()}
    tensors.update({f"base/{p.layer}": model.base_weight(p.layer) for p in model.lora_pairs()})
    if model.exact_base is not None:
        tensors.update({f"exact/{layer}": d for layer, d in model.exact_base.acc.items()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_final(model: FedModel, path: Path, *, config_sha256: str = "") -> Path:
    """Write the model's final state to ``path`` atomically (safetensors); returns ``path``.

    ``config_sha256`` (:func:`config_fingerprint` of the run's config) goes into the metadata: ``resume`` of a
    complete run compares it with ``config.yaml`` to tell an untouched run from an edited config."""
    meta = {
        "format": FINAL_FORMAT,
        "fedtalora": __version__,
        "num_classes": str(model.head.out_features),
        "fingerprint": json.dumps(fingerprint(model)),
    }
    if config_sha256:
        meta["config_sha256"] = config_sha256
    atomic_write_bytes(path, st_save(final_state(model), metadata=meta))
    return path


def read_final(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a final-model file.

    Raises:
        ModelError: the file is missing, not safetensors, or not a fedtalora final model.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path} does not exist (the run did not finish, or an older fedtalora wrote it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") not in FINAL_READS:
        raise ModelError(f"{path} is not a fedtalora final model (format {short(meta.get('format'))}, expected "
                         f"{' or '.join(FINAL_READS)})")
    _check_final(path, tensors, meta)
    return tensors, meta


def _check_final(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """A final model's metadata has its schema (:func:`fedtalora.schema.final_meta_problem`) and every tensor is
    finite (:class:`ModelError` otherwise)."""
    from ..schema import final_meta_problem

    why = final_meta_problem(meta)
    if why is not None:
        raise ModelError(f"{path} has malformed metadata: {why}")
    _check_finite(tensors, str(path), ModelError)


def load_into(model: FedModel, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: Path) -> None:
    """Load a final state into a freshly built ``model`` after checking that it is the same model."""
    params = model.parameters_by_key()
    bases = {p.layer: model.base_weight(p.layer) for p in model.lora_pairs()}
    expected = {f"global/{k}": v for k, v in params.items()} | {f"base/{k}": v for k, v in bases.items()}
    exact = {k: v for k, v in tensors.items() if k.startswith("exact/")}
    reason = tensor_mismatch({k: v for k, v in tensors.items() if k not in exact}, expected, check_dtype=False)
    if reason is not None:
        raise ModelError(f"{source} does not match the model built from the run's config: {reason}")
    saved = json.loads(meta.get("fingerprint", "{}"))
    now = fingerprint(model)
    bad = [k for k in now if k not in saved or not math.isclose(now[k], saved[k], rel_tol=FINGERPRINT_RTOL,
                                                                  abs_tol=FINGERPRINT_RTOL)]
    if bad or set(saved) != set(now):
        raise ModelError(f"{source}: the backbone rebuilt from config.yaml differs from the run's (first: "
                         f"{(bad or sorted(set(saved) ^ set(now)))[0]}); other pretrained weights or timm version?")
    why = restore_base(model, {layer: tensors[f"base/{layer}"] for layer in bases},
                       {k.removeprefix("exact/"): v for k, v in exact.items()})
    if why is not None:
        raise ModelError(f"{source}: {why}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"global/{k}"])


def run_config(run_dir: Path) -> RunConfig:
    """The resolved config of a run directory (``config.yaml``)."""
    from ..config import resolve

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return resolve(str(path), [])


def load_final(run_dir: Path, device: str | torch.device = "cpu") -> FedModel:
    """Rebuild a run's final global model from ``config.yaml`` and ``final_model.safetensors``.

    Raises:
        ConfigError: ``run_dir`` has no readable config.
        ModelError: no final model, a corrupted one, or a backbone that rebuilds differently.
    """
    from .build import build_components

    cfg = run_config(run_dir)
    path = run_dir / FINAL_MODEL
    tensors, meta = read_final(path)
    num_classes = int(meta.get("num_classes", tensors["global/head.weight"].shape[0]))
    model = build_components(cfg, num_classes).model  # with the tensors the method trains beyond LoRA and head
    load_into(model, tensors, meta, path)
    model.eval()
    return model.to(device)


# --- the run directory of a run ---------------------------------------------------------------------

METRICS = "metrics.json"


def write_metrics(run_dir: Path, history: History) -> None:
    """Rewrite ``RUN_DIR/metrics.json`` from the run's history."""
    atomic_write_text(run_dir / METRICS, history.to_json())


def method_state(method: Method, classifier: Classifier) -> dict[str, torch.Tensor]:
    """The server-side state a resumed run needs: the method's, and the classifier's as ``classifier.<key>``."""
    state = dict(method.checkpoint_state())
    state.update({f"classifier.{k}": v for k, v in classifier.checkpoint_state().items()})
    return state


def open_run_dir(run_dir: Path | None, cfg: RunConfig, exp: Experiment, resume: bool) -> Checkpoint | None:
    """Write the run's fixed files (fresh run) or verify them and load the latest checkpoint (resume)."""
    if run_dir is None:
        return None
    partitions = exp.partitions_json()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_text(run_dir / "partitions.json", json.dumps(partitions))
        return None
    ckpt = load_latest(run_dir, cfg.to_dict())
    part_file = run_dir / "partitions.json"
    if part_file.is_file():
        saved = _read_partitions(part_file)
        if saved != json.loads(json.dumps(partitions)):
            raise CheckpointError(f"{part_file} differs from the partitions this config draws now (other data "
                                  "or another fedtalora version?); the run cannot be resumed exactly")
    else:
        atomic_write_text(part_file, json.dumps(partitions))
    for stale in (run_dir / DIRNAME).glob("*.tmp"):  # torn writes of the crashed session
        stale.unlink(missing_ok=True)
    if ckpt is None:
        logger.warning("%s has no checkpoint yet: starting the run from its first round", run_dir)
    return ckpt


def _read_partitions(path: Path) -> Any:
    """``partitions.json`` through the guarded reader, checked against :data:`fedtalora.schema.PARTITIONS`."""
    from ..schema import PARTITIONS, load_checked

    return load_checked(path, PARTITIONS, error=CheckpointError)


def restore(ckpt: Checkpoint, setup: Setup, initial: dict[str, torch.Tensor],
            ledger: DownlinkLedger) -> tuple[dict[str, torch.Tensor], History]:
    """Load a checkpoint into the model, method, classifier and ledger; returns (global state, history so far)."""
    model, method, classifier = setup.model, setup.method, setup.classifier
    check_tensors(ckpt, "global state", ckpt.global_state, initial)
    bases = {p.layer: model.base_weight(p.layer) for p in model.lora_pairs()}
    check_tensors(ckpt, "base weights", ckpt.base, bases)
    why = restore_base(model, ckpt.base, ckpt.exact)
    if why is not None:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match the model: {why}")
    model.load_trainable(ckpt.global_state)
    own = {k: v for k, v in ckpt.method_state.items() if not k.startswith("classifier.")}
    theirs = {k[len("classifier."):]: v for k, v in ckpt.method_state.items() if k.startswith("classifier.")}
    try:
        method.load_checkpoint_state(own)
        classifier.load_checkpoint_state(theirs)
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: {e}") from None
    dense = dict(ledger.dense)  # what a dense catch-up costs follows from the model (format 1: the float32 base)
    try:
        ledger.load_state_dict(ckpt.ledger)
        ledger.dense = dense
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {ckpt.path} has a corrupted or foreign communication ledger") from None
    try:
        history = History.from_dict(ckpt.metrics)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} holds malformed metrics: {e}") from None
    return {k: ckpt.global_state[k] for k in initial}, history  # in the model's key order
