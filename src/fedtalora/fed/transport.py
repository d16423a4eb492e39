"""How the task x round loop reaches its clients: direct calls, or messages (Flower).

The loop (:func:`fedtalora.fed.loop.run_loop`) exists once. Everything that happens *on a client* goes through
a :class:`Transport`, so the in-process engine and the Flower engines share the loop, the screening,
the aggregation, the evaluation, the metrics and the checkpoints::

    transport.open(setup, resumed)                      once, after the run directory is written
    for task t, round r:
        for outcome in transport.train(job):            each sampled client's local round, in job.clients order
            outcome.result is None -> the client dropped out (injected fault, crash, timeout)
        server: screen, aggregate, apply (the loop)
        transport.after_round(agg | None)               the new global model (Flower: the clients' next sync)
        (last round) transport.task_data(t, clients)     end-of-task client work (class features)
        record.update(transport.round_stats())           e.g. the bytes that really went over the wire
    transport.finish(history); transport.close()

A client's local round itself is :func:`client_round`: the same function runs in this process
(:class:`InProcessTransport`) and inside a Flower ``ClientApp`` (:mod:`fedtalora.flower.client_app`), so
seeds, model randomness and the loss mask are identical wherever a client runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..methods import Method, TaskData
from ..seeding import seeded_torch, torch_generator
from .cache import cached_inputs
from .client import ClientJob, ClientResult, extract_features, local_train, to_device
from .faults import Fault
from .parallel import train_together, why_serial

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..core.aggregation import Aggregate
    from ..core.scenario import Task
    from ..data import Split
    from ..model import FedModel
    from .build import Setup
    from .history import History

logger = logging.getLogger(__name__)

__all__ = ["ClientOutcome", "InProcessTransport", "RoundJob", "Transport", "class_mask", "client_job", "client_round",
           "parallel_group", "task_mask"]


@dataclass
class RoundJob:
    """What the server asks of the sampled clients in one round."""

    task: Task
    round: int
    clients: list[int]
    """Sampled clients, in the order the server processes their updates."""
    global_state: dict[str, torch.Tensor]
    faults: dict[int, Fault] = field(default_factory=dict)
    """Injected fate of each sampled client (:func:`fedtalora.fed.faults.draw_fault`)."""


@dataclass
class ClientOutcome:
    """One sampled client's answer: its trained update, or None when it returned nothing."""

    client: int
    result: ClientResult | None
    error: str | None = None
    """Why ``result`` is None (an injected fault, the client's exception, a timeout)."""


class Transport:
    """The client side of the loop. Subclasses say how a client's work is carried out."""

    name = "inprocess"

    def open(self, setup: Setup, *, resumed: bool) -> None:
        """Before the first round of this session (the run directory's files exist by now)."""

    def train(self, job: RoundJob) -> Iterator[ClientOutcome]:
        """Each client of ``job.clients`` trains from ``job.global_state``; yields in ``job.clients`` order."""
        raise NotImplementedError

    def task_data(self, t: int, clients: list[int]) -> TaskData:
        """End-of-task client work for :meth:`Method.on_task_end`, under the current global model."""
        raise NotImplementedError

    def after_round(self, agg: Aggregate | None) -> None:
        """The round is aggregated and applied (``agg``), or skipped (None)."""

    def round_stats(self) -> dict[str, Any]:
        """Extra fields of the round's metrics record (asked once per round, after the task-end work)."""
        return {}

    def finish(self, history: History) -> None:
        """Once every round is done: add the transport's run totals to ``history`` (:attr:`History.extra`)."""

    def close(self) -> None:
        """Release what :meth:`open` acquired (also after a failure)."""


# --- one client's local round, wherever the client runs -------------------------------------------------


def task_mask(num_classes: int, task: Task) -> torch.Tensor:
    """Bool ``(num_classes,)``: the head outputs of ``task``."""
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[task.label_offset:task.label_offset + len(task.classes)] = True
    return mask


def class_mask(kind: str, mask_of_task: torch.Tensor, targets: np.ndarray) -> torch.Tensor | None:
    """Which head outputs take part in the local loss (``train.logit_mask``)."""
    if kind == "none":
        return None
    if kind == "client":
        mask = torch.zeros_like(mask_of_task)
        mask[torch.as_tensor(np.unique(targets))] = True
        return mask
    return mask_of_task


