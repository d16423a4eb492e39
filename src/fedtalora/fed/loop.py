"""The task x round loop. It exists once; methods plug in through :class:`~fedtalora.methods.Method`.

::

    for task t:                                 # classes arrive as disjoint groups
        (fresh task) method.on_task_start
        for round r:
            sample:    S <- fed.clients_per_round clients                        (seeded)
            collect:   for k in S: local training from the global state -> (state_k, n_k)  (or k drops
                       out: faults.*); the server screens each update on arrival (validation.py)
            aggregate: fewer than fed.min_clients valid -> skip the round; else p_k = n_k / sum n,
                       FedAvg + residual, applied to the global model; the error the model really has
                       (per round and since the start, in float64: core/exact.py)
            (last round) end-of-task client work: method.on_task_end, classifier.on_task_end
            record:    a RoundRecord (history.py)
            (last round) evaluate on the test data of every task seen so far -> row t
            checkpoint the round and rewrite metrics.json (rundir.py)

Clients are reached through a :class:`~fedtalora.fed.transport.Transport`: direct calls in this process
(:class:`~fedtalora.fed.transport.InProcessTransport`) or Flower messages (:mod:`fedtalora.flower`); the
loop, screening, aggregation, evaluation, metrics and checkpoints are the same for all of them. Which
transport runs is decided by :func:`fedtalora.api.run`, never here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.aggregation import Aggregate, LoraPair, normalize_weights, state_nbytes
from ..core.comm import DownlinkLedger, dense_catch_up_nbytes, factored_nbytes
from ..core.exact import max_error, max_naive, round_errors
from ..core.scenario import Task
from ..core.validation import check_update
from ..seeding import numpy_rng
from . import rundir
from .build import Setup, environment
from .cache import cached_inputs
from .client import accuracy_per_task, predict
from .faults import corrupt, draw_fault
from .history import History, RoundRecord, TaskRecord
from .screening import warn_if_large
from .tracking import fan_out, open_trackers
from .transport import ClientResult, RoundJob, Transport

logger = logging.getLogger(__name__)

__all__ = ["Emit", "RunResult", "run_loop"]

Emit = Callable[[dict[str, Any]], None]
"""Receives the loop's event dicts (``start``, ``client``, ``round``, ``task``, ``end``): progress display and
trackers (:mod:`fedtalora.fed.tracking`)."""


@dataclass
class RunResult:
    """Everything a run measured (also written to ``metrics.json``)."""

    history: History
    run_dir: Path | None = None
    model: Any = field(default=None, repr=False)
    """The final global model (:class:`~fedtalora.model.FedModel`)."""

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` as a dict."""
        return self.history.to_dict()

    @property
    def final_average_accuracy(self) -> float | None:
        return self.history.final_average_accuracy


@dataclass
class _Round:
    """What one round produced on the server before it is recorded."""

    clients: list[int]
    accepted: list[ClientResult] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    corrupted: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    large: list[int] = field(default_factory=list)
    uplink: int = 0
    downlink: int = 0
    downlink_dense: int = 0
    agg: Aggregate | None = None
    weights: torch.Tensor | None = None
    factored: dict[str, int] = field(default_factory=dict)
    exactness: dict[str, float | None] = field(default_factory=dict)
    """The truthful errors of the round (``aggregation_error*`` fields of the :class:`RoundRecord`)."""


