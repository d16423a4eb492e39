"""``classifier.kind=prototype`` / ``analytic``: predict from exact federated feature statistics, for any method.

Exemplar-free class-incremental learning with a linear head suffers from the head itself: the rows of
a new task's classes are trained from scratch on a few non-IID local rounds, only against each other
(task-masked logits), so their scale and bias are never calibrated against older classes. A
nearest-class-mean classifier avoids that: at the end of every task the clients of the last round send,
per class they hold, the sum of their features (under the task's final global model) and the count; the
server's prototype of a class is the exact pooled mean ``sum_k S_kc / sum_k n_kc``
(:mod:`fedtalora.prototypes`). Prediction is the most similar prototype (cosine by default) among the
classes seen so far. Prototypes of a task are never updated afterwards (no old data is kept).

:class:`PrototypeClassifier` wraps the configured method and changes only its evaluation logits and its
end-of-task hook; training, what travels each round and aggregation are the method's own. Extra uplink:
``(D + 2)`` numbers per class a client holds, once per task (added to that round's ``uplink_bytes``).

:class:`AnalyticClassifier` (``classifier.kind=analytic``) does the same with the statistics of a ridge
classifier (:mod:`fedtalora.analytic`): at the end of every task the reporting clients send, for their
data of the task, ``G = sum phi phi^T`` (upper triangle) and ``C = sum phi onehot(y)^T`` of their
features ``phi`` (optionally expanded by a fixed random ReLU projection to ``classifier.projection_dim``
dimensions, derived from the seed on both sides), plus per-class counts; the server adds them over
clients and tasks and solves ``(G + lam I) W = C`` for all classes seen (``classifier.ridge``: a fixed
lam or ``auto``, generalized cross-validation on the sums). Since the sums are exact, with a frozen
backbone the classifier equals the centralized joint ridge solution for any partition. Extra uplink per
client and task: :func:`~fedtalora.analytic.statistics_nbytes` (``M (M + 1) / 2`` float64 for ``G``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .aggregation import Aggregate
from .analytic import (
    RidgeStatistics,
    pack_symmetric,
    project,
    random_projection,
    ridge_scores,
    ridge_statistics,
    select_ridge,
    solve_ridge,
    statistics_nbytes,
    sum_statistics,
    unpack_symmetric,
)
from .errors import CheckpointError
from .methods.base import Method, TaskData, UpdateBuffer
from .prototypes import aggregate_class_sums, nearest_prototype

if TYPE_CHECKING:
    from .config import ClassifierConfig
    from .model import FedModel
    from .scenario import Task

__all__ = ["AnalyticClassifier", "PrototypeClassifier", "with_classifier"]

log = logging.getLogger(__name__)


class ClassifierWrapper(Method):
    """A configured method with its prediction replaced: every other hook is the inner method's."""

    def __init__(self, inner: Method) -> None:  # noqa: D107 - wraps, not parses
        self.inner = inner
        self.cfg = inner.cfg
        self.options = inner.options
        self.name = inner.name
        self.summary = inner.summary

    def attach(self, model: FedModel) -> None:
        self.inner.attach(model)

    def trainable_keys(self, model: FedModel) -> list[str]:
        return self.inner.trainable_keys(model)

    def param_groups(self, model: FedModel, keys: Sequence[str]) -> list[dict[str, Any]]:
        return self.inner.param_groups(model, keys)

    def on_task_start(self, model: FedModel, task: Task) -> None:
        self.inner.on_task_start(model, task)

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        self.inner.on_local_start(model, global_state)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: FedModel) -> torch.Tensor:
        return self.inner.loss(logits, targets, model=model)

    def new_buffer(self) -> UpdateBuffer:
        return self.inner.new_buffer()

    def aggregate_buffer(self, model: FedModel, buffer: UpdateBuffer) -> Aggregate:
        return self.inner.aggregate_buffer(model, buffer)

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        return self.inner.aggregate(model, updates, weights)

    def apply(self, model: FedModel, agg: Aggregate) -> None:
        self.inner.apply(model, agg)


class PrototypeClassifier(ClassifierWrapper):
    """The wrapped method, predicting by the nearest class prototype."""

    def __init__(self, inner: Method, metric: str = "cosine") -> None:  # noqa: D107 - wraps, not parses
        super().__init__(inner)
        self.metric = metric
        self.prototypes: torch.Tensor | None = None
        """``(C, D)`` float64 class means; NaN rows for classes without one yet."""

    # --- prototypes -------------------------------------------------------------------------------

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        uplink = self.inner.on_task_end(model, task, data)
        rows = range(task.label_offset, task.label_offset + len(task.classes))
        sums, counts, nbytes = data.class_sums(rows)
        if not sums:
            return uplink
        means, _ = aggregate_class_sums(sums, counts)
        if self.prototypes is None:
            self.prototypes = torch.full((model.head.out_features, means.shape[1]), float("nan"), dtype=torch.float64)
        self.prototypes[list(rows)] = means
        return uplink + nbytes

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        if model.training or self.prototypes is None:
            return self.inner.forward(model, x)
        feats = model.features(x).float()
        protos = self.prototypes.to(device=feats.device, dtype=torch.float32)
        known = ~torch.isnan(protos).any(dim=1)
        scores = torch.full((feats.shape[0], protos.shape[0]), float("-inf"), device=feats.device)
        if known.any():
            idx = torch.nonzero(known).squeeze(1)
            pred = nearest_prototype(feats, protos[idx], self.metric)
            # one-hot scores keep the engine's "argmax over seen classes" contract
            scores[torch.arange(len(feats), device=feats.device), idx[pred]] = 0.0
        return scores

    # --- checkpoints ------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.inner.checkpoint_state())
        if self.prototypes is not None:
            state["classifier.prototypes"] = self.prototypes
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        protos = state.pop("classifier.prototypes", None)
        if protos is not None and protos.ndim != 2:
            raise CheckpointError(f"classifier.prototypes has shape {tuple(protos.shape)}, expected (C, D)")
        self.prototypes = None if protos is None else protos.to(torch.float64)
        self.inner.load_checkpoint_state(state)