def client_round(model: FedModel, method: Method, global_state: dict[str, torch.Tensor], *, cfg: RunConfig,
                 task: Task, round_: int, client: int, num_classes: int, split: Split, indices: np.ndarray,
                 targets: np.ndarray, transform: Callable[..., Any], device: torch.device) -> ClientResult:
    """Client ``client``'s local round ``round_`` of ``task``: :func:`~fedtalora.fed.client.local_train` with
    the generators derived from ``(seed, task, round, client)`` and the configured loss mask; with
    ``lora.train_tasks=first`` the LoRA tensors are not trained after the first task (sent back unchanged).

    Args:
        indices: the client's samples of the task (positions in ``split``).
        targets: their head-output labels.
    """
    method.on_client_round(task, round_, client)
    extra = method.replay(task, client)  # e.g. glfc: the client's exemplar memory
    if extra is not None and len(extra[0]):
        indices = np.concatenate([indices, extra[0]])
        targets = np.concatenate([targets, extra[1]])
    job = client_job(cfg, task, round_, client, num_classes, indices, targets)
    mask = method.local_mask(task, job.class_mask)
    frozen = lora_frozen(cfg, model, task)
    with seeded_torch(cfg.seed, "model-rng", task.index, round_, client, device=device):  # LoRA dropout, drop-path
        res = local_train(
            model, method, global_state, client=client, split=split, indices=indices, targets=targets,
            class_mask=mask, transform=transform, cfg=cfg.train, generator=job.generator, device=device,
            frozen=frozen,
        )
    res.report = method.client_report()  # e.g. target: the synthetic samples it drew
    return res


def lora_frozen(cfg: RunConfig, model: FedModel, task: Task) -> set[str]:
    """The LoRA keys a client leaves untouched in ``task``: all of them after the first task with
    ``lora.train_tasks=first`` (the analytic statistics of old tasks then stay exact), none otherwise."""
    return set(model.lora_parameters()) if cfg.lora.train_tasks == "first" and task.index > 0 else set()


def client_job(cfg: RunConfig, task: Task, round_: int, client: int, num_classes: int, indices: np.ndarray,
               targets: np.ndarray) -> ClientJob:
    """Client ``client``'s round ``round_`` of ``task``: its samples, its loss mask (``train.logit_mask``) and its
    generator, derived from ``(seed, task, round, client)`` -- the same for the serial and the parallel path."""
    mask = class_mask(cfg.train.logit_mask, task_mask(num_classes, task), targets)
    return ClientJob(client, indices, targets, mask, torch_generator(cfg.seed, "local", task.index, round_, client))


def parallel_group(setup: Setup) -> int:
    """How many clients train together (``train.parallel_clients``): 1 when the method or model cannot
    (:func:`fedtalora.fed.parallel.why_serial`, logged)."""
    n = setup.cfg.train.parallel_clients
    if n <= 1:
        return 1
    if setup.cfg.lora.train_tasks == "first":
        logger.warning("train.parallel_clients=%d: clients train one after another: lora.train_tasks=first "
                       "(the grouped path trains every LoRA tensor)", n)
        return 1
    why = why_serial(setup.model, setup.method, setup.method.trainable_keys(setup.model))
    if why is not None:
        logger.warning("train.parallel_clients=%d: clients train one after another: %s", n, why)
        return 1
    return n