class _Loop:
    """The state of one session of a run, and its steps."""

    def __init__(self, setup: Setup, run_dir: Path | None, emit: Emit, transport: Transport,
                 ckpt: rundir.Checkpoint | None, t_start: float) -> None:
        self.s, self.run_dir, self.emit, self.transport, self.t_start = setup, run_dir, emit, transport, t_start
        cfg, model, method = setup.cfg, setup.model, setup.method
        self.keys = method.trainable_keys(model)
        self.global_state = model.trainable_state(self.keys)
        self.pairs = model.lora_pairs()
        exact = model.exact_base is not None  # dense catch-ups carry its float64 accumulator
        self.dense = {p.layer: dense_catch_up_nbytes(model.base_weight(p.layer).shape, exact=exact) for p in self.pairs}
        self.ledger = DownlinkLedger(self.dense)
        self.T, self.R = setup.exp.scenario.num_tasks, cfg.fed.rounds_per_task
        self.history = History(
            method=cfg.method, seed=cfg.seed, backbone=cfg.model.backbone, pretrained=model.spec.pretrained,
            trainable_parameters=int(sum(t.numel() for t in self.global_state.values())),
            environment=environment(setup.device),
        )
        self.done, self.elapsed_before, self.resumes = 0, 0.0, []  # rounds completed in earlier sessions
        if ckpt is not None:
            self.global_state, self.history = rundir.restore(ckpt, setup, self.global_state, self.ledger)
            self.done, self.elapsed_before = ckpt.completed_rounds, ckpt.elapsed_seconds
            self.resumes = [*ckpt.resumes, {"completed_rounds": self.done}]
            logger.info("resuming %s after %d of %d rounds (task %d, round %d)", run_dir, self.done, self.T * self.R,
                        ckpt.task + 1, ckpt.round + 1)
        self.test_sizes = [int((setup.exp.test_task == t).sum()) for t in range(self.T)]

    def _where(self, t: int, r: int) -> str:
        return f"[task {t + 1}/{self.T} | round {r + 1}/{self.R}]"

    # --- the loop -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        s, cfg = self.s, self.s.cfg
        self.transport.open(s, resumed=self.done > 0)
        self.emit({"event": "start", "num_tasks": self.T, "rounds_per_task": self.R,
                   "clients_per_round": cfg.fed.clients_per_round, "pretrained": s.model.spec.pretrained,
                   "backbone": cfg.model.backbone, "device": str(s.device), "completed_rounds": self.done})
        for task in s.exp.scenario.tasks:
            t = task.index
            if (t + 1) * self.R <= self.done:  # finished before the resume
                continue
            t_task = time.perf_counter()
            if t * self.R >= self.done:  # a fresh task, not one resumed inside
                s.method.on_task_start(s.model, task)  # e.g. pilora: merge the last task's LoRA, start a new one
                self.global_state = s.model.trainable_state(self.keys)
            for r in range(self.R):
                if t * self.R + r < self.done:
                    continue
                t_round = time.perf_counter()
                rnd = self.collect(task, r, self.sample(t, r))
                self.aggregate(task, r, rnd)
                if rnd.agg is not None:  # e.g. glfc: the proxy server watches every new global model
                    rnd.uplink += s.method.on_round_end(s.model, task, r, self.transport.task_data(
                        t, [res.client for res in rnd.accepted]))
                if r == self.R - 1:
                    rnd.uplink += self.end_task(task, rnd)
                self.record(task, r, rnd, t_round)
                if r == self.R - 1:  # the task's last round: evaluate before checkpointing it
                    self.evaluate(task, t_task)
                self.save_progress(t, r)
        return self.finish()

    # --- one round ----------------------------------------------------------------------------------

    def sample(self, t: int, r: int) -> list[int]:
        """The round's clients: ``fed.clients_per_round`` of ``fed.num_clients``, drawn from the seed."""
        fed = self.s.cfg.fed
        return sorted(numpy_rng(self.s.cfg.seed, "sample", t, r).choice(fed.num_clients, fed.clients_per_round,
                                                                        replace=False).tolist())

    def collect(self, task: Task, r: int, clients: list[int]) -> _Round:
        """Send the global model to ``clients``, receive and screen their updates."""
        cfg, method, t = self.s.cfg, self.s.method, task.index
        rnd = _Round(clients)
        faults = {k: draw_fault(cfg.faults, cfg.seed, t, r, k) for k in clients}
        for k in clients:
            extra = method.downlink(task, r, k)  # e.g. a generator, the previous task's model
            rnd.downlink += state_nbytes(self.global_state) + self.ledger.catch_up_bytes(k) + extra
            rnd.downlink_dense += state_nbytes(self.global_state) + self.ledger.catch_up_bytes(k, "dense") + extra
            self.ledger.sync(k)
        self.buffer = method.new_buffer()
        for outcome in self.transport.train(RoundJob(task, r, clients, self.global_state, faults)):
            k, res, fault = outcome.client, outcome.result, faults[outcome.client]
            if res is None:  # received the model, returned nothing
                rnd.dropped.append(k)
                logger.warning("%s client %d dropped out (%s)", self._where(t, r), k, outcome.error or "no update")
                self.emit({"event": "client", "task": t, "round": r, "client": k, "loss": None})
                continue
            method.on_client_report(k, res.report)  # e.g. the synthetic samples it drew
            if fault.corrupted and fault.rng is not None:
                res.state = corrupt(res.state, self.global_state, cfg.faults.corrupt_kind, fault.rng)
                rnd.corrupted.append(k)
            # The server trusts no update: it screens each on arrival and buffers the valid ones
            # (the buffer keeps what aggregation needs: all of them, or a running sum for finetune).
            rnd.uplink += state_nbytes(res.state)
            why = check_update(res.state, res.num_samples, self.global_state, max_norm=cfg.fed.max_update_norm)
            if why is None:
                if warn_if_large(res.state, self.global_state, cfg.fed.max_update_norm, self._where(t, r), k):
                    rnd.large.append(k)
                self.buffer.add(res.state, res.num_samples if cfg.fed.weighting == "samples" else 1.0)
                rnd.accepted.append(res)
            else:
                rnd.rejected.append({"client": k, "reason": why})
                logger.warning("%s rejected the update of client %d: %s", self._where(t, r), k, why)
            res.state = {}
            self.emit({"event": "client", "task": t, "round": r, "client": k, "loss": res.loss})
        return rnd

    def aggregate(self, task: Task, r: int, rnd: _Round) -> None:
        """Aggregate the buffered updates into the global model (or skip the round)."""
        cfg, model, method = self.s.cfg, self.s.model, self.s.method
        buffer, self.buffer = self.buffer, None
        if len(rnd.accepted) < cfg.fed.min_clients:
            logger.warning("%s round skipped: %d valid updates < fed.min_clients=%d; the global model is unchanged",
                           self._where(task.index, r), len(rnd.accepted), cfg.fed.min_clients)
            model.load_trainable(self.global_state)  # undo what local training left in the shared model
        else:
            rnd.weights = normalize_weights(buffer.counts)
            agg = method.aggregate_buffer(model, buffer)
            measured = [p for p in self.pairs if p.layer in agg.errors]  # the layers aggregated as LoRA factors
            base_old = {p.layer: model.base_weight(p.layer).detach().clone() for p in measured}
            method.apply(model, agg)
            rnd.exactness = self.exactness(measured, base_old, buffer.states if measured else [], rnd.weights)
            del buffer, base_old
            self.global_state = {k: v.detach().clone() for k, v in agg.state.items()}
            rnd.factored = {layer: factored_nbytes(agg.factors[layer]) for layer in agg.residuals}
            rnd.agg = agg
        self.ledger.record_round(rnd.factored)
        self.transport.after_round(rnd.agg)  # e.g. Flower: the next base the clients sync to

    def exactness(self, pairs: list[LoraPair], base_old: dict[str, torch.Tensor],
                  updates: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, float | None]:
        """The round's truthful errors, from what the model holds after :meth:`Method.apply` (float64).

        Per round (:func:`~fedtalora.core.exact.round_errors`): the change of every measured layer's effective
        weight against the clients' averaged change, from the global state the clients started from
        (``self.global_state``, not yet replaced) and their updates (a factor a method does not send, e.g.
        ffa-lora's frozen A, is the model's). Since the start (:meth:`FedModel.accumulated_errors`): only with
        the exact base. Largest over layers, relative and in units of one float32 rounding of the weight; and
        what naive averaging of the factors loses, relative to the same update.
        """
        out: dict[str, float | None] = dict.fromkeys(
            ("aggregation_error", "aggregation_error_rounding", "aggregation_error_accumulated",
             "aggregation_error_accumulated_rounding", "naive_aggregation_loss"))
        if not pairs:
            return out
        model = self.s.model
        params = model.lora_parameters()
        keys = [k for p in pairs for k in (p.b_key, p.a_key)]

        def full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: state[k] if k in state else params[k].detach() for k in keys}

        base_new = {p.layer: model.base_weight(p.layer).detach() for p in pairs}
        state_new = {k: params[k].detach() for k in keys}  # the global factors after the round
        errors = round_errors(pairs, base_old, base_new, full(self.global_state), state_new,
                              [full(u) for u in updates], weights)
        out["aggregation_error"], out["aggregation_error_rounding"] = max_error(errors)
        out["naive_aggregation_loss"] = max_naive(errors)
        accumulated = model.accumulated_errors()
        if accumulated:
            out["aggregation_error_accumulated"], out["aggregation_error_accumulated_rounding"] = max_error(accumulated)
        return out

    def end_task(self, task: Task, rnd: _Round) -> int:
        """The reporting clients' end-of-task work (e.g. class feature sums): the method's, then the
        classifier's; returns its uplink bytes."""
        s = self.s
        data = self.transport.task_data(task.index, [] if rnd.agg is None else [res.client for res in rnd.accepted])
        uplink = s.method.on_task_end(s.model, task, data)  # e.g. pilora: prototypes into its head
        uplink += s.classifier.on_task_end(s.model, task, data)
        self.global_state = s.model.trainable_state(self.keys)
        return uplink

    def record(self, task: Task, r: int, rnd: _Round, t_round: float) -> None:
        agg, t = rnd.agg, task.index
        costs = self.s.method.round_costs()  # e.g. generator training time, synthetic samples, memory size
        rec = RoundRecord(
            task=t, round=r, clients=rnd.clients,
            aggregated=[res.client for res in rnd.accepted], num_samples=[res.num_samples for res in rnd.accepted],
            dropped=rnd.dropped, corrupted=rnd.corrupted, rejected=rnd.rejected, large_updates=rnd.large,
            skipped=agg is None,
            train_loss=None if rnd.weights is None else float(
                np.average([res.loss for res in rnd.accepted], weights=rnd.weights.numpy())),
            aggregation_error=None if agg is None else (
                rnd.exactness["aggregation_error"] if rnd.exactness["aggregation_error"] is not None else agg.max_error),
            aggregation_error_rounding=rnd.exactness.get("aggregation_error_rounding"),
            aggregation_error_accumulated=rnd.exactness.get("aggregation_error_accumulated"),
            aggregation_error_accumulated_rounding=rnd.exactness.get("aggregation_error_accumulated_rounding"),
            naive_aggregation_loss=None if agg is None else (
                rnd.exactness["naive_aggregation_loss"] if rnd.exactness["aggregation_error"] is not None
                else agg.max_naive_error),
            uplink_bytes=rnd.uplink, downlink_bytes=rnd.downlink, downlink_bytes_dense=rnd.downlink_dense,
            residual_bytes_dense=sum(self.dense[layer] for layer, n in rnd.factored.items() if n),  # 0: no residual
            residual_bytes_factored=sum(rnd.factored.values()),
            seconds=time.perf_counter() - t_round,
            method_server_seconds=costs.server_seconds, method_downlink_bytes=costs.downlink_bytes,
            synthetic_samples=sum(costs.synthetic_samples.values()),
            synthetic_samples_per_client={str(k): n for k, n in sorted(costs.synthetic_samples.items())},
            memory_samples=None if costs.memory_samples is None else sum(costs.memory_samples.values()),
            memory_samples_per_client={str(k): n for k, n in sorted((costs.memory_samples or {}).items())},
            proxy_accuracy=costs.proxy_accuracy,
            extra=self.transport.round_stats(),  # e.g. Flower: the bytes that went over the wire
        )
        self.history.rounds.append(rec)
        if agg is not None:
            logger.info("%s loss=%.4f aggregation_error=%.3g (%s u||W||) up=%d B down=%d B", self._where(t, r),
                        rec.train_loss, rec.aggregation_error,
                        "-" if rec.aggregation_error_rounding is None else f"{rec.aggregation_error_rounding:.2g}",
                        rec.uplink_bytes, rec.downlink_bytes)
        self.emit({"event": "round", **rec.to_dict()})

    # --- tasks and the run --------------------------------------------------------------------------

    def evaluate(self, task: Task, t_task: float) -> None:
        """Accuracy on every task seen so far -> row ``t`` of the accuracy matrix and the summaries."""
        s, t = self.s, task.index
        exp, cfg, model = s.exp, s.cfg, s.model
        seen = np.flatnonzero(exp.test_task <= t)
        test, transform = cached_inputs(s.cache, "test", exp.dataset.test, s.transform, seen, train=False)
        preds = predict(model, test, seen, num_seen=exp.scenario.seen_classes(t), transform=transform,
                        batch_size=cfg.train.eval_batch_size, device=s.device, precision=cfg.train.precision,
                        scores=lambda x: s.classifier.scores(model, s.method, x))
        row = accuracy_per_task(preds, exp.test_targets[seen], exp.test_task[seen], t + 1)
        rec = TaskRecord(task=t, classes=[int(c) for c in task.classes], accuracy=row)
        val = exp.validation_indices(t)
        if len(val):  # data.val_fraction: the clients' held-out samples of every task seen so far
            val_preds = predict(model, exp.dataset.train, val, num_seen=exp.scenario.seen_classes(t),
                                transform=s.transform, batch_size=cfg.train.eval_batch_size, device=s.device,
                                precision=cfg.train.precision, scores=lambda x: s.classifier.scores(model, s.method, x))
            rec.val_accuracy = float((val_preds == exp.train_targets[val]).mean())
        self.history.add_task(rec, self.T, self.test_sizes)
        if s.cache is not None:
            s.cache.persist()  # train.feature_cache=disk: what this task computed, for later runs
        rec.seconds = time.perf_counter() - t_task
        logger.info("[task %d/%d] accuracy on seen classes %.4f", t + 1, self.T, rec.seen_accuracy)
        self.emit({"event": "task", **rec.to_dict()})

    def _wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save_progress(self, t: int, r: int) -> None:
        """Checkpoint the round and rewrite ``metrics.json`` (nothing without a run directory)."""
        self.history.wall_seconds = self._wall()
        if self.run_dir is None:
            return
        s = self.s
        if s.cfg.output.checkpoints != "none":
            state = rundir.Checkpoint(
                completed_rounds=t * self.R + r + 1, task=t, round=r, global_state=self.global_state,
                base={p.layer: s.model.base_weight(p.layer) for p in self.pairs},
                exact={} if s.model.exact_base is None else s.model.exact_base.acc,
                method_state=rundir.method_state(s.method, s.classifier), ledger=self.ledger.state_dict(),
                metrics=self.history.to_dict(), elapsed_seconds=self.history.wall_seconds, resumes=self.resumes)
            rundir.save(self.run_dir, state, s.cfg.to_dict(), keep=s.cfg.output.checkpoints)
        rundir.write_metrics(self.run_dir, self.history)

    def finish(self) -> RunResult:
        self.history.finish()
        self.transport.finish(self.history)
        self.history.wall_seconds = self._wall()
        if self.run_dir is not None:
            rundir.save_final(self.s.model, self.run_dir / rundir.FINAL_MODEL,  # before metrics.json says complete
                              config_sha256=rundir.config_fingerprint(self.s.cfg.to_dict()))
            rundir.write_metrics(self.run_dir, self.history)
        self.emit({"event": "end", "metrics": self.history.to_dict()})
        return RunResult(history=self.history, run_dir=self.run_dir, model=self.s.model)


