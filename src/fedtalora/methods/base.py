"""The hooks through which a method plugs into the single task x round loop (:mod:`fedtalora.engine`).

A method says only what differs from Fed-TaLoRA; the loop, data, partitions, screening, evaluation,
metrics and checkpoints are shared. Where each hook is called::

    prepare:            model = build_model(...); method.set_class_names(names); method.attach(model)
    for task t:
        (fresh task)    method.on_task_start(model, task)             -> new global state
        for round r:
            server:     downlink += method.downlink(task, r, k) for each sampled client k
            for sampled client k:
                client: method.on_client_round(task, r, k); samples += method.replay(task, k)
                        mask = method.local_mask(task, mask)
                        load global state; method.on_local_start(model, global_state)
                        per batch: logits = method.forward(model, x)
                                   loss = method.local_loss(model, x, logits, y)   (default: method.loss)
                        send the tensors of method.trainable_keys(model)
                server: screen the update; buffer.add(state, weight)   (buffer = method.new_buffer())
            server:     agg = method.aggregate_buffer(model, buffer); method.apply(model, agg)
                        uplink += method.on_round_end(model, task, r, TaskData)
            (last round) uplink += method.on_task_end(model, task, TaskData)   -> new global state
                        evaluate: argmax of method.forward(model, x) over the classes seen so far
            record:     round record |= method.round_record()
    checkpoint:         method.checkpoint_state() / load_checkpoint_state(state)

The hooks marked "client" run where the client runs; everything a client needs beyond the global
trainable state is either derived from public data (class names, seeds) or counted by
:meth:`Method.downlink` as data the server sends.

Per-method options come from the config's ``method_options`` mapping, parsed strictly into the
method's :attr:`Method.Options` dataclass (:meth:`Method.parse_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..aggregation import Aggregate, aggregate_lora, normalize_weights
from ..config import build_section
from ..errors import CheckpointError, ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..model import FedModel
    from ..scenario import Task


@dataclass
class TaskData:
    """What a method may compute on the clients at the end of a task (simulated client-side work)."""

    clients: list[int]
    """The clients that report (those whose update was aggregated in the task's last round)."""
    features: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    """``features(k)`` -> ``(features (n_k, d), targets (n_k,))``: client ``k``'s training data of the task
    through the current global model (:meth:`FedModel.features`, eval mode, no augmentation), on the CPU."""
    batches: Callable[[int], Iterator[tuple[Any, torch.Tensor, np.ndarray]]] | None = None
    """``batches(k)`` -> client ``k``'s training data of the task as ``(x, targets, indices)`` batches: inputs
    preprocessed for evaluation (no augmentation) on the model's device, head-output labels on the same
    device, and the samples' positions in the training split. Client-side work of a method that needs the
    inputs themselves (feature statistics, exemplar selection, prototype gradients); None where the
    transport cannot run it (Flower, for now)."""

    def class_sums(self, classes: range) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per reporting client, the float64 feature sums ``(len(classes), d)`` and int64 counts of the
        head positions ``classes``, and the uplink bytes of sending them (the classes a client holds)."""
        from ..prototypes import class_sums, prototype_nbytes

        sums, counts, nbytes = [], [], 0
        for k in self.clients:
            feats, targets = self.features(k)
            s, n = class_sums(feats, targets, len(classes), offset=classes.start)
            sums.append(s)
            counts.append(n)
            nbytes += prototype_nbytes(int((n > 0).sum()), feats.shape[1])
        return sums, counts, nbytes


class UpdateBuffer:
    """A round's accepted client updates, as the server receives them (default: all kept, in order)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.counts: list[float] = []

    def add(self, state: dict[str, torch.Tensor], count: float) -> None:
        """Receive one screened update with its aggregation weight (sample count, or 1 for uniform)."""
        self.states.append(state)
        self.counts.append(float(count))

    def __len__(self) -> int:
        return len(self.counts)


class Method:
    """Base hooks. The defaults implement Fed-TaLoRA; subclasses override what differs."""

    name = "base"
    summary = ""
    Options: type | None = None
    """A dataclass of the method's options (``method_options.*``), or None when it takes none."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options: Any = self.parse_options(cfg.method_options)

    @classmethod
    def parse_options(cls, data: dict[str, Any]) -> Any:
        """``method_options`` -> an :attr:`Options` instance (strict; :class:`ConfigError` naming the key)."""
        if MEMORY_OPTION in data and MEMORY_OPTION not in cls.option_names():
            raise ConfigError(f"method_options.{MEMORY_OPTION}={data[MEMORY_OPTION]!r} is invalid: method {cls.name!r} "
                              "is exemplar-free (it keeps no exemplar memory); only glfc takes an exemplar memory")
        if cls.Options is None:
            if data:
                raise ConfigError(f"method_options={data!r} is invalid: method {cls.name!r} takes no options")
            return None
        return build_section(cls.Options, dict(data), prefix="method_options.")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)] if cls.Options is not None else []

    # --- model ------------------------------------------------------------------------------------

    def set_class_names(self, names: Sequence[str]) -> None:
        """Called once before :meth:`attach`: ``names[j]`` is the dataset's name of the class at head output
        ``j`` (public information every party has, e.g. for label-text embeddings)."""

    def attach(self, model: FedModel) -> None:
        """Called once after the model is built (before it moves to the device): add what the method
        trains beyond LoRA and head (:meth:`FedModel.add_trainable`)."""

    def trainable_keys(self, model: FedModel) -> list[str]:
        """Keys (in :meth:`FedModel.parameters_by_key`) that clients train and send, and the server sends."""
        return list(model.lora_parameters()) + list(model.head_parameters())

    def param_groups(self, model: FedModel, keys: Sequence[str]) -> list[dict[str, Any]]:
        """Optimiser groups: the head at ``train.head_lr``, everything else at ``train.lr``."""
        params = model.parameters_by_key()
        body = [params[k] for k in keys if not k.startswith("head.")]
        head = [params[k] for k in keys if k.startswith("head.")]
        groups = []
        if body:
            groups.append({"params": body, "lr": self.cfg.train.lr})
        if head:
            groups.append({"params": head, "lr": self.cfg.train.head_lr})
        return groups

    # --- tasks ------------------------------------------------------------------------------------

    def on_task_start(self, model: FedModel, task: Task) -> None:
        """Before the first round of ``task`` (not re-run when a run resumes inside the task). The loop
        re-reads the global state from the model afterwards."""

    def on_task_end(self, model: FedModel, task: Task, data: TaskData) -> int:
        """After the last round's aggregation of ``task``, before its evaluation; may change the global
        model (the loop re-reads the global state). Returns the extra uplink bytes it cost."""
        return 0

    def on_round_end(self, model: FedModel, task: Task, round_: int, data: TaskData) -> int:
        """After every aggregated round (before :meth:`on_task_end` in the task's last round), with the
        round's aggregated clients in ``data``; must not change the global model. Returns the extra uplink
        bytes it cost (e.g. GLFC's prototype gradients)."""
        return 0

    def downlink(self, task: Task, round_: int, client: int) -> int:
        """Bytes the server sends ``client`` in this round beyond the global state and its residual catch-up
        (e.g. a generator, or the previous task's model); added to the round's ``downlink_bytes``."""
        return 0

    def round_record(self) -> dict[str, Any]:
        """Extra fields of the round's record (costs: server seconds, synthetic samples, memory size), asked
        once per round after the task-end work. Fields ending in ``_seconds`` are timing fields."""
        return {}

    # --- local training ---------------------------------------------------------------------------

    def on_client_round(self, task: Task, round_: int, client: int) -> None:
        """On the client, before its local round: which task, round and client this is (e.g. to derive the
        seeds of per-client draws)."""

    def replay(self, task: Task, client: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Samples ``client`` trains on in addition to its task data: ``(indices into the training split,
        head-output labels)`` (an exemplar memory), or None."""
        return None

    def local_mask(self, task: Task, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The head outputs taking part in the local loss; ``mask`` is ``train.logit_mask``'s."""
        return mask

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        """Before a client's local training; the model already holds ``global_state``."""

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        """Logits over all classes of the scenario, in training and in evaluation (argmax over the seen
        classes predicts)."""
        return model(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: FedModel) -> torch.Tensor:
        """The local objective on one batch of (already masked) logits."""
        return F.cross_entropy(logits, targets)

    def local_loss(self, model: FedModel, x: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The local objective with the batch's inputs ``x`` at hand (distillation terms); the default is
        :meth:`loss`."""
        return self.loss(logits, targets, model=model)

    # --- server -----------------------------------------------------------------------------------

    def new_buffer(self) -> UpdateBuffer:
        """Where the server collects a round's accepted updates."""
        return UpdateBuffer()

    def aggregate_buffer(self, model: FedModel, buffer: UpdateBuffer) -> Aggregate:
        """The round's aggregate from the buffered updates (default: :meth:`aggregate` with ``p_k``)."""
        return self.aggregate(model, buffer.states, normalize_weights(buffer.counts))

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        """Server aggregation of the clients' trainable states (FedAvg + residual per ``fed.residual``)."""
        return aggregate_lora(updates, weights, model.lora_pairs(), residual=self.cfg.fed.residual)

    def apply(self, model: FedModel, agg: Aggregate) -> None:
        """Make ``agg`` the new global model: load the averaged state, fold residuals into the base."""
        model.load_trainable(agg.state)
        model.add_to_base(agg.residuals)

    # --- checkpoints ------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Server-side method state that a resumed run needs (stored as ``method/<key>`` tensors)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        if state:
            raise CheckpointError(f"method {self.name!r} keeps no checkpoint state, got {sorted(state)[:3]}")


def check_option(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the config's one-line error for ``method_options.<key>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"method_options.{key}={value!r} is invalid: expected {allowed}")


MEMORY_OPTION = "memory_per_class"
"""The option of methods that keep an exemplar memory; exemplar-free methods refuse it with one line."""

METHODS: Registry[type[Method]] = Registry("method")