def client_features(model: FedModel, split: Split, indices: np.ndarray, targets: np.ndarray, *,
                    transform: Callable[..., Any], cfg: RunConfig,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's features of its task data under the current model (for :class:`TaskData`)."""
    feats = extract_features(model, split, indices, transform=transform, batch_size=cfg.train.eval_batch_size,
                             device=device, precision=cfg.train.precision)
    return feats, torch.as_tensor(targets, dtype=torch.long)


# --- in this process ----------------------------------------------------------------------------------


class InProcessTransport(Transport):
    """Clients train one after another on the server's own model (``engine=inprocess``), or ``G`` at a time
    (``train.parallel_clients``, :mod:`fedtalora.fed.parallel`); with ``train.feature_cache`` from cached
    frozen activations (:mod:`fedtalora.fed.cache`).

    A client holds no copy of the model: the global state is loaded into the shared model before its
    round (:func:`~fedtalora.fed.client.local_train`), so each update is produced, screened and buffered
    before the next client trains (the server never holds more than the method's buffer).
    """

    name = "inprocess"

    def __init__(self) -> None:
        self.setup: Setup | None = None
        self.group = 1

    def open(self, setup: Setup, *, resumed: bool) -> None:
        self.setup = setup
        self.group = parallel_group(setup)

    def _setup(self) -> Setup:
        if self.setup is None:
            raise RuntimeError("transport used before open()")
        return self.setup

    def train(self, job: RoundJob) -> Iterator[ClientOutcome]:
        s = self._setup()
        exp = s.exp
        live = [k for k in job.clients if not (job.faults.get(k) is not None and job.faults[k].dropped)]
        done: dict[int, ClientResult] = {}
        if s.cache is not None and live:  # every sample of the round once, in one length-sorted pass
            cached_inputs(s.cache, "train", exp.dataset.train, s.transform,
                          np.concatenate([exp.partitions[job.task.index][k] for k in live]), train=True)
        for k in job.clients:
            if k not in live:  # received the model, returns nothing
                yield ClientOutcome(k, None, "injected fault")
                continue
            if self.group > 1:  # train k and the next live clients together, hand out their results in order
                if k not in done:
                    done.update(self._train_group(job, live[live.index(k):live.index(k) + self.group]))
                yield ClientOutcome(k, done.pop(k))
                continue
            idx = exp.partitions[job.task.index][k]
            split, transform = cached_inputs(s.cache, "train", exp.dataset.train, s.transform, idx, train=True)
            yield ClientOutcome(k, client_round(
                s.model, s.method, job.global_state, cfg=s.cfg, task=job.task, round_=job.round, client=k,
                num_classes=exp.scenario.num_classes, split=split, indices=idx,
                targets=exp.train_targets[idx], transform=transform, device=s.device))

    def _train_group(self, job: RoundJob, clients: list[int]) -> dict[int, ClientResult]:
        s = self._setup()
        exp, t = s.exp, job.task.index
        jobs = [client_job(s.cfg, job.task, job.round, k, exp.scenario.num_classes, exp.partitions[t][k],
                           exp.train_targets[exp.partitions[t][k]]) for k in clients]
        split, transform = cached_inputs(s.cache, "train", exp.dataset.train, s.transform,
                                         np.concatenate([j.indices for j in jobs]), train=True)
        with seeded_torch(s.cfg.seed, "model-rng", t, job.round, clients[0], device=s.device):
            results = train_together(s.model, s.method, job.global_state, jobs, split=split, transform=transform,
                                     cfg=s.cfg.train, device=s.device)
        return {res.client: res for res in results}

    def task_data(self, t: int, clients: list[int]) -> TaskData:
        s = self._setup()
        exp = s.exp

        def features(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = exp.partitions[t][k]
            split, transform = cached_inputs(s.cache, "train", exp.dataset.train, s.transform, idx, train=False)
            return client_features(s.model, split, idx, exp.train_targets[idx], transform=transform,
                                   cfg=s.cfg, device=s.device)

        def statistics(k: int) -> dict[str, torch.Tensor]:  # what client k computes from its features and sends
            return s.classifier.client_statistics(exp.scenario.tasks[t], *features(k))

        def batches(k: int) -> Iterator[tuple[Any, torch.Tensor, np.ndarray]]:
            idx = exp.partitions[t][k]
            step = s.cfg.train.eval_batch_size
            for start in range(0, len(idx), step):
                sel = idx[start:start + step]
                x = s.transform(to_device(exp.dataset.train.inputs[torch.as_tensor(sel)], s.device), train=False)
                yield x, torch.as_tensor(exp.train_targets[sel], device=s.device), sel

        def method_work(k: int, kind: str) -> dict[str, torch.Tensor]:  # what client k computes for the method
            return s.method.client_work(s.model, exp.scenario.tasks[t], kind, k, batches(k))

        return TaskData(clients=clients, features=features, statistics=statistics, batches=batches,
                        method_work=method_work)