def run_loop(setup: Setup, run_dir: Path | None, progress: Emit | None, transport: Transport, *,
             resume: bool = False) -> RunResult:
    """Run (or, with ``resume``, continue) the experiment of ``setup`` through ``transport``.

    Args:
        run_dir: where to write ``config.yaml``, ``partitions.json``, ``metrics.json``, the round checkpoints,
            the final model and the trackers' files (``rounds.csv``, ``tasks.csv``, TensorBoard) (None: nowhere).
        progress: receives the loop's events, as the run directory's trackers do.
        resume: continue ``run_dir`` from its latest checkpoint (from the start if it has none); the result
            is identical to an uninterrupted run except for :data:`~fedtalora.fed.history.TIMING_FIELDS`.

    Raises:
        CheckpointError: ``resume`` and the run directory's checkpoint or partitions are corrupted or belong
            to another config (nothing in the run directory is changed then).
    """
    t_start = time.perf_counter()
    if resume and run_dir is None:
        raise ValueError("resume needs a run directory")
    ckpt = rundir.open_run_dir(run_dir, setup.cfg, setup.exp, resume)
    emit = fan_out(progress, *open_trackers(setup.cfg, run_dir))  # progress display, rounds.csv/tasks.csv, TensorBoard
    try:
        return _Loop(setup, run_dir, emit, transport, ckpt, t_start).run()
    finally:
        transport.close()
