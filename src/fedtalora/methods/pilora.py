"""``pilora``: PILoRA -- incremental LoRA per task with orthogonality, and a prototype classifier.

Follows PILoRA (Guo, Zhu, Liu, Zhang, Liu, "PILoRA: Prototype guided incremental LoRA for federated
class-incremental learning", ECCV 2024; official code ``Ghy0501/PILoRA``):

* **Incremental LoRA.** Each task trains a fresh LoRA; the LoRAs of earlier tasks stay frozen and keep
  contributing. Here the finished task's global LoRA is merged into the frozen base at the next task's
  start (``W_base += s B A``, the same effective weight as PILoRA's sum of per-task LoRAs; in float64 into
  the exact base, :mod:`fedtalora.core.exact`, so merging never rounds the sum) and A, B are
  re-initialised (A ~ kaiming-uniform seeded by ``(seed, "pilora-lora", task, layer)``, B = 0). During a
  task the base therefore never changes: aggregation is naive FedAvg (as in PILoRA), without residual.
* **Orthogonality + sparsity of A.** The local loss adds ``ortho * sum_{j<t} |A_j A_t^T|_1`` (every
  earlier task's global A, per adapted layer) and ``l1 * |A_t|_1``, PILoRA's ``0.5`` and ``0.01``.
* **Prototype classifier.** The head's weight rows are the class prototypes ``c_j``; logits are
  ``-d(f, c_j) / T`` with PILoRA's ``d = sqrt(|f - c|^2 / D)``, trained with PILoRA's distance-based
  cross-entropy plus ``pl * d(f, c_y)``. Prediction is the nearest prototype over the classes seen so far.
* **Prototype aggregation.** At the end of each task the clients aggregated in its last round send, per
  class of the task they hold, the sum of their features (under the final global model of the task) and
  the count; the server sets the task's prototypes to the pooled class means
  ``sum_k S_kc / sum_k n_kc`` -- the count-weighted mean of the client means (option ``prototypes: mean``).

Departures and approximations:

* PILoRA's server re-weights each client's *learned* center of a class by
  ``softmax(minmax(1 / sum_j |c_k - mu_j|) / 0.2)`` over clients (``utils.compute_weight``), where
  ``mu_j`` are the clients' class feature means, and clients send centers and means every round. Here
  the prototypes are the clients' feature statistics themselves, sent once per task: with sums and counts
  the pooled mean is exactly the class mean over all reporting clients, which is what the re-weighting
  approximates (it pulls the global center towards where the clients' features lie and damps outlying
  clients). ``prototypes: reweight`` applies PILoRA's weights to the client means instead of the counts
  (the distance is then from a client's mean, not its learned center, to all clients' means).
* Learned centers are trained during the task (as in PILoRA) but replaced by the class means at its end;
  old classes' rows never train again (the task-masked loss gives them no gradient).
* LoRA placement, rank and optimiser are this project's (``lora.*``, ``train.*``), not PILoRA's rank-4
  q/v LoRA in block 0 with Adam; no early stopping on the test set; the partition is fixed per task.
* Extra uplink: ``D`` float32 sums and an int64 count per (client, class it holds) at each task's end
  (:func:`~fedtalora.core.prototypes.prototype_nbytes`), added to the last round's ``uplink_bytes``.

Options (``method_options``): ``ortho`` (0.5), ``l1`` (0.01), ``pl`` (0.001), ``temperature`` (1.0),
``prototypes`` (``mean`` | ``reweight``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from ..core.prototypes import aggregate_class_sums
from ..core.prototypes import class_sums as shared_class_sums
from ..errors import CheckpointError
from ..seeding import torch_generator
from .base import METHODS, Method, MethodContext, TaskData, check_option

if TYPE_CHECKING:
    from ..core.scenario import Task
    from ..model import FedModel


@dataclass
class PILoRAOptions:
    ortho: float = 0.5
    """Weight of the orthogonality loss ``sum_{j<t} |A_j A_t^T|_1``."""
    l1: float = 0.01
    """Weight of ``|A_t|_1``."""
    pl: float = 0.001
    """Weight of the prototype-pull loss (mean distance of a feature to its class prototype)."""
    temperature: float = 1.0
    """Logits are ``-distance / temperature``."""
    prototypes: Literal["mean", "reweight"] = "mean"
    """Server pooling of the clients' class means: by counts (exact class mean) or PILoRA's re-weighting."""

    def validate(self) -> None:
        for key in ("ortho", "l1", "pl"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        check_option(self.temperature > 0, "temperature", self.temperature, "a number > 0")


# --- pure maths -----------------------------------------------------------------------------------


def prototype_distance(features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """PILoRA's ``sqrt(|f - c|^2 / D)`` for every (feature, center) pair: ``(n, D), (C, D) -> (n, C)``."""
    sq = (features.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1)[None, :]
          - 2 * features @ centers.T) / features.shape[1]
    return sq.clamp_min(1e-12).sqrt()


