"""What the fedtalora ServerApp and ClientApp say to each other: message types, record names, codecs.

Three messages, each answered by one reply (Flower 1.42 Message API):

``query.hello`` (once per node, at the start)
    server -> client: ``fedtalora`` ConfigRecord ``{config: <the run's YAML>, partitions: <path>}``.
    client -> server: ``{partition-id, version, fingerprint, num-samples: [per task]}``. The client
    builds its model and loads its data; the server maps partition ids to node ids and checks that
    the client's frozen weights are its own (:func:`frozen_fingerprint`).
``train`` (every round, to each sampled client)
    server -> client: ``fedtalora`` ConfigRecord (task, round, client, the digest of its sample
    indices, the base versions), ``global`` ArrayRecord (the global trainable state) and, when the
    client's frozen base is behind, ``residual`` ArrayRecord (its catch-up, below).
    client -> server: ``update`` ArrayRecord (the trained tensors), ``metrics`` MetricRecord
    (``num-samples``, ``loss``, ``steps``), ``fedtalora`` ConfigRecord (``version``, ``method-digest``,
    ``method-report``: the method's :meth:`~fedtalora.methods.base.Method.client_report` as JSON, e.g. the
    synthetic samples the client drew).
``query.features`` (end of a task, to the clients that report)
    as ``train``, but the client answers ``features`` ArrayRecord ``{features, targets}``; with ``reply:
    statistics`` in the ConfigRecord it answers ``statistics`` ArrayRecord instead: what the run's
    classifier computes from those features on the client (the analytic classifier's ridge sums,
    ``Classifier.client_statistics``), so the features themselves never leave the node; with ``reply:
    method-work`` it answers ``method-work`` ArrayRecord: what the method computes from the client's task data
    (:meth:`~fedtalora.methods.base.Method.client_task_work`, e.g. TARGET's feature moments).

**Method state.** What a client needs beyond the global trainable state and its base (a method's
server-side state: PILoRA's earlier tasks' ``A`` for its orthogonality loss; a generator; anchors) is
the method's :meth:`~fedtalora.methods.base.Method.client_state`: a dict of tensors and a JSON-able
dict. It travels in ``train`` and ``query.features`` messages, only to a client that does not hold its
current version: ``method`` ArrayRecord (the tensors, packed) and ``method-meta`` ConfigRecord ``{digest,
json}`` (``digest`` of both parts); every such message names the version the client must then hold
(``method-digest`` in its ``fedtalora`` ConfigRecord). The client keeps both in ``context.state`` and gives them to
:meth:`~fedtalora.methods.base.Method.load_client_state` before every message it handles (nodes may share
one process and one method object); its replies say which version it holds (``method-digest`` in the
``fedtalora`` ConfigRecord). A method without such state sends nothing (digest ``""``). What a method keeps
*on* a client and never sends (:meth:`~fedtalora.methods.base.Method.private_state`: GLFC's exemplar memory)
lives in the node's ``context.state`` only, loaded before and stored after every message. Changes a method
makes to the *base* outside aggregation (PILoRA merges a finished task's LoRA into it at the next task's
start) reach the clients as a dense catch-up (below): the server notices them by the exact base's change
counter (:attr:`fedtalora.core.exact.ExactBase.generation`), and changes to trainable tensors travel in
``global`` anyway.

**The residual on the wire.** A method whose residual changes the base keeps it exactly
(:mod:`fedtalora.core.exact`): the server adds every round's float64 residual into the accumulator ``D`` beside
the pre-trained ``W0`` and computes with ``fl32(W0 + D)``. A client keeps its own ``D``
(``context.state``) and a *version*, the number of residual rounds it has applied. The catch-up from version
``c`` to the server's ``V`` is, per adapted layer, whichever is smaller: the
:class:`~fedtalora.core.aggregation.ResidualFactors` of the rounds ``c+1..V`` (the live clients' float32
``B_k``, ``A_k`` and float64 ``p_k``, from which the client recomputes the averages and the residual with the
server's own functions and adds it into its ``D`` in order: the same IEEE operations on the same bits, so
the result is bit-identical), or the server's accumulator ``D`` itself (dense, float64, replacing the
client's; never the float32 base, so later factored catch-ups stay bit-identical). Keys: ``dense:<layer>``
or ``B<v>:<layer>`` / ``A<v>:<layer>`` / ``p<v>:<layer>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..core.aggregation import ResidualFactors

if TYPE_CHECKING:
    from ..model import FedModel

HELLO = "query.hello"
TRAIN = "train"
FEATURES = "query.features"

CONFIG = "fedtalora"
GLOBAL = "global"
RESIDUAL = "residual"
UPDATE = "update"
METRICS = "metrics"
FEATURES_RECORD = "features"
STATISTICS_RECORD = "statistics"
REPLY_STATISTICS = "statistics"
METHOD_WORK_RECORD = "method-work"
"""ArrayRecord of a client's end-of-task work for the method (:meth:`Method.client_task_work`)."""
REPLY_METHOD_WORK = "method-work"
METHOD_REPORT = "method-report"
"""Key of the ``train`` reply's ConfigRecord: the method's client report (JSON)."""
METHOD = "method"
"""ArrayRecord of the method's client state (its tensors, packed)."""
METHOD_META = "method-meta"
"""ConfigRecord of the method's client state: ``digest`` (of tensors and JSON), ``json``."""

