"""The hooks through which a method plugs into the single task x round loop (:mod:`fedtalora.fed.loop`).

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
                        send the tensors of method.trainable_keys(model) and method.client_report()
                server: method.on_client_report(k, report)
                        screen the update; buffer.add(state, weight)   (buffer = method.new_buffer())
            server:     agg = method.aggregate_buffer(model, buffer); method.apply(model, agg)
                        uplink += method.on_round_end(model, task, r, TaskData)
            (last round) uplink += method.on_task_end(model, task, TaskData)   -> new global state
                        (client work inside it and inside on_round_end: TaskData.method_work(k, kind) =
                         method.client_work(model, task, kind, batches of client k's task data), where the
                         client runs)
                        evaluate: argmax of method.forward(model, x) over the classes seen so far
            record:     the round record's method fields <- method.round_costs()
    checkpoint:         method.checkpoint_state() / load_checkpoint_state(state)

The hooks marked "client" run where the client runs. Everything a client needs beyond the global trainable
state is derived from public data (class names, the root seed) or counted by :meth:`Method.downlink` as data
the server sends (:meth:`Method.client_state`); a method whose clients need such server-side state says so with
:attr:`Method.needs_server_state`. What a client keeps to itself across rounds (an exemplar memory) is its
:meth:`Method.private_state`; what it computes for the server from its data is :meth:`Method.client_work`.

A method is built from its options (the config's ``method_options`` mapping, parsed strictly into the
method's :attr:`Method.Options` dataclass by :meth:`Method.parse_options`) and a :class:`MethodContext`:
the few run settings a method may read (the ``train`` section, the root seed, ``fed.residual``,
``data.max_length``), never the whole run config. What a method can do that the engines must know about is
said by explicit class flags (:attr:`Method.predicts_with_head`, :attr:`Method.needs_server_state`,
:attr:`Method.trains_clients_together`, :attr:`Method.forward_through_model`, :attr:`Method.folds_residual`,
:attr:`Method.merges_into_base`), not detected by comparing its functions with the base class's.

How the global model *predicts* is not a method hook but a separate component, the classifier
(:mod:`.classifier`, ``classifier.kind``): the loop asks it for evaluation scores and gives it the end of
every task, beside the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import build_section
from ..core.aggregation import Aggregate, aggregate_lora, normalize_weights
from ..errors import CheckpointError, ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..core.scenario import Task
    from ..model import FedModel


@dataclass
class TaskData:
    """What a method may compute on the clients at the end of a task (simulated client-side work)."""

    clients: list[int]
    """The clients that report (those whose update was aggregated in the task's last round)."""
    features: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    """``features(k)`` -> ``(features (n_k, d), targets (n_k,))``: client ``k``'s training data of the task
    through the current global model (:meth:`FedModel.features`, eval mode, no augmentation), on the CPU."""
    statistics: Callable[[int], dict[str, torch.Tensor]] | None = None
    """``statistics(k)`` -> what client ``k`` computes from those features for the classifier and sends in
    their place (:meth:`fedtalora.methods.classifier.Classifier.client_statistics`, e.g. the analytic
    classifier's ridge sums): computed where the client runs (Flower: on the client node). None: not offered."""
    batches: Callable[[int], Iterator[tuple[Any, torch.Tensor, np.ndarray]]] | None = None
    """``batches(k)`` -> client ``k``'s training data of the task as ``(x, targets, indices)`` batches: inputs
    preprocessed for evaluation (no augmentation) on the model's device, head-output labels on the same
    device, and the samples' positions in the training split. Client-side work of a method that needs the
    inputs themselves (feature statistics, exemplar selection, prototype gradients); None where the
    transport cannot run it."""
    method_work: Callable[[int, str], dict[str, torch.Tensor]] | None = None
    """``method_work(k, kind)`` -> what client ``k`` computes for the method from its task data under the
    current global model and sends (:meth:`Method.client_work` with ``kind``, run where the client runs: on
    Flower, on the client's node, which keeps what the method keeps private there). None where the transport
    cannot run it."""

    def class_sums(self, classes: range) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per reporting client, the float64 feature sums ``(len(classes), d)`` and int64 counts of the
        head positions ``classes``, and the uplink bytes of sending them (the classes a client holds)."""
        from ..core.prototypes import class_sums, prototype_nbytes

        sums, counts, nbytes = [], [], 0
        for k in self.clients:
            feats, targets = self.features(k)
            s, n = class_sums(feats, targets, len(classes), offset=classes.start)
            sums.append(s)
            counts.append(n)
            nbytes += prototype_nbytes(int((n > 0).sum()), feats.shape[1])
        return sums, counts, nbytes


@dataclass
class MethodCosts:
    """What a method's own machinery cost in one round (the round record's method fields,
    :class:`fedtalora.fed.history.RoundRecord`)."""

    server_seconds: float = 0.0
    """Server time of the method's own work (a generator's training, GLFC's proxy): a timing field."""
    downlink_bytes: int = 0
    """Bytes sent to clients beyond the global state and residuals (generator, old model); already included in
    the round's ``downlink_bytes``."""
    synthetic_samples: dict[int, int] = field(default_factory=dict)
    """Client -> synthetic samples it drew this round."""
    memory_samples: dict[int, int] | None = None
    """Client -> exemplars it keeps (None: the method keeps no memory)."""
    proxy_accuracy: float | None = None
    """GLFC: the new global model's accuracy on the proxy server's reconstructed monitor set."""


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