def class_sums(features: torch.Tensor, targets: torch.Tensor, classes: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of ``classes`` (head positions), the float64 sum of ``features`` and the (float64) count:
    :func:`fedtalora.core.prototypes.class_sums` over the task's positions.

    Shapes: ``features (n, D)``, ``targets (n,)`` -> ``sums (len(classes), D)``, ``counts (len(classes),)``.
    """
    sums, counts = shared_class_sums(features, targets, len(classes), offset=classes.start)
    return sums, counts.to(torch.float64)


def pooled_prototypes(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k S_kc / sum_k n_kc`` (:func:`fedtalora.core.prototypes.aggregate_class_sums`): ``sums (K, C, D)``,
    ``counts (K, C)`` -> ``(C, D)`` and which classes any client holds ``(C,)`` (rows of absent classes are
    zero)."""
    protos, total = aggregate_class_sums(list(sums), [c.round().to(torch.int64) for c in counts])
    present = total > 0
    protos[~present] = 0.0
    return protos, present


def pilora_client_weights(means: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """PILoRA's server weights of ``K`` clients' estimates of one class (``means (K, D)`` -> ``(K,)``):
    ``softmax(minmax(1 / sum_j |m_k - m_j|) / temperature)``; uniform when all estimates coincide."""
    K = means.shape[0]
    if K == 1:
        return torch.ones(1, dtype=torch.float64)
    total = torch.cdist(means.to(torch.float64), means.to(torch.float64)).sum(1)
    if (total <= 0).any():
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    recip = 1.0 / total
    span = recip.max() - recip.min()
    norm = (recip - recip.min()) / span if span > 0 else torch.zeros_like(recip)
    return torch.softmax(norm / temperature, dim=0)


def reweighted_prototypes(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`pooled_prototypes`, but the client means of a class are combined with
    :func:`pilora_client_weights` instead of by their counts."""
    protos = torch.zeros(sums.shape[1:], dtype=torch.float64)
    present = counts.sum(0) > 0
    for c in torch.nonzero(present).flatten().tolist():
        holders = counts[:, c] > 0
        means = sums[holders, c] / counts[holders, c, None]
        protos[c] = pilora_client_weights(means) @ means
    return protos, present


# --- the method -----------------------------------------------------------------------------------

_STATE_KEY = re.compile(r"^previous_A/(\d+)/(.+)$")


@METHODS.register("pilora")
class PILoRA(Method):
    """A fresh LoRA per task (earlier ones merged into the base), orthogonal A's, nearest-prototype head."""

    name = "pilora"
    summary = ("PILoRA (ECCV 2024): LoRA per task + orthogonality, prototype classifier "
               "(options: ortho, l1, pl, temperature, prototypes)")
    Options = PILoRAOptions
    predicts_with_head = False  # nearest prototype (its head rows hold the prototypes)
    needs_server_state = True  # the task-start merge and the previous tasks' A (orthogonality) live on the server
    folds_residual = False  # naive FedAvg within a task (as in PILoRA)
    merges_into_base = True  # the finished task's LoRA, at the next task's start (kept exactly: float64)

    def __init__(self, options: Any, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.previous_A: list[dict[str, torch.Tensor]] = []
        """Per finished task (merged into the base), the global A of every adapted layer (CPU)."""
        self._previous_dev: list[dict[str, torch.Tensor]] = []

    def trainable_keys(self, model: FedModel) -> list[str]:
        return list(model.lora_parameters()) + ["head.weight"]  # the bias plays no part in distances

    def aggregate(self, model: FedModel, updates: Any, weights: torch.Tensor) -> Any:
        from ..core.aggregation import aggregate_lora

        return aggregate_lora(updates, weights, model.lora_pairs(), residual=False)

    # --- tasks --------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_task_start(self, model: FedModel, task: Task) -> None:
        if task.index == 0:
            return
        params = model.parameters_by_key()
        pairs = model.lora_pairs()
        # s B A in float64 (exact products of float32 factors): the exact base adds it without rounding
        model.add_to_base({p.layer: (params[p.b_key].double() @ params[p.a_key].double()).mul_(p.scaling)
                           for p in pairs})
        self.previous_A.append({p.layer: params[p.a_key].detach().to("cpu", copy=True) for p in pairs})
        self._previous_dev = []
        for p in pairs:
            A = params[p.a_key]
            fresh = torch.empty(A.shape, dtype=A.dtype)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5),
                                           generator=torch_generator(self.ctx.seed, "pilora-lora", task.index, p.layer))
            A.copy_(fresh)
            params[p.b_key].zero_()

    @torch.no_grad()
    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        positions = task.positions
        all_sums, all_counts, nbytes = data.class_sums(positions)
        if not all_sums:
            return 0
        pool = reweighted_prototypes if self.options.prototypes == "reweight" else pooled_prototypes
        protos, present = pool(torch.stack(all_sums), torch.stack(all_counts).to(torch.float64))
        w = model.head.weight
        rows = torch.as_tensor(list(positions))[present]
        w[rows.to(w.device)] = protos[present].to(device=w.device, dtype=w.dtype)
        return nbytes

    # --- local training -----------------------------------------------------------------------------

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        if len(self._previous_dev) != len(self.previous_A):
            device = model.head.weight.device
            self._previous_dev = [{k: a.to(device) for k, a in prev.items()} for prev in self.previous_A]

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        feats = model.features(x)
        return -prototype_distance(feats, model.head.weight.to(feats.dtype)) / self.options.temperature

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: FedModel) -> torch.Tensor:
        o = self.options
        loss = F.cross_entropy(logits, targets)
        if o.pl:
            own = logits.gather(1, targets[:, None]).squeeze(1)
            loss = loss + o.pl * (-own * o.temperature).mean()
        params = model.parameters_by_key()
        pairs = model.lora_pairs()
        if o.l1:
            loss = loss + o.l1 * sum(params[p.a_key].abs().sum() for p in pairs)
        if o.ortho and self._previous_dev:
            ortho = sum((prev[p.layer] @ params[p.a_key].T).abs().sum() for prev in self._previous_dev for p in pairs)
            loss = loss + o.ortho * ortho
        return loss

    # --- checkpoints --------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {f"previous_A/{t}/{layer}": A for t, prev in enumerate(self.previous_A) for layer, A in prev.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        tasks: dict[int, dict[str, torch.Tensor]] = {}
        for key, A in state.items():
            m = _STATE_KEY.match(key)
            if m is None:
                raise CheckpointError(f"pilora checkpoint state has an unexpected tensor {key!r}")
            tasks.setdefault(int(m.group(1)), {})[m.group(2)] = A
        if sorted(tasks) != list(range(len(tasks))):
            raise CheckpointError(f"pilora checkpoint state has tasks {sorted(tasks)}, expected 0..{len(tasks) - 1}")
        self.previous_A = [tasks[t] for t in range(len(tasks))]
        self._previous_dev = []