class AnalyticClassifier(ClassifierWrapper):
    """The wrapped method, predicting with the federated ridge classifier (module notes)."""

    def __init__(self, inner: Method, *, projection_dim: int = 0, ridge: float | str = "auto",
                 seed: int = 0) -> None:  # noqa: D107
        super().__init__(inner)
        self.projection_dim = int(projection_dim)
        self.ridge = ridge
        self.seed = int(seed)
        self.stats: RidgeStatistics | None = None
        """Sums over every reported client and task so far: ``(M, M)``, ``(M, num_classes)``, ``(num_classes,)``."""
        self.weights: torch.Tensor | None = None
        """``(M, num_classes)`` float64 solution for the statistics so far."""
        self.lam: float | None = None
        """The lambda of :attr:`weights` (``classifier.ridge``, or what ``auto`` chose)."""
        self._projection: dict[tuple[int, str], torch.Tensor | None] = {}

    def projection(self, in_dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The fixed random projection for ``in_dim`` features (None: raw features), cached per device."""
        key = (in_dim, str(device))
        if key not in self._projection:
            proj = random_projection(in_dim, self.projection_dim, self.seed)
            self._projection[key] = None if proj is None else proj.to(device)
        return self._projection[key]

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        uplink = self.inner.on_task_end(model, task, data)
        rows = range(task.label_offset, task.label_offset + len(task.classes))
        proj = self.projection(model.spec.num_features)
        total: RidgeStatistics | None = None
        nbytes = 0
        for k in data.clients:  # what each client computes and sends; the server adds it up as it arrives
            feats, targets = data.features(k)
            s = ridge_statistics(project(feats, proj), targets, len(rows), offset=rows.start)
            if s.num_samples == 0:
                continue
            nbytes += statistics_nbytes(s.dim, int((s.counts > 0).sum()))
            total = s if total is None else sum_statistics([total, s])
        if total is None:
            return uplink
        if self.stats is None:
            m, c = total.dim, model.head.out_features
            self.stats = RidgeStatistics(gram=torch.zeros(m, m, dtype=torch.float64),
                                         corr=torch.zeros(m, c, dtype=torch.float64),
                                         counts=torch.zeros(c, dtype=torch.int64))
        self.stats.gram += total.gram
        self.stats.corr[:, rows] += total.corr
        self.stats.counts[rows] += total.counts
        self._solve()
        return uplink + nbytes

    def _solve(self) -> None:
        assert self.stats is not None
        if self.ridge == "auto":
            sel = select_ridge(self.stats)
            self.lam = sel.lam
            log.info("classifier.ridge=auto: lambda = %.3g (%g x tr(G)/M, by GCV over %d samples)", sel.lam,
                     sel.relative, self.stats.num_samples)
        else:
            self.lam = float(self.ridge)
        self.weights = solve_ridge(self.stats.gram, self.stats.corr, self.lam)

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        if model.training or self.weights is None or self.stats is None:
            return self.inner.forward(model, x)
        feats = model.features(x)
        device = feats.device if feats.device.type != "mps" else torch.device("cpu")  # no float64 on MPS
        with torch.autocast(device_type=feats.device.type, enabled=False):
            phi = project(feats.to(device), self.projection(feats.shape[1], device))
            return ridge_scores(phi, self.weights.to(device), self.stats.counts > 0)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.inner.checkpoint_state())
        if self.stats is not None:
            state["classifier.gram"] = pack_symmetric(self.stats.gram)
            state["classifier.corr"] = self.stats.corr
            state["classifier.counts"] = self.stats.counts
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        parts = [state.pop(f"classifier.{k}", None) for k in ("gram", "corr", "counts")]
        self.stats = self.weights = self.lam = None
        if any(p is not None for p in parts):
            gram, corr, counts = parts
            if gram is None or corr is None or counts is None or corr.ndim != 2 or counts.shape != corr.shape[1:] \
                    or gram.shape != (corr.shape[0] * (corr.shape[0] + 1) // 2,) \
                    or (self.projection_dim and corr.shape[0] != self.projection_dim):
                raise CheckpointError("the analytic classifier's checkpoint state is incomplete or does not match "
                                      f"classifier.projection_dim={self.projection_dim}")
            self.stats = RidgeStatistics(gram=unpack_symmetric(gram.to(torch.float64), corr.shape[0]),
                                         corr=corr.to(torch.float64), counts=counts.to(torch.int64))
            self._solve()
        self.inner.load_checkpoint_state(state)


def with_classifier(method: Method, classifier: ClassifierConfig, *, seed: int) -> Method:
    """``method`` as configured by the ``classifier`` section (unchanged for ``kind=head``)."""
    if classifier.kind == "prototype":
        return PrototypeClassifier(method, classifier.metric)
    if classifier.kind == "analytic":
        return AnalyticClassifier(method, projection_dim=classifier.projection_dim, ridge=classifier.ridge, seed=seed)
    return method