@dataclass(frozen=True)
class MethodContext:
    """The run settings a method may read (built from the config by :func:`fedtalora.fed.build.build_method`)."""

    train: TrainConfig
    """Local training: learning rates (``lr`` for LoRA and other backbone tensors, ``head_lr``), optimiser."""
    seed: int = 0
    """The root seed; a method derives its generators from it (:mod:`fedtalora.seeding`)."""
    residual: bool = True
    """``fed.residual``: fold the exact LoRA residual into the base (ResWU)."""
    max_length: int = 128
    """``data.max_length``: the longest token sequence of text data."""


class Method:
    """Base hooks. The defaults implement Fed-TaLoRA; subclasses override what differs."""

    name = "base"
    summary = ""
    Options: type | None = None
    """A dataclass of the method's options (``method_options.*``), or None when it takes none."""

    predicts_with_head: ClassVar[bool] = True
    """The method's predictions are the argmax of the linear head on the backbone's features (false when
    :meth:`forward` computes logits otherwise: prompts, prototypes). A model exported as a timm classifier
    reproduces only such methods."""
    trains_clients_together: ClassVar[bool] = False
    """Several clients' local rounds may run as one batched pass (``train.parallel_clients``,
    :mod:`fedtalora.fed.parallel`): the method trains LoRA factors and head tensors only, :meth:`forward` computes
    through the model's own modules (``model(x)``, ``model.features(x)``; the parallel engine swaps in
    per-client LoRA and head modules), :meth:`loss` reads trainable tensors only through
    ``model.parameters_by_key()`` (it receives a per-client view), and :meth:`on_local_start` depends only on
    the global state (it runs once per group of clients). Off unless a method says so."""
    forward_through_model: ClassVar[bool] = False
    """:meth:`forward` reaches the input only through ``model(x)`` / ``model.features(x)``, so the input may be
    cached activations of the frozen layers below the first adapted block (``train.feature_cache``,
    :mod:`fedtalora.fed.cache`). Off unless a method says so."""
    needs_server_state: ClassVar[bool] = False
    """Its clients need server-side method state beyond the global trainable state and the base (e.g. in
    the loss). Informative: engines whose clients only receive messages (Flower) send whatever
    :meth:`client_state` returns, for every method."""
    runs_on_flower: ClassVar[bool] = True
    """False: what the method's clients need (beyond :meth:`client_state`, :meth:`client_work`,
    :meth:`client_report` and :meth:`private_state`) does not travel in Flower messages; ``engine=flower`` /
    ``flower-sim`` refuse it with one line. Every registered method runs there."""
    folds_residual: ClassVar[bool] = True
    """Its aggregation folds the ResWU residual into the adapted layers' base weights when ``fed.residual`` is
    on (the defaults of :meth:`aggregate` and :meth:`apply`)."""
    merges_into_base: ClassVar[bool] = False
    """Its hooks add into the adapted layers' base weights whatever ``fed.residual`` says (PILoRA merges a
    finished task's LoRA at the next task's start)."""

    def __init__(self, options: Mapping[str, Any] | None, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.options: Any = self.parse_options(dict(options or {}))

    @property
    def changes_base(self) -> bool:
        """The adapted layers' base weights change during the run (:attr:`folds_residual` with
        ``fed.residual``, or :attr:`merges_into_base`). Such bases are kept exactly: the model is built with
        :meth:`FedModel.enable_exact_base` (:func:`fedtalora.fed.build.build_components`), and what a method
        adds with :meth:`FedModel.add_to_base` should be float64 (``docs/exactness.md``)."""
        return (self.folds_residual and self.ctx.residual) or self.merges_into_base

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
        """Called once before :meth:`attach` when the dataset is known: ``names[j]`` is the dataset's name of
        the class at head output ``j`` (public information every party has, e.g. for label-text embeddings).
        Not called where only the model is rebuilt (loading a final model)."""

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
            groups.append({"params": body, "lr": self.ctx.train.lr})
        if head:
            groups.append({"params": head, "lr": self.ctx.train.head_lr})
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
        (e.g. a generator, the previous task's model); added to the round's ``downlink_bytes``."""
        return 0

    def round_costs(self) -> MethodCosts:
        """The method's costs since the last call (asked once per round, after the task-end work)."""
        return MethodCosts()

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

    def client_report(self) -> dict[str, Any]:
        """On the client, after its local round: JSON-able facts the server records (e.g. the synthetic
        samples it drew), sent with the update; the method forgets them. Default: nothing."""
        return {}

    def client_work(self, model: FedModel, task: Task, kind: str, client: int,
                    batches: Iterator[tuple[Any, torch.Tensor, np.ndarray]]) -> dict[str, torch.Tensor]:
        """On client ``client``, under the current global model: the work ``kind`` (a name the method chooses)
        on its task data (``batches`` as :attr:`TaskData.batches`); returns what it sends. The server's
        :meth:`on_task_end` / :meth:`on_round_end` ask for it through :attr:`TaskData.method_work` (e.g.
        TARGET's feature moments, GLFC's prototype gradients and exemplar selection). Default: nothing."""
        return {}

    def private_state(self, client: int) -> dict[str, torch.Tensor]:
        """On a client: what the method keeps on client ``client`` across rounds and tasks and never sends
        (GLFC's exemplar memory). Engines whose clients are other processes (Flower) store it on the client's
        node after every message and give it back with :meth:`load_private_state` before the next; in-process
        it simply stays in the method object. Default: nothing."""
        return {}

    def load_private_state(self, client: int, tensors: dict[str, torch.Tensor]) -> None:
        """On a client, after :meth:`load_client_state`: restore what :meth:`private_state` returned for
        ``client`` on this node (empty: nothing yet)."""

    # --- server -----------------------------------------------------------------------------------

    def on_client_report(self, client: int, report: Mapping[str, Any]) -> None:
        """On the server, for every client that returned an update (accepted or not): its
        :meth:`client_report`."""

    def new_buffer(self) -> UpdateBuffer:
        """Where the server collects a round's accepted updates."""
        return UpdateBuffer()

    def aggregate_buffer(self, model: FedModel, buffer: UpdateBuffer) -> Aggregate:
        """The round's aggregate from the buffered updates (default: :meth:`aggregate` with ``p_k``)."""
        return self.aggregate(model, buffer.states, normalize_weights(buffer.counts))

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        """Server aggregation of the clients' trainable states (FedAvg + residual per ``fed.residual``; the
        float64 residual and its :class:`~fedtalora.core.aggregation.ResidualFactors` when the model keeps the
        exact base)."""
        return aggregate_lora(updates, weights, model.lora_pairs(), residual=self.ctx.residual,
                              exact=model.exact_base is not None)

    def apply(self, model: FedModel, agg: Aggregate) -> None:
        """Make ``agg`` the new global model: load the averaged state, fold residuals into the base."""
        model.load_trainable(agg.state)
        model.add_to_base(agg.residuals)

    # --- state the clients need -----------------------------------------------------------------

    def client_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The server-side state a client's hooks (:meth:`on_local_start`, :meth:`forward`, :meth:`loss`)
        read: tensors and a JSON-able dict. Engines whose clients are other processes (Flower) send it to
        every client that does not hold its current version and call :meth:`load_client_state` there before
        each client round. Default: :meth:`checkpoint_state` (what a resumed server needs, which is enough
        for its clients) and no JSON; override to send less, or settings that are not tensors."""
        return self.checkpoint_state(), {}

    def load_client_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """On a client: replace the method's state with what :meth:`client_state` returned on the server
        (empty dicts: the state before the first task). Default: :meth:`load_checkpoint_state`."""
        if meta:
            raise CheckpointError(f"method {self.name!r} sends no JSON client state, got keys {sorted(meta)[:3]}")
        self.load_checkpoint_state(tensors)

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
