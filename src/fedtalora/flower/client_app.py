"""The fedtalora ``ClientApp``: one federated client, in a Flower simulation or on a SuperNode.

A client knows only what reaches it through Flower:

* its **partition id** from its node config (``flower-supernode --node-config "partition-id=K"``;
  the simulation runtime sets it to the node's index);
* the **run's config** from the server's ``query.hello`` message (kept in ``context.state``);
* its **samples** from the partition manifest ``partitions.json``: the path in the node config
  (``partitions=...``), else in the run config (``flwr run --run-config "partitions='...'"``), else the
  one the server names in its hello message; the server also sends a digest of the expected indices
  and the client refuses a manifest that disagrees;
* the **global trainable state** and the **residual catch-up** of its frozen base in every ``train``
  message (:mod:`fedtalora.flower.protocol`), and the method's client state when its version changes.

What the method keeps on the client and never sends (``Method.private_state``: GLFC's exemplar memory) is kept
in the node's ``context.state``, loaded before and stored after every message; what the method asks of the
client's data (``Method.client_work``: feature moments, prototype gradients, exemplar selection) runs here,
answering ``query.features`` with ``reply: method-work``.

It builds its own model from the config (same seeds: the same initial weights as the server's, checked
by a fingerprint) and trains with :func:`fedtalora.fed.transport.client_round`, the function the in-process
engine calls. Its frozen base -- the float64 accumulator ``D`` of the exact base, beside the pre-trained
``W0`` it rebuilds (:mod:`fedtalora.core.exact`) -- and the base version live in ``context.state`` between
messages (a plain SuperNode starts one ClientApp process per message). The dataset and model are cached per
process (:func:`build_client_side`: the simulation's Ray actors and :mod:`fedtalora.flower.worker`'s warm
executors serve many messages and nodes), and the model's base is reset from the node's state for each
message, so nodes sharing a process never see each other's weights.

Node config keys: ``partition-id`` (required), ``data-root`` (this machine's ``data.root``),
``partitions`` (this machine's copy of the manifest).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import RunConfig, from_dict
from ..core.scenario import Task
from ..data import Split, load_from_config
from ..errors import FedTaLoRAError, PartitionError
from ..fed.build import torch_threads
from ..fed.client import to_device
from ..fed.transport import client_features, client_round
from ..methods import Method
from ..methods.classifier import Classifier
from ..model import FedModel
from . import protocol as P

logger = logging.getLogger(__name__)

app = ClientApp()


class InjectedCrash(RuntimeError):
    """Raised mid-training by a client the server told to crash (``faults.client_dropout``)."""


@dataclass
class ClientSide:
    """What one process builds for a run: config, data, model, method (shared by the nodes it serves)."""

    cfg: RunConfig
    manifest: dict[str, Any]
    tasks: list[Task]
    num_classes: int
    split: Split
    """The training split (tokenised for text)."""
    train_targets: np.ndarray
    """Head-output label of every training sample (position of its class in the manifest's class order)."""
    model: FedModel
    method: Method
    classifier: Classifier
    """The run's classifier: computes what a node sends at the end of a task (``Classifier.client_statistics``)."""
    keys: list[str]
    transform: Callable[..., Any]
    device: torch.device
    pristine: dict[str, torch.Tensor]
    """The adapted layers' base weights as built (version 0; ``W0`` of the exact base)."""
    fingerprint: str
    partition_cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def indices(self, t: int, k: int) -> np.ndarray:
        """Client ``k``'s samples of task ``t``, from the manifest."""
        key = (t, k)
        if key not in self.partition_cache:
            try:
                entry = self.manifest["tasks"][t]["clients"][k]
            except (IndexError, KeyError, TypeError):
                raise PartitionError(f"the partition manifest has no client {k} in task {t}") from None
            self.partition_cache[key] = np.asarray(entry["indices"], dtype=np.int64)
        return self.partition_cache[key]


_CACHE: dict[tuple[str, str, str, tuple[int, int]], ClientSide] = {}


def _read_manifest(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise PartitionError(f"cannot read the partition manifest {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PartitionError(f"the partition manifest {path} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise PartitionError(f"{path} is not a fedtalora partitions.json (no task list)")
    return data


def _file_version(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def build_client_side(config_yaml: str, manifest_path: str, data_root: str = "") -> ClientSide:
    """Build (or reuse from this process's cache) the client's config, data and model.

    The cache holds one entry (memory stays bounded: one dataset and one model per process), keyed by
    the config, the manifest (path, modification time and size: a rewritten manifest is read again) and
    the data root. Reusing it across messages, rounds and even runs of the same config is safe: every
    message resets what training changes (the base from the node's state, the trainable tensors from
    the message)."""
    key = (config_yaml, manifest_path, data_root, _file_version(manifest_path))
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()  # before building: never two datasets and models at once
    from ..fed.build import build_components, input_transform, resolve_device

    data = yaml.safe_load(config_yaml)
    if data_root:
        data.setdefault("data", {})["root"] = data_root
    cfg = from_dict(data)
    manifest = _read_manifest(manifest_path)
    if manifest.get("num_clients") != cfg.fed.num_clients or manifest.get("dataset") != cfg.data.dataset:
        raise PartitionError(f"the partition manifest {manifest_path} is for {manifest.get('num_clients')} clients "
                             f"of {manifest.get('dataset')!r}, the run has {cfg.fed.num_clients} of {cfg.data.dataset!r}")
    tasks, offset = [], 0
    for t, entry in enumerate(manifest["tasks"]):
        classes = tuple(int(c) for c in entry["classes"])
        tasks.append(Task(index=t, classes=classes, label_offset=offset))
        offset += len(classes)
    order = np.asarray([c for task in tasks for c in task.classes], dtype=np.int64)
    device = resolve_device(cfg.train.device)
    dataset = load_from_config(cfg.data, cfg.seed)
    if len(order) != dataset.num_classes or sorted(order.tolist()) != list(range(dataset.num_classes)):
        raise PartitionError(f"the manifest's class order does not cover the {dataset.num_classes} classes of "
                             f"{cfg.data.dataset!r}")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    parts = build_components(cfg, len(order), device,  # as the server builds them (lander: label-text anchors)
                             class_names=dataset.names_of(order.tolist()))
    model, method = parts.model, parts.method
    transform = input_transform(cfg, dataset, model, splits=("train",))
    split = dataset.train
    keys = method.trainable_keys(model)
    side = ClientSide(
        cfg=cfg, manifest=manifest, tasks=tasks, num_classes=len(order), split=split,
        train_targets=position[dataset.train.labels], model=model, method=method, classifier=parts.classifier,
        keys=keys, transform=transform, device=device,
        pristine={p.layer: model.base_weight(p.layer).detach().clone() for p in model.lora_pairs()},
        fingerprint=P.frozen_fingerprint(model, keys),
    )
    _CACHE[key] = side
    return side


# --- per node ---------------------------------------------------------------------------------------


def _partition_id(context: Context) -> int:
    k = context.node_config.get("partition-id")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FedTaLoRAError(f"this node's config has partition-id={k!r}; start the SuperNode with "
                             "--node-config \"partition-id=K\" (K = 0 .. fed.num_clients-1)")
    return k


def _manifest_path(context: Context, announced: str) -> str:
    for source in (context.node_config, context.run_config):
        value = source.get("partitions")
        if isinstance(value, str) and value:
            return value
    return announced


def _node_state(context: Context) -> ConfigRecord:
    rec = context.state.config_records.get(P.STATE_CONFIG)
    if rec is None:
        raise FedTaLoRAError("this node has not been introduced to the run (no hello message received)")
    return rec


def _side(context: Context) -> ClientSide:
    st = _node_state(context)
    data_root = context.node_config.get("data-root", "")
    return build_client_side(str(st["config"]), str(st["partitions"]), str(data_root) if data_root else "")


def _load_base(side: ClientSide, context: Context) -> None:
    """This node's base into the shared model: its accumulator ``D`` (zero while pristine) and
    ``fl32(W0 + D)``; the pristine base for a method that never changes it."""
    exact = side.model.exact_base
    stored = context.state.array_records.get(P.STATE_BASE)
    if exact is None:
        with torch.no_grad():
            for layer, w in side.pristine.items():
                side.model.base_weight(layer).copy_(w)
        return
    if stored is not None:
        exact.load_state_dict(P.from_record(stored))
    else:
        exact.load_state_dict({layer: torch.zeros_like(d) for layer, d in exact.acc.items()})
    side.model.sync_base()


def _sync(side: ClientSide, context: Context, msg: Message) -> int:
    """Load this node's base into the shared model, apply the message's catch-up, store it back; returns
    the base version the node now has."""
    st = _node_state(context)
    cr = msg.content.config_records[P.CONFIG]
    version = int(st["version"])
    _load_base(side, context)
    target = int(cr["base-to"])
    if P.RESIDUAL in msg.content.array_records:
        frm = int(cr["base-from"])
        if frm >= 0 and frm != version:
            raise FedTaLoRAError(f"the server sent a catch-up from base version {frm}, this node has {version}")
        plan = P.decode_catch_up(msg.content.array_records[P.RESIDUAL])
        if frm < 0 and set(plan) != set(side.pristine):
            raise FedTaLoRAError("the server sent a partial dense base to a node of unknown version")
        P.apply_catch_up(side.model, plan)
        version = target
        context.state[P.STATE_BASE] = P.to_record(side.model.exact_base.acc)  # type: ignore[union-attr]
        st["version"] = version
    elif target != version:
        raise FedTaLoRAError(f"the server's base is at version {target}, this node's at {version}, and no "
                             "catch-up came with the message")
    return version


def _load_method_state(side: ClientSide, context: Context, msg: Message) -> str:
    """Store the message's method state (if it carries one) in the node's state, check that the node now
    holds the version the server names, and load it into the (possibly shared) method object, then this node's
    private method state; returns the method state's digest (``""``: none)."""
    arrays = msg.content.array_records.get(P.METHOD)
    meta = msg.content.config_records.get(P.METHOD_META)
    if arrays is not None and meta is not None:
        P.method_state_from_records(arrays, meta)  # refuse a malformed one before keeping it
        context.state[P.STATE_METHOD] = arrays
        context.state[P.STATE_METHOD_META] = meta
    held_arrays = context.state.array_records.get(P.STATE_METHOD)
    held_meta = context.state.config_records.get(P.STATE_METHOD_META)
    want = str(msg.content.config_records[P.CONFIG].get("method-digest", ""))
    if held_arrays is None or held_meta is None:
        held, tensors, extra = "", {}, {}
    else:
        held, tensors, extra = P.method_state_from_records(held_arrays, held_meta)
    if held != want:
        raise FedTaLoRAError(f"the server's method state is version {want or 'none'}, this node holds "
                             f"{held or 'none'}, and none came with the message")
    side.method.load_client_state(tensors, extra)
    private = context.state.array_records.get(P.STATE_PRIVATE)
    side.method.load_private_state(_partition_id(context), P.from_record(private) if private is not None else {})
    return held


def _store_private_state(side: ClientSide, context: Context) -> None:
    """Keep what the method keeps on this node (GLFC's exemplar memory) in the node's state, never sent."""
    private = side.method.private_state(_partition_id(context))
    if private:
        context.state[P.STATE_PRIVATE] = P.to_record(private)
    else:
        context.state.array_records.pop(P.STATE_PRIVATE, None)


def _task_indices(side: ClientSide, cr: ConfigRecord, k: int) -> tuple[int, np.ndarray]:
    t = int(cr["task"])
    if int(cr["client"]) != k:
        raise FedTaLoRAError(f"message for client {cr['client']} reached the node of partition {k}")
    if not 0 <= t < len(side.tasks):
        raise FedTaLoRAError(f"task {t} is not in the partition manifest ({len(side.tasks)} tasks)")
    idx = side.indices(t, k)
    if P.indices_digest(idx) != str(cr["indices"]):
        raise PartitionError(f"the partition manifest gives client {k} other samples of task {t} than the "
                             "server's (another partitions.json?)")
    return t, idx


def _crash_midway(transform: Callable[..., Any], after: int = 1) -> Callable[..., Any]:
    """``transform`` that raises :class:`InjectedCrash` on batch ``after + 1`` (or the first, for one batch)."""
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > after:
            raise InjectedCrash("injected crash in the middle of local training (faults.client_dropout)")
        return transform(*args, **kwargs)

    return wrapped


def _eval_batches(side: ClientSide, idx: np.ndarray) -> Iterator[tuple[Any, torch.Tensor, np.ndarray]]:
    """The node's task data as :attr:`fedtalora.methods.TaskData.batches` gives it in-process: evaluation
    preprocessing, ``train.eval_batch_size`` at a time, in partition order."""
    step = side.cfg.train.eval_batch_size
    for start in range(0, len(idx), step):
        sel = idx[start:start + step]
        x = side.transform(to_device(side.split.inputs[torch.as_tensor(sel)], side.device), train=False)
        yield x, torch.as_tensor(side.train_targets[sel], device=side.device), sel


# --- message handlers -------------------------------------------------------------------------------


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Build this node's side of the run and introduce it: partition id, base version, fingerprint."""
    k = _partition_id(context)
    cr = msg.content.config_records[P.CONFIG]
    config_yaml = str(cr["config"])
    manifest = _manifest_path(context, str(cr["partitions"]))
    st = context.state.config_records.get(P.STATE_CONFIG)
    if st is None or str(st["config"]) != config_yaml:
        st = ConfigRecord({"config": config_yaml, "partitions": manifest, "version": 0})
        context.state[P.STATE_CONFIG] = st
        context.state.array_records.pop(P.STATE_BASE, None)
        context.state.array_records.pop(P.STATE_METHOD, None)
        context.state.config_records.pop(P.STATE_METHOD_META, None)
        context.state.array_records.pop(P.STATE_PRIVATE, None)
    side = _side(context)
    if k >= side.cfg.fed.num_clients:
        raise FedTaLoRAError(f"partition-id={k} but the run has fed.num_clients={side.cfg.fed.num_clients}")
    samples = [len(side.indices(t, k)) for t in range(len(side.tasks))]
    meta = context.state.config_records.get(P.STATE_METHOD_META)
    reply = ConfigRecord({"partition-id": k, "version": int(st["version"]), "fingerprint": side.fingerprint,
                          "num-samples": samples, "method-digest": str(meta["digest"]) if meta is not None else ""})
    return Message(RecordDict({P.CONFIG: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: sync the base, load the global state, train, send the update."""
    k = _partition_id(context)
    side = _side(context)
    cr = msg.content.config_records[P.CONFIG]
    t, idx = _task_indices(side, cr, k)
    version = _sync(side, context, msg)
    method_digest = _load_method_state(side, context, msg)
    global_state = P.from_record(msg.content.array_records[P.GLOBAL])
    transform = _crash_midway(side.transform) if bool(cr["crash"]) else side.transform
    with torch_threads(side.cfg.train.threads):
        res = client_round(side.model, side.method, global_state, cfg=side.cfg, task=side.tasks[t],
                           round_=int(cr["round"]), client=k, num_classes=side.num_classes, split=side.split,
                           indices=idx, targets=side.train_targets[idx], transform=transform, device=side.device)
    if bool(cr["crash"]):  # a local round of a single batch: crash before replying instead
        raise InjectedCrash("injected crash after local training, before replying (faults.client_dropout)")
    _store_private_state(side, context)
    content = RecordDict({
        P.UPDATE: P.to_record(res.state),
        P.METRICS: MetricRecord({"num-samples": res.num_samples, "loss": res.loss, "steps": res.steps}),
        P.CONFIG: ConfigRecord({"version": version, "method-digest": method_digest,
                                P.METHOD_REPORT: json.dumps(res.report, sort_keys=True)}),
    })
    return Message(content, reply_to=msg)


@app.query("features")
def features(msg: Message, context: Context) -> Message:
    """End-of-task client work: this node's features of its task data under the global model."""
    k = _partition_id(context)
    side = _side(context)
    cr = msg.content.config_records[P.CONFIG]
    t, idx = _task_indices(side, cr, k)
    version = _sync(side, context, msg)
    method_digest = _load_method_state(side, context, msg)
    side.model.load_trainable(P.from_record(msg.content.array_records[P.GLOBAL]))
    with torch_threads(side.cfg.train.threads):
        reply = str(cr.get("reply", ""))
        if reply == P.REPLY_METHOD_WORK:  # the method's end-of-task work (e.g. feature moments), computed here
            record = {P.METHOD_WORK_RECORD: P.to_record(side.method.client_work(
                side.model, side.tasks[t], str(cr.get("work", "")), k, _eval_batches(side, idx)))}
        elif reply == P.REPLY_STATISTICS:  # the classifier's sums, computed here
            feats, targets = client_features(side.model, side.split, idx, side.train_targets[idx],
                                             transform=side.transform, cfg=side.cfg, device=side.device)
            record = {P.STATISTICS_RECORD: P.to_record(side.classifier.client_statistics(side.tasks[t], feats, targets))}
        else:
            feats, targets = client_features(side.model, side.split, idx, side.train_targets[idx],
                                             transform=side.transform, cfg=side.cfg, device=side.device)
            record = {P.FEATURES_RECORD: P.to_record({"features": feats, "targets": targets})}
    _store_private_state(side, context)
    content = RecordDict({**record, P.CONFIG: ConfigRecord({"version": version, "method-digest": method_digest})})
    return Message(content, reply_to=msg)
