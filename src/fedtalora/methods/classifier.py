"""How the global model predicts (``classifier.kind``): a component beside the method, for any method.

The loop holds one :class:`Classifier` next to the :class:`~fedtalora.methods.base.Method`. It takes part
at two points only: at the end of every task (after the method's own end-of-task work, with the same
client data) and at evaluation, where its :meth:`Classifier.scores` replace the method's logits. Training,
what travels every round and aggregation stay the method's own.

* ``head`` (:class:`HeadClassifier`): the method's logits (``Method.forward``), e.g. the linear head.
* ``prototype`` (:class:`PrototypeClassifier`): the nearest federated class prototype.
* ``analytic`` (:class:`AnalyticClassifier`): a ridge classifier solved in closed form from exact federated
  feature statistics (``docs/analytic-classifier.md``).

Exemplar-free class-incremental learning with a linear head suffers from the head itself: the rows of a
new task's classes are trained from scratch on a few non-IID local rounds, only against each other
(task-masked logits), so their scale and bias are never calibrated against older classes. A
nearest-class-mean classifier avoids that: at the end of every task the clients of the last round send,
per class they hold, the sum of their features (under the task's final global model) and the count; the
server's prototype of a class is the exact pooled mean ``sum_k S_kc / sum_k n_kc``
(:mod:`fedtalora.core.prototypes`). Prediction is the most similar prototype (cosine by default) among the
classes seen so far. Prototypes of a task are never updated afterwards (no old data is kept). Extra uplink:
``(D + 2)`` numbers per class a client holds, once per task (added to that round's ``uplink_bytes``).

The analytic classifier does the same with the statistics of a ridge regression
(:mod:`fedtalora.core.analytic`): at the end of every task each reporting client computes, for its data of
the task, ``G = sum phi phi^T`` and ``C = sum phi onehot(y)^T`` of its features ``phi`` (optionally expanded by
a fixed random ReLU projection to ``classifier.projection_dim`` dimensions, drawn from the root seed on
both sides so it never travels) and sends them (``G`` as its upper triangle, :meth:`Classifier.client_statistics`,
computed on the client node under Flower); the server adds them over clients and tasks and solves
``(G + lam I) W = C`` in float64 for all classes seen (``classifier.ridge``: a fixed lam, or ``auto``:
generalized cross-validation on the sums). The sums are exact, so with a frozen backbone the result equals
the centralized joint ridge solution for any partition. Extra uplink per client and task:
:func:`~fedtalora.core.analytic.statistics_nbytes`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.analytic import (
    RidgeStatistics,
    decode_statistics,
    encode_statistics,
    pack_symmetric,
    project,
    random_projection,
    ridge_scores,
    ridge_statistics,
    select_ridge,
    solve_ridge,
    unpack_symmetric,
)
from ..core.prototypes import aggregate_class_sums, nearest_prototype
from ..errors import AggregationError, CheckpointError
from ..registry import Registry
from .base import Method, TaskData

if TYPE_CHECKING:
    from ..config import ClassifierConfig
    from ..core.scenario import Task
    from ..model import FedModel

__all__ = ["CLASSIFIERS", "AnalyticClassifier", "Classifier", "HeadClassifier", "PrototypeClassifier"]

log = logging.getLogger(__name__)


class Classifier:
    """Base component: predicts with the method's own logits and keeps no state."""

    kind: ClassVar[str] = "head"

    @classmethod
    def from_config(cls, options: ClassifierConfig, *, seed: int) -> Classifier:
        """The component configured by the ``classifier`` section (``seed``: the run's root seed)."""
        return cls(options.metric)  # type: ignore[call-arg]

    def client_statistics(self, task: Task, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a reporting client computes from its features of ``task`` and sends in their place at the end
        of the task (:attr:`TaskData.statistics`); runs on the client. Default: nothing."""
        return {}

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        """After the method's end-of-task work for ``task``; returns the extra uplink bytes it cost."""
        return 0

    def scores(self, model: FedModel, method: Method, x: Any) -> torch.Tensor:
        """Evaluation scores over all classes of the scenario (argmax over the seen classes predicts)."""
        return method.forward(model, x)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """State a resumed run needs (stored as ``method/classifier.<key>`` tensors)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        if state:
            raise CheckpointError(f"classifier {self.kind!r} keeps no checkpoint state, got {sorted(state)[:3]}")


CLASSIFIERS: Registry[type[Classifier]] = Registry("classifier")


@CLASSIFIERS.register("head")
class HeadClassifier(Classifier):
    """The method's logits (the linear head for Fed-TaLoRA)."""

    kind = "head"

    def __init__(self, metric: str = "cosine") -> None:
        del metric


@CLASSIFIERS.register("prototype")
class PrototypeClassifier(Classifier):
    """The nearest exact federated class prototype (mean feature)."""

    kind = "prototype"

    def __init__(self, metric: str = "cosine") -> None:
        self.metric = metric
        self.prototypes: torch.Tensor | None = None
        """``(C, D)`` float64 class means; NaN rows for classes without one yet."""

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        rows = range(task.label_offset, task.label_offset + len(task.classes))
        sums, counts, nbytes = data.class_sums(rows)
        if not sums:
            return 0
        means, _ = aggregate_class_sums(sums, counts)
        if self.prototypes is None:
            self.prototypes = torch.full((model.head.out_features, means.shape[1]), float("nan"), dtype=torch.float64)
        self.prototypes[list(rows)] = means
        return nbytes

    def scores(self, model: FedModel, method: Method, x: Any) -> torch.Tensor:
        if self.prototypes is None:
            return method.forward(model, x)
        feats = model.features(x).float()
        protos = self.prototypes.to(device=feats.device, dtype=torch.float32)
        known = ~torch.isnan(protos).any(dim=1)
        scores = torch.full((feats.shape[0], protos.shape[0]), float("-inf"), device=feats.device)
        if known.any():
            idx = torch.nonzero(known).squeeze(1)
            pred = nearest_prototype(feats, protos[idx], self.metric)
            # one-hot scores keep the loop's "argmax over seen classes" contract
            scores[torch.arange(len(feats), device=feats.device), idx[pred]] = 0.0
        return scores

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {} if self.prototypes is None else {"prototypes": self.prototypes}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        protos = state.pop("prototypes", None)
        if state:
            raise CheckpointError(f"classifier {self.kind!r}: unexpected state {sorted(state)[:3]}")
        if protos is not None and protos.ndim != 2:
            raise CheckpointError(f"classifier.prototypes has shape {tuple(protos.shape)}, expected (C, D)")
        self.prototypes = None if protos is None else protos.to(torch.float64)


@CLASSIFIERS.register("analytic")
class AnalyticClassifier(Classifier):
    """A ridge classifier on exact federated sums of (optionally projected) features (module notes)."""

    kind = "analytic"

    def __init__(self, metric: str = "cosine", *, projection_dim: int = 0, ridge: float | str = "auto",
                 seed: int = 0) -> None:
        del metric
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {projection_dim}")
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

    @classmethod
    def from_config(cls, options: ClassifierConfig, *, seed: int) -> Classifier:
        return cls(projection_dim=options.projection_dim, ridge=options.ridge, seed=seed)

    def projection(self, in_dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The fixed random projection for ``in_dim`` features (None: raw features), cached per device."""
        key = (in_dim, str(device))
        if key not in self._projection:
            proj = random_projection(in_dim, self.projection_dim, self.seed)
            self._projection[key] = None if proj is None else proj.to(device)
        return self._projection[key]

    def client_statistics(self, task: Task, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            return {}
        phi = project(features, self.projection(features.shape[1], features.device))
        stats = ridge_statistics(phi, targets, len(task.classes), offset=task.label_offset)
        return encode_statistics(stats)

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        rows = range(task.label_offset, task.label_offset + len(task.classes))
        nbytes = 0
        for k in data.clients:  # the server adds each client's statistics up as they arrive
            if data.statistics is not None:
                message = data.statistics(k)
            else:
                message = self.client_statistics(task, *data.features(k))
            if not message:
                continue
            try:
                s = decode_statistics(message, len(rows))
            except AggregationError as e:
                raise AggregationError(f"client {k}, task {task.index}: {e}") from None
            nbytes += sum(t.numel() * t.element_size() for t in message.values())
            if self.stats is None:
                m, c = s.dim, model.head.out_features
                self.stats = RidgeStatistics(gram=torch.zeros(m, m, dtype=torch.float64),
                                             corr=torch.zeros(m, c, dtype=torch.float64),
                                             counts=torch.zeros(c, dtype=torch.int64))
            if s.dim != self.stats.dim:
                raise AggregationError(f"client {k}: ridge statistics of dimension {s.dim}, expected {self.stats.dim}")
            self.stats.gram += s.gram
            self.stats.corr[:, rows] += s.corr
            self.stats.counts[rows] += s.counts
        if nbytes:
            self._solve()
        return nbytes

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

    def scores(self, model: FedModel, method: Method, x: Any) -> torch.Tensor:
        if self.weights is None or self.stats is None:
            return method.forward(model, x)
        feats = model.features(x)
        device = feats.device if feats.device.type != "mps" else torch.device("cpu")  # no float64 on MPS
        with torch.autocast(device_type=feats.device.type, enabled=False):
            phi = project(feats.to(device), self.projection(feats.shape[1], device))
            return ridge_scores(phi, self.weights.to(device), self.stats.counts > 0)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        if self.stats is None:
            return {}
        return {"gram": pack_symmetric(self.stats.gram), "corr": self.stats.corr, "counts": self.stats.counts}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        parts = [state.pop(k, None) for k in ("gram", "corr", "counts")]
        if state:
            raise CheckpointError(f"classifier {self.kind!r}: unexpected state {sorted(state)[:3]}")
        self.stats = self.weights = self.lam = None
        if all(p is None for p in parts):
            return
        gram, corr, counts = parts
        if gram is None or corr is None or counts is None or corr.ndim != 2 or counts.shape != corr.shape[1:] \
                or gram.shape != (corr.shape[0] * (corr.shape[0] + 1) // 2,) \
                or (self.projection_dim and corr.shape[0] != self.projection_dim):
            raise CheckpointError("the analytic classifier's state (gram, corr, counts) is incomplete or does not "
                                  f"match classifier.projection_dim={self.projection_dim}")
        if not (torch.isfinite(gram).all() and torch.isfinite(corr).all()) or bool((counts < 0).any()):
            raise CheckpointError("the analytic classifier's state holds non-finite sums or negative counts")
        self.stats = RidgeStatistics(gram=unpack_symmetric(gram.to(torch.float64), corr.shape[0]),
                                     corr=corr.to(torch.float64), counts=counts.to(torch.int64))
        self._solve()
