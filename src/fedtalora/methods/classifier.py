"""How the global model predicts (``classifier.kind``): a component beside the method, for any method.

The loop holds one :class:`Classifier` next to the :class:`~fedtalora.methods.base.Method`. It takes part
at two points only: at the end of every task (after the method's own end-of-task work, with the same
client data) and at evaluation, where its :meth:`Classifier.scores` replace the method's logits. Training,
what travels every round and aggregation stay the method's own.

* ``head`` (:class:`HeadClassifier`): the method's logits (``Method.forward``), e.g. the linear head.
* ``prototype`` (:class:`PrototypeClassifier`): the nearest federated class prototype.

Exemplar-free class-incremental learning with a linear head suffers from the head itself: the rows of a
new task's classes are trained from scratch on a few non-IID local rounds, only against each other
(task-masked logits), so their scale and bias are never calibrated against older classes. A
nearest-class-mean classifier avoids that: at the end of every task the clients of the last round send,
per class they hold, the sum of their features (under the task's final global model) and the count; the
server's prototype of a class is the exact pooled mean ``sum_k S_kc / sum_k n_kc``
(:mod:`fedtalora.core.prototypes`). Prediction is the most similar prototype (cosine by default) among the
classes seen so far. Prototypes of a task are never updated afterwards (no old data is kept). Extra uplink:
``(D + 2)`` numbers per class a client holds, once per task (added to that round's ``uplink_bytes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.prototypes import aggregate_class_sums, nearest_prototype
from ..errors import CheckpointError
from ..registry import Registry
from .base import Method, TaskData

if TYPE_CHECKING:
    from ..core.scenario import Task
    from ..model import FedModel

__all__ = ["CLASSIFIERS", "Classifier", "HeadClassifier", "PrototypeClassifier"]


class Classifier:
    """Base component: predicts with the method's own logits and keeps no state."""

    kind: ClassVar[str] = "head"

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
