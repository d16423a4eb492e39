"""The task x round loop. It exists once; methods plug in through :class:`~fedtalora.methods.Method`.

::

    for task t:                                 # classes arrive as disjoint groups
        partition task t's training data over all clients (fixed for the task)
        for round r:
            S <- sample fed.clients_per_round clients              (seeded)
            for k in S: local_train from the global state -> (state_k, n_k)   (or k drops out: faults.*)
            server: screen the updates (validation.py); fewer than fed.min_clients valid -> skip the round
                    p_k = n_k / sum n; aggregate (FedAvg + residual); apply to the global model
            (last round of the task) evaluate on the test data of every task seen so far -> row t
            checkpoint the round (checkpoint.py) and rewrite metrics.json

Clients are reached through a :class:`~fedtalora.transport.Transport`: direct calls in this process
(``engine=inprocess``) or Flower messages (``engine=flower-sim`` / ``flower``, :mod:`fedtalora.flower`);
the loop, screening, aggregation, evaluation, metrics and checkpoints are the same for all of them.

The run directory receives ``config.yaml`` and ``partitions.json`` at the start, then a checkpoint
and ``metrics.json`` after every round, so an interrupted run keeps everything it computed and
``run(..., resume=True)`` continues it to the same result. Every event also reaches the run's trackers
(``rounds.csv``, ``tasks.csv``, optional TensorBoard: :mod:`fedtalora.tracking`), and a finished run
leaves its final model in ``final_model.safetensors`` (:mod:`fedtalora.state`).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, checkpoint
from .aggregation import normalize_weights, residual_nbytes, state_nbytes
from .checkpoint import Checkpoint, atomic_write_text
from .classifier import with_classifier
from .client import accuracy_per_task, predict
from .comm import DownlinkLedger
from .config import RunConfig
from .data import Dataset, ImageTransform, load_from_config
from .errors import CheckpointError, ConfigError
from .faults import corrupt, draw_fault
from .methods import METHODS, Method
from .metrics import summarize
from .model import FedModel, build_model
from .partition import class_counts, partition_task
from .scenario import Scenario, make_scenario
from .seeding import numpy_rng
from .state import FINAL_MODEL, save_final
from .text_data import TextTransform, tokenize_split
from .tracking import fan_out, open_trackers, provenance
from .transport import InProcessTransport, RoundJob, Transport
from .transport import class_mask as _class_mask  # noqa: F401  (re-exported: the loss mask of a client round)
from .transport import model_rng as _model_rng  # noqa: F401
from .validation import check_update

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    """Everything a run measured (also written to ``metrics.json``)."""

    metrics: dict[str, Any]
    run_dir: Path | None = None
    model: FedModel | None = field(default=None, repr=False)

    @property
    def final_average_accuracy(self) -> float:
        return self.metrics["final_average_accuracy"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


@dataclass
class Experiment:
    """The fixed ingredients of a run, built once from the config."""

    cfg: RunConfig
    dataset: Dataset
    scenario: Scenario
    partitions: list[list[np.ndarray]]
    """``partitions[t][k]``: indices into the training split held by client ``k`` during task ``t``."""
    train_targets: np.ndarray
    """Head-output label (position in the class order) of every training sample."""
    test_targets: np.ndarray
    test_task: np.ndarray
    """Task index of every test sample."""

    @classmethod
    def build(cls, cfg: RunConfig) -> Experiment:
        data = load_from_config(cfg.data, cfg.seed)
        order_rng = numpy_rng(cfg.seed, "class-order")
        scenario = make_scenario(data.num_classes, cfg.scenario.num_tasks, order_rng, cfg.scenario.class_order)
        train_targets = scenario.remap(data.train.labels)
        test_targets = scenario.remap(data.test.labels)
        task_of_class = np.empty(data.num_classes, dtype=np.int64)
        for task in scenario.tasks:
            task_of_class[list(task.classes)] = task.index
        partitions = []
        p = cfg.partition
        for task in scenario.tasks:
            idx = np.flatnonzero(task_of_class[data.train.labels] == task.index)
            parts = partition_task(
                p.kind, data.train.labels[idx], cfg.fed.num_clients, numpy_rng(cfg.seed, "partition", task.index),
                alpha=p.alpha, beta=p.beta, min_samples=p.min_samples, max_redraws=p.max_redraws,
            )
            partitions.append([idx[part] for part in parts])
        return cls(cfg, data, scenario, partitions, train_targets, test_targets, task_of_class[data.test.labels])

    def partitions_json(self) -> dict[str, Any]:
        labels = self.dataset.train.labels
        tasks = []
        for task, parts in zip(self.scenario.tasks, self.partitions, strict=True):
            counts = class_counts(labels, parts)
            tasks.append({
                "task": task.index,
                "classes": [int(c) for c in task.classes],
                "clients": [
                    {"client": k, "num_samples": int(len(ix)), "indices": ix.tolist(),
                     "class_counts": {str(c): int(n) for c, n in sorted(cc.items())}}
                    for k, (ix, cc) in enumerate(zip(parts, counts, strict=True))
                ],
            })
        return {"dataset": self.dataset.name, "split": "train", "num_clients": self.cfg.fed.num_clients,
                "partition": self.cfg.to_dict()["partition"], "tasks": tasks}


def environment() -> dict[str, Any]:
    return {"fedtalora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


@dataclass
class Setup:
    """Everything built from the config before the first round: data, partitions, model, method."""

    cfg: RunConfig
    exp: Experiment
    model: FedModel
    method: Method
    transform: Callable[..., Any]
    """Batch preprocessing: :class:`~fedtalora.data.ImageTransform` or
    :class:`~fedtalora.text_data.TextTransform`."""
    device: torch.device


def prepare(cfg: RunConfig) -> Setup:
    """Load data, draw the scenario and partitions, build the model; raises on any bad input."""
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method: Method = with_classifier(METHODS.get(cfg.method)(cfg), cfg.classifier.kind, cfg.classifier.metric)
    if cfg.engine != "inprocess":  # Flower installed, the method's clients need no server-side state
        from .flower import check_engine

        check_engine(cfg, method)
    exp = Experiment.build(cfg)
    model = build_model(cfg.model, cfg.lora, exp.scenario.num_classes, cfg.data.image_size, cfg.seed)
    names = exp.dataset.class_names
    method.set_class_names([names[c] for task in exp.scenario.tasks for c in task.classes])  # head order
    method.attach(model)  # what the method trains beyond LoRA and head
    model = model.to(device)
    modality = exp.dataset.modality
    if modality != model.spec.modality:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is {modality} data but model.backbone="
                          f"{cfg.model.backbone!r} is a{'n' if model.spec.modality == 'image' else ''} "
                          f"{model.spec.modality} model")
    transform: Callable[..., Any]
    if modality == "text":
        tokenizer = model.backbone.tokenizer
        data = exp.dataset
        data.train = tokenize_split(data.train, tokenizer, cfg.data.max_length)
        data.test = tokenize_split(data.test, tokenizer, cfg.data.max_length)
        transform = TextTransform()
    else:
        transform = ImageTransform(cfg.data.image_size, model.spec.mean, model.spec.std)
    return Setup(cfg, exp, model, method, transform, device)


def run(cfg: RunConfig | Setup, run_dir: Path | None = None, progress: ProgressFn | None = None, *,
        resume: bool = False, transport: Transport | None = None) -> RunResult:
    """Run one experiment end to end and return its metrics.

    Args:
        cfg: a validated config, or what :func:`prepare` built from one.
        run_dir: where to write ``config.yaml``, ``partitions.json``, ``metrics.json`` and the round
            checkpoints (None: nowhere).
        progress: called with event dicts (``start``, ``client``, ``round``, ``task``, ``end``) for progress
            display; the run directory's trackers (:mod:`fedtalora.tracking`) get the same events.
        resume: continue ``run_dir`` from its latest checkpoint (from the start if it has none); the
            result is identical to an uninterrupted run except for :data:`TIMING_FIELDS`.
        transport: how clients are reached; None: as ``engine`` says (``flower-sim`` starts Flower's
            simulation, whose ServerApp calls this function again with its message transport).

    Raises:
        CheckpointError: ``resume`` and the run directory's checkpoint or partitions are corrupted or
            belong to another config (nothing in the run directory is changed then).
    """
    t_start = time.perf_counter()
    setup = cfg if isinstance(cfg, Setup) else prepare(cfg)
    if transport is None and setup.cfg.engine != "inprocess":
        from .flower import run_engine

        return run_engine(setup, run_dir, progress, resume=resume)
    if resume and run_dir is None:
        raise ValueError("resume needs a run directory")
    ckpt = _open_run_dir(run_dir, setup.cfg, setup.exp, resume)
    transport = transport if transport is not None else InProcessTransport()
    try:
        return _loop(setup, run_dir, progress, transport, ckpt, t_start)
    finally:
        transport.close()


def _loop(setup: Setup, run_dir: Path | None, progress: ProgressFn | None, transport: Transport,
          ckpt: Checkpoint | None, t_start: float) -> RunResult:
    """The task x round loop of :func:`run` (the run directory is open)."""
    cfg, exp, model, method = setup.cfg, setup.exp, setup.model, setup.method
    transform, device = setup.transform, setup.device
    emit = fan_out(progress, *open_trackers(cfg, run_dir))  # progress display, rounds.csv/tasks.csv, TensorBoard

    keys = method.trainable_keys(model)
    global_state = model.trainable_state(keys)
    pairs = model.lora_pairs()
    dense = {p.layer: residual_nbytes(*model.base_weight(p.layer).shape, inner=0)[0] for p in pairs}
    ledger = DownlinkLedger(dense)
    T, R = exp.scenario.num_tasks, cfg.fed.rounds_per_task
    m = cfg.fed.clients_per_round
    metrics: dict[str, Any] = {
        "method": cfg.method, "seed": cfg.seed, "complete": False,
        "backbone": cfg.model.backbone, "pretrained": model.spec.pretrained,
        "accuracy_matrix": [], "rounds": [], "tasks": [],
        "trainable_parameters": int(sum(t.numel() for t in global_state.values())),
        "environment": {**environment(), **provenance(device)},
    }
    done, elapsed_before, resumes = 0, 0.0, []  # rounds completed in earlier sessions of this run
    if ckpt is not None:
        global_state, metrics = _restore(ckpt, model, method, global_state, ledger)
        done, elapsed_before = ckpt.completed_rounds, ckpt.elapsed_seconds
        resumes = [*ckpt.resumes, {"completed_rounds": done}]
        logger.info("resuming %s after %d of %d rounds (task %d, round %d)", run_dir, done, T * R,
                    ckpt.task + 1, ckpt.round + 1)
    transport.open(setup, resumed=done > 0)

    def save_progress(t: int, r: int) -> None:
        metrics["wall_seconds"] = elapsed_before + time.perf_counter() - t_start
        if run_dir is None:
            return
        if cfg.output.checkpoints != "none":
            state = Checkpoint(
                completed_rounds=t * R + r + 1, task=t, round=r, global_state=global_state,
                base={p.layer: model.base_weight(p.layer) for p in pairs},
                method_state=method.checkpoint_state() if hasattr(method, "checkpoint_state") else {},
                ledger=ledger.state_dict(), metrics=metrics, elapsed_seconds=metrics["wall_seconds"],
                resumes=resumes)
            checkpoint.save(run_dir, state, cfg.to_dict(), keep=cfg.output.checkpoints)
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))

    emit({"event": "start", "num_tasks": T, "rounds_per_task": R, "clients_per_round": m,
          "pretrained": model.spec.pretrained, "backbone": cfg.model.backbone, "device": str(device),
          "completed_rounds": done})
    test_sizes = [int((exp.test_task == t).sum()) for t in range(T)]
    for task in exp.scenario.tasks:
        t = task.index
        if (t + 1) * R <= done:  # finished before the resume
            continue
        t_task = time.perf_counter()
        if t * R >= done:  # a fresh task, not one resumed inside
            method.on_task_start(model, task)  # e.g. pilora: merge the last task's LoRA, start a new one
            global_state = model.trainable_state(keys)
        for r in range(R):
            if t * R + r < done:
                continue
            t_round = time.perf_counter()
            clients = sorted(numpy_rng(cfg.seed, "sample", t, r).choice(cfg.fed.num_clients, m, replace=False).tolist())
            downlink = downlink_dense = uplink = 0
            dropped, corrupted, rejected, accepted = [], [], [], []
            buffer = method.new_buffer()
            faults = {k: draw_fault(cfg.faults, cfg.seed, t, r, k) for k in clients}
            for k in clients:
                extra = method.downlink(task, r, k)  # e.g. a generator, the previous task's model
                downlink += state_nbytes(global_state) + ledger.catch_up_bytes(k) + extra
                downlink_dense += state_nbytes(global_state) + ledger.catch_up_bytes(k, "dense") + extra
                ledger.sync(k)
            for outcome in transport.train(RoundJob(task, r, clients, global_state, faults)):
                k, res, fault = outcome.client, outcome.result, faults[outcome.client]
                if res is None:  # received the model, returned nothing
                    dropped.append(k)
                    logger.warning("[task %d/%d | round %d/%d] client %d dropped out (%s)",
                                   t + 1, T, r + 1, R, k, outcome.error or "no update")
                    emit({"event": "client", "task": t, "round": r, "client": k, "loss": None})
                    continue
                if fault.corrupted and fault.rng is not None:
                    res.state = corrupt(res.state, global_state, cfg.faults.corrupt_kind, fault.rng)
                    corrupted.append(k)
                # The server trusts no update: it screens each on arrival and buffers the valid ones
                # (the buffer keeps what aggregation needs: all of them, or a running sum for finetune).
                uplink += state_nbytes(res.state)
                why = check_update(res.state, res.num_samples, global_state, max_norm=cfg.fed.max_update_norm)
                if why is None:
                    buffer.add(res.state, res.num_samples if cfg.fed.weighting == "samples" else 1.0)
                    accepted.append(res)
                else:
                    rejected.append({"client": k, "reason": why})
                    logger.warning("[task %d/%d | round %d/%d] rejected the update of client %d: %s",
                                   t + 1, T, r + 1, R, k, why)
                res.state = {}
                emit({"event": "client", "task": t, "round": r, "client": k, "loss": res.loss})
            skipped = len(accepted) < cfg.fed.min_clients
            factored: dict[str, int] = {}
            agg_error: float | None = None
            naive_error: float | None = None
            weights = None
            if skipped:
                logger.warning("[task %d/%d | round %d/%d] round skipped: %d valid updates < fed.min_clients=%d; "
                               "the global model is unchanged", t + 1, T, r + 1, R, len(accepted), cfg.fed.min_clients)
                model.load_trainable(global_state)  # undo what local training left in the shared model
            else:
                weights = normalize_weights(buffer.counts)
                agg = method.aggregate_buffer(model, buffer)
                del buffer
                method.apply(model, agg)
                global_state = {k: v.detach().clone() for k, v in agg.state.items()}
                factored = {layer: residual_nbytes(*model.base_weight(layer).shape, inner=agg.residual_ranks[layer])[1]
                            for layer in agg.residuals}
                agg_error = agg.max_error
                naive_error = agg.max_naive_error
            ledger.record_round(factored)
            transport.after_round(None if skipped else agg)  # e.g. Flower: the next base the clients sync to
            if not skipped:  # e.g. glfc: the proxy server watches every new global model
                uplink += method.on_round_end(model, task, r, transport.task_data(t, [res.client for res in accepted]))
            if r == R - 1:  # e.g. pilora: the reporting clients send class feature sums -> prototypes
                uplink += method.on_task_end(model, task, transport.task_data(
                    t, [] if skipped else [res.client for res in accepted]))
                global_state = model.trainable_state(keys)
            record = {
                "task": t, "round": r, "clients": clients,
                "aggregated": [res.client for res in accepted],
                "num_samples": [res.num_samples for res in accepted],
                "dropped": dropped, "corrupted": corrupted, "rejected": rejected, "skipped": skipped,
                "train_loss": None if weights is None else float(
                    np.average([res.loss for res in accepted], weights=weights.numpy())),
                "aggregation_error": agg_error,
                "naive_aggregation_loss": naive_error,  # what averaging the factors alone would lose (max layer)
                "uplink_bytes": uplink,
                "downlink_bytes": downlink,
                "downlink_bytes_dense": downlink_dense,  # the same, residual catch-ups sent dense
                "residual_bytes_dense": sum(dense[layer] for layer, nbytes in factored.items() if nbytes),  # 0: no residual
                "residual_bytes_factored": sum(factored.values()),
                "seconds": time.perf_counter() - t_round,
                **transport.round_stats(),  # e.g. Flower: the bytes that went over the wire
            }
            extra_fields = method.round_record()  # e.g. generator training time, synthetic samples, memory size
            clash = sorted(set(extra_fields) & set(record))
            if clash:
                raise RuntimeError(f"method {method.name!r} reports round fields the loop owns: {clash}")
            record.update(extra_fields)
            metrics["rounds"].append(record)
            if not skipped:
                logger.info("[task %d/%d | round %d/%d] loss=%.4f aggregation_error=%.3g up=%d B down=%d B",
                            t + 1, T, r + 1, R, record["train_loss"], record["aggregation_error"],
                            record["uplink_bytes"], record["downlink_bytes"])
            emit({"event": "round", **record})
            if r == R - 1:  # the task's last round: evaluate before checkpointing it
                _evaluate_task(exp, model, method, task, transform, device, cfg, metrics, test_sizes, T, t_task, emit)
            save_progress(t, r)
    _finish(metrics)
    transport.finish(metrics)
    metrics["wall_seconds"] = elapsed_before + time.perf_counter() - t_start
    if run_dir is not None:
        save_final(model, run_dir / FINAL_MODEL)  # before metrics.json says complete
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    emit({"event": "end", "metrics": metrics})
    return RunResult(metrics=metrics, run_dir=run_dir, model=model)


def _evaluate_task(exp: Experiment, model: FedModel, method: Method, task: Any, transform: ImageTransform,
                   device: torch.device, cfg: RunConfig, metrics: dict[str, Any], test_sizes: list[int], T: int,
                   t_task: float, emit: ProgressFn) -> None:
    """Accuracy on every task seen so far -> row ``t`` of the accuracy matrix and the summaries."""
    t = task.index
    seen = np.flatnonzero(exp.test_task <= t)
    preds = predict(model, exp.dataset.test, seen, num_seen=exp.scenario.seen_classes(t), transform=transform,
                    batch_size=cfg.train.eval_batch_size, device=device, precision=cfg.train.precision, method=method)
    row = accuracy_per_task(preds, exp.test_targets[seen], exp.test_task[seen], t + 1)
    acc_rows = [[v for v in r_ if v is not None] for r_ in metrics["accuracy_matrix"]] + [row]
    metrics["accuracy_matrix"] = [r_ + [None] * (T - len(r_)) for r_ in acc_rows]
    summary = summarize([r_ + [None] * (len(acc_rows) - len(r_)) for r_ in acc_rows], test_sizes[: t + 1])
    metrics.update(summary)
    metrics["tasks"].append({"task": t, "classes": [int(c) for c in task.classes], "accuracy": row,
                             "seen_accuracy": summary["seen_accuracy"][-1],  # type: ignore[index]
                             "seconds": time.perf_counter() - t_task})
    logger.info("[task %d/%d] accuracy on seen classes %.4f", t + 1, T, summary["seen_accuracy"][-1])  # type: ignore[index]
    emit({"event": "task", **metrics["tasks"][-1]})


def _finish(metrics: dict[str, Any]) -> None:
    """Run totals, once every round is done."""
    rounds = metrics["rounds"]
    metrics["complete"] = True
    metrics["uplink_bytes_total"] = sum(r_["uplink_bytes"] for r_ in rounds)
    metrics["downlink_bytes_total"] = sum(r_["downlink_bytes"] for r_ in rounds)
    for key in ("downlink_bytes_dense", "residual_bytes_dense", "residual_bytes_factored"):
        metrics[f"{key}_total"] = sum(r_.get(key, 0) for r_ in rounds)
    metrics["max_aggregation_error"] = max(
        (r_["aggregation_error"] for r_ in rounds if r_["aggregation_error"] is not None), default=0.0)
    naive = [r_["naive_aggregation_loss"] for r_ in rounds if r_.get("naive_aggregation_loss") is not None]
    metrics["naive_aggregation_loss_mean"] = float(np.mean(naive)) if naive else None
    metrics["naive_aggregation_loss_max"] = max(naive) if naive else None
    metrics["reliability"] = {
        "dropped_clients": sum(len(r_["dropped"]) for r_ in rounds),
        "corrupted_updates": sum(len(r_["corrupted"]) for r_ in rounds),
        "rejected_updates": sum(len(r_["rejected"]) for r_ in rounds),
        "skipped_rounds": sum(bool(r_["skipped"]) for r_ in rounds),
    }


TIMING_FIELDS = ("wall_seconds", "rounds[*].seconds", "rounds[*].*_seconds", "tasks[*].seconds")
"""The fields of ``metrics.json`` that measure time: the only ones that differ between two runs of the
same config on CPU, or between an interrupted-and-resumed run and an uninterrupted one."""


def without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``metrics`` without :data:`TIMING_FIELDS` (for comparing runs)."""
    out = {k: v for k, v in metrics.items() if k != "wall_seconds"}
    for key in ("rounds", "tasks"):
        if key in out:
            out[key] = [{k: v for k, v in rec.items() if k != "seconds" and not k.endswith("_seconds")}
                        for rec in out[key]]
    return out


