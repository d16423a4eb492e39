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
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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

STATE_CONFIG = "fedtalora"
"""``context.state`` ConfigRecord of a client: the run's YAML, the manifest path and the base version."""
STATE_BASE = "fedtalora.exact"
"""``context.state`` ArrayRecord of a client: its adapted layers' float64 accumulators ``D`` (absent while
pristine, ``D = 0``)."""


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord (on the CPU, in the mapping's key order)."""
    return ArrayRecord({k: Array.from_torch_tensor(v.detach().cpu().contiguous()) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors (writable CPU copies, in the record's key order)."""
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
