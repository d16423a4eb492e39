"""Client-parallel local training: several clients' local rounds as one batched pass (``train.parallel_clients``).

All clients of a round start from the same global state and share one frozen backbone; what differs per
client is its LoRA factors, its head, its optimiser state and its data. :func:`train_together` trains ``G``
clients at once:

* **Stacked tensors.** Every trainable tensor (LoRA A/B, head weight and bias) becomes one leaf of shape
  ``(G, *shape)`` holding the clients' copies; one optimiser (``train.optimizer``, the method's parameter
  groups) steps all of them. SGD (momentum, weight decay) and AdamW are element-wise, and every client that
  is still training has taken the same number of steps, so each client's slice follows exactly its own
  serial optimiser.
* **Grouped modules.** For the batched pass the peft LoRA factors of every adapted layer and the model's head
  are swapped for :class:`GroupedLinear` modules that apply client ``g``'s weights to client ``g``'s rows of the
  batch (one ``bmm`` per layer). The frozen base layers see one batch of ``G x b`` rows: one large GEMM instead
  of ``G`` small ones. Nothing else of the model changes, so the method's own :meth:`~Method.forward` runs.
* **Same samples, same seeds.** Each client keeps its own generator (derived from ``(seed, task, round,
  client)`` by :func:`fedtalora.fed.transport.client_job`) and its own batch iterator
  (:func:`~fedtalora.fed.client.batches`); its batches are preprocessed by the same transform calls in the
  same order as on the serial path, so it draws the same shuffles and flips. A batch shorter than the longest
  of the step (the last one of an epoch) is padded with rows that no loss sees; text is padded to the longest
  sequence of the step with masked tokens.
* **Per-client losses.** The logits are cut back per client (its rows, its loss mask) and the method's
  :meth:`~Method.loss` is called once per client, with a :class:`ClientView` of the model whose
  ``parameters_by_key()`` holds that client's tensors (FedProx's proximal term). The sum of the clients'
  losses is back-propagated: client ``g``'s tensors get exactly the gradient of client ``g``'s loss.
* **Clients that finish early** (fewer batches) leave the batch; their tensors are read back right after
  their last step, before the optimiser moves their slice again.

What can run this way is said by the method (:attr:`Method.trains_clients_together
<fedtalora.methods.Method.trains_clients_together>`) and by the model: :func:`why_serial` names the reason
when it cannot (a method that trains other tensors or computes otherwise; dropout or drop-path, whose draws
would differ; batch normalisation, which would mix the clients' samples). Results equal the serial path to float rounding (the tests compare every returned tensor and
loss). Memory: activations of ``G x train.batch_size`` samples and ``G`` copies of the trainable tensors and
their optimiser state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data import Split
from ..methods import Method
from ..model import ADAPTER, FedModel
from ..model.prefix import Activations, batch_statistics_modules, stochastic_modules
from .client import ClientJob, ClientResult, Transform, autocast, batches, make_optimizer, to_device

__all__ = ["ClientView", "GroupedLinear", "combine_batches", "grouped_modules", "length_buckets", "train_steps_together",
           "train_together", "why_serial"]


def why_serial(model: FedModel, method: Method, keys: Sequence[str]) -> str | None:
    """Why the clients of ``method`` on ``model`` cannot train together (None: they can)."""
    if not method.trains_clients_together:
        return f"method {method.name!r} does not train clients together (Method.trains_clients_together)"
    stochastic = stochastic_modules(model)
    if stochastic:
        return (f"the model draws random numbers in training ({stochastic[0]}"
                f"{f' and {len(stochastic) - 1} more' if len(stochastic) > 1 else ''}; e.g. lora.dropout > 0)")
    mixing = batch_statistics_modules(model)
    if mixing:
        return f"the model normalises by batch statistics ({mixing[0]}): a batch of several clients would mix them"
    stackable = set(model.lora_parameters()) | set(model.head_parameters())
    other = [k for k in keys if k not in stackable]
    if other:
        return f"the method trains {other[0]!r}, which is neither a LoRA factor nor the head"
    return None


class GroupedLinear(nn.Module):
    """``G`` linear maps applied to ``G`` consecutive row blocks of a batch.

    ``x (G*b, ..., d_in)`` -> ``(G*b, ..., d_out)``: rows ``g*b .. (g+1)*b - 1`` go through ``weight[g]``
    (``(G, d_out, d_in)``) and ``bias[g]`` (``(G, d_out)`` or None). The tensors are not registered as
    parameters: they are slices of the trainer's stacked leaves.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, d_out, d_in = self.weight.shape
        x3 = x.reshape(G, -1, d_in)
        wt = self.weight.transpose(1, 2)
        y = torch.bmm(x3, wt) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x3, wt)
        return y.reshape(*x.shape[:-1], d_out)

    def extra_repr(self) -> str:
        G, d_out, d_in = self.weight.shape
        return f"groups={G}, in_features={d_in}, out_features={d_out}, bias={self.bias is not None}"


