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
    (``num-samples``, ``loss``, ``steps``), ``fedtalora`` ConfigRecord (``version``).
``query.features`` (end of a task, to the clients that report)
    as ``train``, but the client answers ``features`` ArrayRecord ``{features, targets}``.

**The residual on the wire.** The server folds ``W_res = s L R`` into its base every round; a client
keeps its base (``context.state``) and a *version*, the number of residual rounds it has applied. The
catch-up from version ``c`` to the server's ``V`` is, per adapted layer, whichever is smaller: the
factors ``(L_v, R_v)`` of the rounds ``c+1..V`` (applied in order as ``base += (L_v @ R_v) * s``, the
server's own operation, so the result is bit-identical), or the server's current base weight (dense,
replacing the client's). Keys: ``dense:<layer>`` or ``L<v>:<layer>`` / ``R<v>:<layer>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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

STATE_CONFIG = "fedtalora"
"""``context.state`` ConfigRecord of a client: the run's YAML, the manifest path and the base version."""
STATE_BASE = "fedtalora.base"
"""``context.state`` ArrayRecord of a client: its adapted layers' base weights (absent while pristine)."""


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


def catch_up_record(plan: Mapping[str, torch.Tensor | list[tuple[int, torch.Tensor, torch.Tensor]]]) -> ArrayRecord:
    """Encode a catch-up: per layer, the dense base weight or the ``(version, L, R)`` of each missed round."""
    out: dict[str, torch.Tensor] = {}
    for layer, item in plan.items():
        if isinstance(item, torch.Tensor):
            out[f"dense:{layer}"] = item
        else:
            for v, L, R in item:
                out[f"L{v}:{layer}"] = L
                out[f"R{v}:{layer}"] = R
    return to_record(out)


def decode_catch_up(record: ArrayRecord) -> dict[str, torch.Tensor | list[tuple[int, torch.Tensor, torch.Tensor]]]:
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
        elif head[:1] in ("L", "R") and head[1:].isdigit():
            factors.setdefault(layer, {}).setdefault(int(head[1:]), {})[head[0]] = t
        else:
            raise ValueError(f"malformed residual key {key!r}")
    for layer, by_version in factors.items():
        if layer in plan:
            raise ValueError(f"layer {layer!r} has both a dense base and factors")
        items = []
        for v in sorted(by_version):
            pair = by_version[v]
            if set(pair) != {"L", "R"}:
                raise ValueError(f"layer {layer!r} version {v} lacks L or R")
            items.append((v, pair["L"], pair["R"]))
        plan[layer] = items
    return plan


@torch.no_grad()
def apply_catch_up(model: FedModel, plan: Mapping[str, Any]) -> None:
    """Bring the model's base weights to the server's: copy dense layers, add factored residuals in order
    exactly as the server did (``base += (L @ R) * s``, :func:`fedtalora.aggregation.aggregate_lora` and
    :meth:`FedModel.add_to_base`)."""
    scaling = {p.layer: p.scaling for p in model.lora_pairs()}
    unknown = sorted(set(plan) - set(scaling))
    if unknown:
        raise ValueError(f"residual for layers this model does not adapt: {unknown[:3]}")
    for layer, item in plan.items():
        w = model.base_weight(layer)
        if isinstance(item, torch.Tensor):
            if item.shape != w.shape:
                raise ValueError(f"dense base of {layer} has shape {tuple(item.shape)}, expected {tuple(w.shape)}")
            w.copy_(item.to(device=w.device, dtype=w.dtype))
            continue
        for _, L, R in item:
            model.add_to_base({layer: (L @ R) * scaling[layer]})