def _open_run_dir(run_dir: Path | None, cfg: RunConfig, exp: Experiment, resume: bool) -> Checkpoint | None:
    """Write the run's fixed files (fresh run) or verify them and load the latest checkpoint (resume)."""
    if run_dir is None:
        return None
    partitions = exp.partitions_json()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_text(run_dir / "partitions.json", json.dumps(partitions))
        return None
    ckpt = checkpoint.load_latest(run_dir, cfg.to_dict())
    part_file = run_dir / "partitions.json"
    if part_file.is_file():
        try:
            saved = json.loads(part_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if saved != json.loads(json.dumps(partitions)):
            raise CheckpointError(f"{part_file} differs from the partitions this config draws now (other data "
                                  "or another fedtalora version?); the run cannot be resumed exactly")
    else:
        atomic_write_text(part_file, json.dumps(partitions))
    for stale in (run_dir / checkpoint.DIRNAME).glob("*.tmp"):  # torn writes of the crashed session
        stale.unlink(missing_ok=True)
    if ckpt is None:
        logger.warning("%s has no checkpoint yet: starting the run from its first round", run_dir)
    return ckpt


def _restore(ckpt: Checkpoint, model: FedModel, method: Method, initial: dict[str, torch.Tensor],
             ledger: DownlinkLedger) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint into the model, method and ledger; returns (global state, metrics so far)."""
    checkpoint.check_tensors(ckpt, "global state", ckpt.global_state, initial)
    bases = {p.layer: model.base_weight(p.layer) for p in model.lora_pairs()}
    checkpoint.check_tensors(ckpt, "base weights", ckpt.base, bases)
    with torch.no_grad():
        for layer, w in bases.items():
            w.copy_(ckpt.base[layer])
    model.load_trainable(ckpt.global_state)
    try:
        if hasattr(method, "load_checkpoint_state"):
            method.load_checkpoint_state(ckpt.method_state)
        elif ckpt.method_state:
            raise CheckpointError(f"method {method.name!r} keeps no checkpoint state, got {sorted(ckpt.method_state)[:3]}")
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: {e}") from None
    try:
        ledger.load_state_dict(ckpt.ledger)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {ckpt.path} has a corrupted or foreign communication ledger") from None
    return {k: ckpt.global_state[k] for k in initial}, ckpt.metrics  # in the model's key order