@contextlib.contextmanager
def grouped_modules(model: FedModel, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside, ``model`` computes with per-client tensors: ``tensors[key]`` ``(G, *shape)`` for the LoRA
    factors and head tensors it names (a factor of a layer whose other factor is named is shared by all
    clients); layers none of whose tensors are named, and everything else, stay as they are."""
    G = next(iter(tensors.values())).shape[0] if tensors else 0
    undo: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent[name] if isinstance(parent, nn.ModuleDict) else getattr(parent, name)
        undo.append((parent, name, old))
        if isinstance(parent, nn.ModuleDict):
            parent[name] = new
        else:
            setattr(parent, name, new)

    def stacked(key: str, shared: torch.Tensor) -> torch.Tensor:
        return tensors[key] if key in tensors else shared.detach().unsqueeze(0).expand(G, *shared.shape)

    try:
        for pair in model.lora_pairs():
            if pair.a_key not in tensors and pair.b_key not in tensors:
                continue
            m = model.get_submodule(pair.layer)
            swap(m.lora_A, ADAPTER, GroupedLinear(stacked(pair.a_key, m.lora_A[ADAPTER].weight)))
            swap(m.lora_B, ADAPTER, GroupedLinear(stacked(pair.b_key, m.lora_B[ADAPTER].weight)))
        if "head.weight" in tensors or "head.bias" in tensors:
            head = model.head
            swap(model, "head", GroupedLinear(stacked("head.weight", head.weight), stacked("head.bias", head.bias)))
        yield
    finally:
        for parent, name, old in reversed(undo):
            if isinstance(parent, nn.ModuleDict):
                parent[name] = old
            else:
                setattr(parent, name, old)


class ClientView:
    """The model as one client of a group sees it in :meth:`Method.loss`: ``parameters_by_key()`` holds the
    client's own (differentiable) tensors; everything else is the shared model's."""

    def __init__(self, model: FedModel, stacked: dict[str, torch.Tensor], slot: int,
                 shared: dict[str, torch.Tensor]) -> None:
        self._model, self._stacked, self._slot, self._shared = model, stacked, slot, shared

    def parameters_by_key(self) -> dict[str, torch.Tensor]:
        return {**self._shared, **{k: v[self._slot] for k, v in self._stacked.items()}}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


# --- batches of several clients ------------------------------------------------------------------------


def _pad(t: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """``t`` zero-padded at the end to ``rows`` rows (and to ``cols`` along dim 1)."""
    pad_rows = rows - t.shape[0]
    pad_cols = 0 if cols is None else cols - t.shape[1]
    if not pad_rows and not pad_cols:
        return t
    spec = [0, 0] * t.ndim  # F.pad lists the last dimension first
    spec[-1] = pad_rows
    if pad_cols:
        spec[-3] = pad_cols
    return F.pad(t, spec)


def _pad_mask(masks: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Attention masks padded to ``(rows, cols)`` each and stacked; a padding row attends to its first token
    only (a row without any token would give NaNs that reach the gradients through 0 * NaN)."""
    out = []
    for m in masks:
        p = _pad(m, rows, cols)
        if m.shape[0] < rows:
            p = p.clone()
            p[m.shape[0]:, 0] = 1
        out.append(p)
    return torch.cat(out)


def combine_batches(xs: list[Any]) -> tuple[Any, int]:
    """Transformed batches of ``G`` clients -> one batch of ``G x b`` rows (``b``: the most rows of any),
    client ``g`` in rows ``g*b ..``; returns it and ``b``. Images: zero rows; text (``input_ids``,
    ``attention_mask``, ``padded``) and :class:`~fedtalora.model.prefix.Activations`: padded to the longest
    sequence with masked tokens."""
    b = max(len(x) if not isinstance(x, dict) else x["input_ids"].shape[0] for x in xs)
    first = xs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([_pad(x, b) for x in xs]), b
    if isinstance(first, dict):
        L = max(x["input_ids"].shape[1] for x in xs)
        padded = any(x.get("padded", True) or x["input_ids"].shape[1] < L or x["input_ids"].shape[0] < b for x in xs)
        return {"input_ids": torch.cat([_pad(x["input_ids"], b, L) for x in xs]),
                "attention_mask": _pad_mask([x["attention_mask"] for x in xs], b, L), "padded": padded}, b
    if isinstance(first, Activations):
        if first.mask is None:
            return Activations(torch.cat([_pad(x.hidden, b) for x in xs]), first.point), b
        L = max(x.hidden.shape[1] for x in xs)
        padded = any(x.padded or x.hidden.shape[1] < L or len(x) < b for x in xs)
        return Activations(torch.cat([_pad(x.hidden, b, L) for x in xs]), first.point,
                           _pad_mask([x.mask for x in xs], b, L), padded), b
    raise TypeError(f"cannot batch inputs of type {type(first).__name__} across clients")


def _shape(x: Any) -> tuple[int, int] | None:
    """``(rows, sequence length)`` of a transformed text batch; None for inputs without sequences."""
    if isinstance(x, dict):
        return tuple(x["input_ids"].shape[:2])  # type: ignore[return-value]
    if isinstance(x, Activations) and x.mask is not None:
        return tuple(x.hidden.shape[:2])  # type: ignore[return-value]
    return None


def length_buckets(xs: list[Any], slack: float = 1.25) -> list[list[int]]:
    """Positions of ``xs`` split into parts that are padded together: by increasing sequence length, a part grows
    while its padded size (parts x most rows x longest sequence) stays within ``slack`` times its real size.
    Inputs without sequences (images) form one part. Padding text of many clients to the longest of them would otherwise
    multiply the work (10 clients x 16 Banking77 sentences: the longest of 160 against the longest of 16)."""
    found = [_shape(x) for x in xs]
    if any(shape is None for shape in found):
        return [list(range(len(xs)))]
    shapes: list[tuple[int, int]] = found  # type: ignore[assignment]
    order = sorted(range(len(xs)), key=lambda i: (shapes[i][1], i))
    parts: list[list[int]] = []
    real = 0
    for i in order:
        rows, length = shapes[i]
        if parts:
            part = parts[-1]
            grown = (len(part) + 1) * max(rows, *(shapes[k][0] for k in part)) * length  # ``length`` is the longest
            if grown <= slack * (real + rows * length):
                part.append(i)
                real += rows * length
                continue
        parts.append([i])
        real = rows * length
    return [sorted(part) for part in parts]


# --- the trainer ---------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """One client's position in its local epochs."""

    job: ClientJob
    idx: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None
    it: Iterator[torch.Tensor]
    epoch: int = 0
    pending: torch.Tensor | None = None
    steps: int = 0
    total: torch.Tensor | None = None


def train_together(model: FedModel, method: Method, global_state: dict[str, torch.Tensor], jobs: Sequence[ClientJob],
                   *, split: Split, transform: Transform, cfg: TrainConfig, device: torch.device) -> list[ClientResult]:
    """The local rounds of ``jobs`` (clients of one round, all from ``global_state``), trained together;
    what :func:`~fedtalora.fed.client.local_train` returns for each, in the order of ``jobs``.

    Raises:
        ValueError: the method or model cannot train clients together (:func:`why_serial`).
    """
    states, totals, steps = train_steps_together(model, method, global_state, jobs, split=split,
                                                 transform=transform, cfg=cfg, device=device)
    return [ClientResult(client=job.client, state={k: v.to("cpu") for k, v in state.items()},
                         num_samples=len(job.indices), loss=float(total) / max(n, 1), steps=n)  # the read-backs
            for job, state, total, n in zip(jobs, states, totals, steps, strict=True)]


def train_steps_together(model: FedModel, method: Method, global_state: dict[str, torch.Tensor],
                         jobs: Sequence[ClientJob], *, split: Split, transform: Transform, cfg: TrainConfig,
                         device: torch.device) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], list[int]]:
    """The loop of :func:`train_together`; nothing in it reads a value back from ``device``.

    Returns:
        per job: its trained tensors (copies on ``device``), the sum of its step losses (0-d, on ``device``)
        and its number of steps.
    """
    keys = list(global_state)
    why = why_serial(model, method, keys)
    if why is not None:
        raise ValueError(why)
    G = len(jobs)
    model.load_trainable(global_state)
    params = model.parameters_by_key()
    for p in params.values():
        p.requires_grad_(False)
    method.on_local_start(model, global_state)  # depends on the global state only (the capability's contract)
    stacked = {k: params[k].detach().unsqueeze(0).repeat(G, *([1] * params[k].ndim)).requires_grad_(True)
               for k in keys}
    key_of = {id(params[k]): k for k in keys}
    groups = [{**g, "params": [stacked[key_of[id(p)]] for p in g["params"]]} for g in method.param_groups(model, keys)]
    opt = make_optimizer(groups, cfg)
    shared = {k: v for k, v in params.items() if k not in stacked}

    all_lengths = getattr(split.inputs, "lengths", None) if cfg.group_by_length else None
    streams = []
    for job in jobs:
        idx = torch.as_tensor(job.indices, dtype=torch.long)
        lengths = None if all_lengths is None else all_lengths[idx]
        streams.append(_Stream(job, idx, torch.as_tensor(job.targets, dtype=torch.long), lengths,
                               batches(len(idx), cfg.batch_size, job.generator, lengths),
                               total=torch.zeros((), device=device)))
    drop = [None if j.class_mask is None else ~j.class_mask.to(device) for j in jobs]
    states: list[dict[str, torch.Tensor]] = [{} for _ in jobs]

    def advance(st: _Stream) -> torch.Tensor | None:
        """The client's next batch (its next epoch's first when an epoch ends), None when it is done."""
        while True:
            try:
                return next(st.it)
            except StopIteration:
                st.epoch += 1
                if st.epoch >= cfg.local_epochs:
                    return None
                st.it = batches(len(st.idx), cfg.batch_size, st.job.generator, st.lengths)

    def finish(g: int) -> None:  # before the next step moves the client's slice again
        states[g] = {k: stacked[k][g].detach().clone() for k in keys}

    model.train()
    for g, st in enumerate(streams):
        st.pending = advance(st)
        if st.pending is None:
            finish(g)
    try:
        while True:
            active = [g for g, st in enumerate(streams) if st.pending is not None]
            if not active:
                break
            xs, ys = [], []
            for g in active:  # the same transform calls, with the same generator, as the serial path
                st = streams[g]
                b = st.pending
                xs.append(transform(to_device(split.inputs[st.idx[b]], device), train=True,
                                    generator=st.job.generator))
                ys.append(to_device(st.targets[b], device))
            opt.zero_grad(set_to_none=True)
            for part in length_buckets(xs):  # text: clients of similar lengths together, one pass each
                slots = [active[i] for i in part]
                x, rows = combine_batches([xs[i] for i in part])
                if len(slots) == G:
                    tensors = stacked
                else:
                    sel = to_device(torch.as_tensor(slots, dtype=torch.long), device)
                    tensors = {k: v.index_select(0, sel) for k, v in stacked.items()}
                with grouped_modules(model, tensors), autocast(device, cfg.precision):
                    logits = method.forward(model, x)
                logits = logits.float().reshape(len(slots), rows, -1)
                loss = None
                for j, (i, g) in enumerate(zip(part, slots, strict=True)):
                    lg = logits[j, :len(ys[i])]
                    if drop[g] is not None:
                        lg = lg.masked_fill(drop[g], float("-inf"))
                    lk = method.loss(lg, ys[i], model=ClientView(model, stacked, g, shared))  # type: ignore[arg-type]
                    st = streams[g]
                    assert st.total is not None
                    st.total += lk.detach()
                    st.steps += 1
                    loss = lk if loss is None else loss + lk
                assert loss is not None
                loss.backward()  # the clients' gradients land in their own slices (accumulated over the parts)
            opt.step()
            for g in active:
                st = streams[g]
                st.pending = advance(st)
                if st.pending is None:
                    finish(g)
    finally:
        wanted = set(keys)
        for k, p in params.items():
            p.requires_grad_(k in wanted)  # as local_train leaves the model
    return states, [st.total for st in streams], [st.steps for st in streams]  # type: ignore[misc]
