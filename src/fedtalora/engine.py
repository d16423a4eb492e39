"""The task x round loop. It exists once; methods plug in through :class:`~fedtalora.methods.Method`.

::

    for task t:                                 # classes arrive as disjoint groups
        partition task t's training data over all clients (fixed for the task)
        for round r:
            S <- sample fed.clients_per_round clients              (seeded)
            for k in S: local_train from the global state -> (state_k, n_k)
            server: p_k = n_k / sum n; aggregate (FedAvg + residual); apply to the global model
        evaluate on the test data of every task seen so far -> row t of the accuracy matrix

The run directory receives ``config.yaml`` and ``partitions.json`` at the start and ``metrics.json``
after every task, so an interrupted run keeps everything it computed.
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

from . import __version__
from .aggregation import normalize_weights, residual_nbytes, state_nbytes
from .client import accuracy_per_task, local_train, predict
from .comm import DownlinkLedger
from .config import RunConfig
from .data import Dataset, ImageTransform, load_dataset
from .errors import ConfigError
from .methods import METHODS, Method
from .metrics import summarize
from .model import FedModel, build_model
from .partition import class_counts, partition_task
from .scenario import Scenario, make_scenario
from .seeding import numpy_rng, torch_generator

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
        data = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed, download=cfg.data.download)
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def environment() -> dict[str, Any]:
    return {"fedtalora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def _class_mask(kind: str, task_mask: torch.Tensor, targets: np.ndarray) -> torch.Tensor | None:
    """Which head outputs take part in the local loss (``train.logit_mask``)."""
    if kind == "none":
        return None
    if kind == "client":
        mask = torch.zeros_like(task_mask)
        mask[torch.as_tensor(np.unique(targets))] = True
        return mask
    return task_mask


@dataclass
class Setup:
    """Everything built from the config before the first round: data, partitions, model, method."""

    cfg: RunConfig
    exp: Experiment
    model: FedModel
    method: Method
    transform: ImageTransform
    device: torch.device


def prepare(cfg: RunConfig) -> Setup:
    """Load data, draw the scenario and partitions, build the model; raises on any bad input."""
    device = resolve_device(cfg.train.device)
    method: Method = METHODS.get(cfg.method)(cfg)
    exp = Experiment.build(cfg)
    model = build_model(cfg.model, cfg.lora, exp.scenario.num_classes, cfg.data.image_size, cfg.seed).to(device)
    transform = ImageTransform(cfg.data.image_size, model.spec.mean, model.spec.std)
    return Setup(cfg, exp, model, method, transform, device)


def run(cfg: RunConfig | Setup, run_dir: Path | None = None, progress: ProgressFn | None = None) -> RunResult:
    """Run one experiment end to end and return its metrics.

    Args:
        cfg: a validated config, or what :func:`prepare` built from one.
        run_dir: where to write ``config.yaml``, ``partitions.json`` and ``metrics.json`` (None: nowhere).
        progress: called with event dicts (``start``, ``client``, ``round``, ``task``) for progress display.
    """
    emit = progress or (lambda _e: None)
    t_start = time.perf_counter()
    setup = cfg if isinstance(cfg, Setup) else prepare(cfg)
    cfg, exp, model, method = setup.cfg, setup.exp, setup.model, setup.method
    transform, device = setup.transform, setup.device
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        _atomic_write(run_dir / "partitions.json", json.dumps(exp.partitions_json()))

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
        "environment": environment(),
    }
    emit({"event": "start", "num_tasks": T, "rounds_per_task": R, "clients_per_round": m,
          "pretrained": model.spec.pretrained, "backbone": cfg.model.backbone, "device": str(device)})
    acc_rows: list[list[float]] = []
    test_sizes = [int((exp.test_task == t).sum()) for t in range(T)]
    for task in exp.scenario.tasks:
        t = task.index
        t_task = time.perf_counter()
        task_mask = torch.zeros(exp.scenario.num_classes, dtype=torch.bool)
        task_mask[task.label_offset:task.label_offset + len(task.classes)] = True
        for r in range(R):
            t_round = time.perf_counter()
            clients = sorted(numpy_rng(cfg.seed, "sample", t, r).choice(cfg.fed.num_clients, m, replace=False).tolist())
            downlink = 0
            results = []
            for k in clients:
                downlink += state_nbytes(global_state) + ledger.catch_up_bytes(k)
                ledger.sync(k)
                idx = exp.partitions[t][k]
                targets = exp.train_targets[idx]
                mask = _class_mask(cfg.train.logit_mask, task_mask, targets)
                res = local_train(
                    model, method, global_state, client=k, split=exp.dataset.train, indices=idx, targets=targets,
                    class_mask=mask, transform=transform, cfg=cfg.train,
                    generator=torch_generator(cfg.seed, "local", t, r, k), device=device,
                )
                results.append(res)
                emit({"event": "client", "task": t, "round": r, "client": k, "loss": res.loss})
            weights = normalize_weights(
                [res.num_samples for res in results] if cfg.fed.weighting == "samples" else [1.0] * len(results)
            )
            agg = method.aggregate(model, [res.state for res in results], weights)
            method.apply(model, agg)
            global_state = {k: v.detach().clone() for k, v in agg.state.items()}
            factored = {layer: residual_nbytes(*model.base_weight(layer).shape, inner=agg.residual_ranks[layer])[1]
                        for layer in agg.residuals}
            ledger.record_round(factored)
            record = {
                "task": t, "round": r, "clients": clients,
                "num_samples": [res.num_samples for res in results],
                "train_loss": float(np.average([res.loss for res in results], weights=weights.numpy())),
                "aggregation_error": agg.max_error,
                "uplink_bytes": sum(state_nbytes(res.state) for res in results),
                "downlink_bytes": downlink,
                "residual_bytes_dense": sum(dense[layer] for layer in agg.residuals),
                "residual_bytes_factored": sum(factored.values()),
                "seconds": time.perf_counter() - t_round,
            }
            metrics["rounds"].append(record)
            logger.info("[task %d/%d | round %d/%d] loss=%.4f aggregation_error=%.3g up=%d B down=%d B",
                        t + 1, T, r + 1, R, record["train_loss"], record["aggregation_error"],
                        record["uplink_bytes"], record["downlink_bytes"])
            emit({"event": "round", **record})
        # Evaluate on every task seen so far.
        seen = np.flatnonzero(exp.test_task <= t)
        preds = predict(model, exp.dataset.test, seen, num_seen=exp.scenario.seen_classes(t), transform=transform,
                        batch_size=cfg.train.eval_batch_size, device=device, precision=cfg.train.precision)
        row = accuracy_per_task(preds, exp.test_targets[seen], exp.test_task[seen], t + 1)
        acc_rows.append(row)
        metrics["accuracy_matrix"] = [r_ + [None] * (T - len(r_)) for r_ in acc_rows]
        summary = summarize([r_ + [None] * (len(acc_rows) - len(r_)) for r_ in acc_rows], test_sizes[: t + 1])
        metrics.update(summary)
        metrics["tasks"].append({"task": t, "classes": [int(c) for c in task.classes], "accuracy": row,
                                 "seen_accuracy": summary["seen_accuracy"][-1],  # type: ignore[index]
                                 "seconds": time.perf_counter() - t_task})
        metrics["wall_seconds"] = time.perf_counter() - t_start
        logger.info("[task %d/%d] accuracy on seen classes %.4f", t + 1, T, summary["seen_accuracy"][-1])  # type: ignore[index]
        emit({"event": "task", "task": t, "accuracy": row, "seen_accuracy": summary["seen_accuracy"][-1]})  # type: ignore[index]
        if run_dir is not None:
            _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    metrics["complete"] = True
    metrics["uplink_bytes_total"] = sum(r_["uplink_bytes"] for r_ in metrics["rounds"])
    metrics["downlink_bytes_total"] = sum(r_["downlink_bytes"] for r_ in metrics["rounds"])
    metrics["max_aggregation_error"] = max((r_["aggregation_error"] for r_ in metrics["rounds"]), default=0.0)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if run_dir is not None:
        _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    return RunResult(metrics=metrics, run_dir=run_dir, model=model)
