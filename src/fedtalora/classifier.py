"""``classifier.kind=prototype``: predict by the nearest federated class prototype, for any method.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .aggregation import Aggregate
from .errors import CheckpointError
from .methods.base import Method, TaskData, UpdateBuffer
from .prototypes import aggregate_class_sums, nearest_prototype

if TYPE_CHECKING:
    from .model import FedModel
    from .scenario import Task

__all__ = ["PrototypeClassifier", "with_classifier"]


class PrototypeClassifier(Method):
    """The wrapped method, predicting by the nearest class prototype."""

    def __init__(self, inner: Method, metric: str = "cosine") -> None:  # noqa: D107 - wraps, not parses
        self.inner = inner
        self.cfg = inner.cfg
        self.options = inner.options
        self.name = inner.name
        self.summary = inner.summary
        self.metric = metric
        self.prototypes: torch.Tensor | None = None
        """``(C, D)`` float64 class means; NaN rows for classes without one yet."""

    # --- everything but prediction is the inner method's ------------------------------------------

    def set_class_names(self, names: Sequence[str]) -> None:
        self.inner.set_class_names(names)

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

    def local_loss(self, model: FedModel, x: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.inner.local_loss(model, x, logits, targets)

    def on_client_round(self, task: Task, round_: int, client: int) -> None:
        self.inner.on_client_round(task, round_, client)

    def replay(self, task: Task, client: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self.inner.replay(task, client)

    def local_mask(self, task: Task, mask: torch.Tensor | None) -> torch.Tensor | None:
        return self.inner.local_mask(task, mask)

    def on_round_end(self, model: FedModel, task: Task, round_: int, data: TaskData) -> int:
        return self.inner.on_round_end(model, task, round_, data)

    def downlink(self, task: Task, round_: int, client: int) -> int:
        return self.inner.downlink(task, round_, client)

    def round_record(self) -> dict[str, Any]:
        return self.inner.round_record()

    def new_buffer(self) -> UpdateBuffer:
        return self.inner.new_buffer()

    def aggregate_buffer(self, model: FedModel, buffer: UpdateBuffer) -> Aggregate:
        return self.inner.aggregate_buffer(model, buffer)

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        return self.inner.aggregate(model, updates, weights)

    def apply(self, model: FedModel, agg: Aggregate) -> None:
        self.inner.apply(model, agg)

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


def with_classifier(method: Method, kind: str, metric: str = "cosine") -> Method:
    """``method`` as configured by ``classifier.kind`` (unchanged for ``head``)."""
    return PrototypeClassifier(method, metric) if kind == "prototype" else method