STATE_CONFIG = "fedtalora"
"""``context.state`` ConfigRecord of a client: the run's YAML, the manifest path and the base version."""
STATE_METHOD = "fedtalora.method"
"""``context.state`` ArrayRecord of a client: the method's client state tensors (absent: none)."""
STATE_METHOD_META = "fedtalora.method-meta"
STATE_PRIVATE = "fedtalora.method-private"
"""``context.state`` ArrayRecord of a client: what the method keeps on this node and never sends
(:meth:`~fedtalora.methods.base.Method.private_state`, e.g. GLFC's exemplar memory; absent: nothing)."""
"""``context.state`` ConfigRecord of a client: the method's client state ``digest`` and ``json``."""
STATE_BASE = "fedtalora.exact"
"""``context.state`` ArrayRecord of a client: its adapted layers' float64 accumulators ``D`` (absent while
pristine, ``D = 0``)."""


PACKED = "packed"
"""The single array of a packed record (:func:`to_record`)."""


def pack_tensors(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Tensors -> one flat ``uint8`` array: an 8-byte little-endian header length, a JSON header
    ``[[key, dtype, shape], ...]`` and the tensors' bytes (C order), in the mapping's key order.

    Flower moves every array of a message as a separate object (one HTTP request per array and hop in a
    deployment, one Ray object entry in the simulation); a record of 50 small LoRA tensors costs 50
    round trips per hop. Packed, a record is one object."""
    tensors = [(k, v.detach().to("cpu").contiguous()) for k, v in state.items()]
    header = json.dumps([[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors]).encode()
    sizes = [t.numel() * t.element_size() for _, t in tensors]
    out = np.empty(8 + len(header) + sum(sizes), dtype=np.uint8)
    out[:8] = np.frombuffer(len(header).to_bytes(8, "little"), dtype=np.uint8)
    out[8:8 + len(header)] = np.frombuffer(header, dtype=np.uint8)
    offset = 8 + len(header)
    for (_, t), n in zip(tensors, sizes, strict=True):
        if n:
            out[offset:offset + n] = t.reshape(-1).view(torch.uint8).numpy()
        offset += n
    return out


def unpack_tensors(buf: np.ndarray) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors` (writable tensors that own their memory); ValueError if malformed."""
    flat = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    try:
        n = int.from_bytes(flat[:8].tobytes(), "little")
        entries = json.loads(flat[8:8 + n].tobytes())
        offset = 8 + n
        out: dict[str, torch.Tensor] = {}
        for key, dtype_name, shape in entries:
            dtype = getattr(torch, dtype_name)
            if not isinstance(dtype, torch.dtype):
                raise TypeError(dtype_name)
            t = torch.empty(shape, dtype=dtype)
            size = t.numel() * t.element_size()
            if offset + size > flat.size:
                raise ValueError("truncated")
            if size:
                t.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(flat[offset:offset + size]))
            out[key] = t
            offset += size
    except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed packed tensors: {e}") from None
    if offset != flat.size:
        raise ValueError("malformed packed tensors: trailing bytes")
    return out


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord of one packed array (:func:`pack_tensors`; on the CPU, key order kept)."""
    return ArrayRecord({PACKED: Array.from_numpy_ndarray(pack_tensors(state))})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors (writable CPU copies, in the record's key order): a packed record, or one
    array per tensor."""
    if list(record.keys()) == [PACKED]:
        return unpack_tensors(record[PACKED].numpy())
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def wire_nbytes(obj: Any) -> int:
    """Bytes of ``obj`` (a record or RecordDict) as Flower serialises it for the wire: the sum of the
    deflated bytes of the object and every object nested in it (arrays, array chunks)."""
    total, seen, stack = 0, set(), [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += len(o.deflate())
        children = getattr(o, "children", None)
        if children:
            stack.extend(children.values())
    return total


def method_state_records(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[str, ArrayRecord | None,
                                                                                          ConfigRecord | None]:
    """A method's client state (:meth:`Method.client_state`) -> ``(digest, ArrayRecord, ConfigRecord)``;
    ``("", None, None)`` when both parts are empty."""
    if not tensors and not meta:
        return "", None, None
    packed = pack_tensors(tensors)
    text = json.dumps(dict(meta), sort_keys=True)
    d = digest(packed.tobytes() + b"\0" + text.encode())
    return d, ArrayRecord({PACKED: Array.from_numpy_ndarray(packed)}), ConfigRecord({"digest": d, "json": text})


def method_state_from_records(arrays: ArrayRecord, config: ConfigRecord) -> tuple[str, dict[str, torch.Tensor],
                                                                                  dict[str, Any]]:
    """Inverse of :func:`method_state_records`: ``(digest, tensors, meta)``; ValueError if malformed or if
    the content does not match its digest."""
    try:
        text = str(config["json"])
        meta = json.loads(text)
        d = str(config["digest"])
        packed = np.ascontiguousarray(arrays[PACKED].numpy(), dtype=np.uint8)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed method state: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError("malformed method state: its JSON part is not an object")
    if digest(packed.tobytes() + b"\0" + text.encode()) != d:
        raise ValueError("malformed method state: its content does not match its digest")
    return d, unpack_tensors(packed), meta


def digest(data: bytes | str) -> str:
    """Short SHA-256 hex digest."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:32]


def indices_digest(indices: Iterable[int]) -> str:
    """Digest of a client's sample indices (the server and the client must agree on the partition)."""
    return digest(np.asarray(list(indices), dtype=np.int64).tobytes())


def frozen_fingerprint(model: FedModel, trainable_keys: Iterable[str]) -> str:
    """Digest of every tensor of the model that never changes in a run: all parameters and buffers but
    the trainable ones and the adapted layers' base weights. Two processes that built the same config
    agree on it; a client with other pretrained weights or another library version does not."""
    params = model.parameters_by_key()
    moving = {id(params[k]) for k in trainable_keys}
    moving |= {id(model.base_weight(p.layer)) for p in model.lora_pairs()}
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in moving:
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


Plan = Mapping[str, "torch.Tensor | list[tuple[int, ResidualFactors]]"]
"""A catch-up: per adapted layer, the dense accumulator ``D`` or the ``(version, factors)`` of each missed round."""


def catch_up_record(plan: Plan) -> ArrayRecord:
    """Encode a catch-up (:data:`Plan`)."""
    out: dict[str, torch.Tensor] = {}
    for layer, item in plan.items():
        if isinstance(item, torch.Tensor):
            out[f"dense:{layer}"] = item
        else:
            for v, f in item:
                out[f"B{v}:{layer}"] = f.B
                out[f"A{v}:{layer}"] = f.A
                out[f"p{v}:{layer}"] = f.weights
    return to_record(out)


def decode_catch_up(record: ArrayRecord) -> dict[str, torch.Tensor | list[tuple[int, ResidualFactors]]]:
    """Inverse of :func:`catch_up_record` (factor lists sorted by version)."""
    tensors = from_record(record)
    plan: dict[str, Any] = {}
    factors: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        head, _, layer = key.partition(":")
        if not layer:
            raise ValueError(f"malformed residual key {key!r}")
        if head == "dense":
            plan[layer] = t
        elif head[:1] in ("B", "A", "p") and head[1:].isdigit():
            factors.setdefault(layer, {}).setdefault(int(head[1:]), {})[head[0]] = t
        else:
            raise ValueError(f"malformed residual key {key!r}")
    for layer, by_version in factors.items():
        if layer in plan:
            raise ValueError(f"layer {layer!r} has both a dense base and factors")
        items = []
        for v in sorted(by_version):
            parts = by_version[v]
            if set(parts) != {"B", "A", "p"}:
                raise ValueError(f"layer {layer!r} version {v} lacks B, A or p")
            items.append((v, ResidualFactors(B=parts["B"], A=parts["A"], weights=parts["p"])))
        plan[layer] = items
    return plan


@torch.no_grad()
def apply_catch_up(model: FedModel, plan: Plan) -> None:
    """Bring the model's exact base to the server's: replace the accumulator ``D`` of dense layers, add the
    residuals of factored ones in order exactly as the server did (``D += f.dense(s)``,
    :func:`fedtalora.core.aggregation.aggregate_lora` with ``exact=True`` and :meth:`FedModel.add_to_base`),
    and rewrite the base weights from ``W0 + D``."""
    scaling = {p.layer: p.scaling for p in model.lora_pairs()}
    unknown = sorted(set(plan) - set(scaling))
    if unknown:
        raise ValueError(f"residual for layers this model does not adapt: {unknown[:3]}")
    exact = model.exact_base
    if exact is None and plan:
        raise ValueError("a residual catch-up for a model without the exact base (its method changes no base)")
    for layer, item in plan.items():
        if isinstance(item, torch.Tensor):
            exact.set(layer, item)  # type: ignore[union-attr]  (checks shape and float64)
            model.sync_base([layer])
            continue
        for _, f in item:
            if f.B.shape[0] != exact.acc[layer].shape[0] or f.A.shape[1] != exact.acc[layer].shape[1]:  # type: ignore[union-attr]
                raise ValueError(f"residual factors of {layer} have shapes {tuple(f.B.shape)}, {tuple(f.A.shape)}")
            model.add_to_base({layer: f.dense(scaling[layer])})
