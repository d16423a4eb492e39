"""One client's local round, and batched evaluation, on the single shared model.

A client holds no model: before training, the global trainable state is loaded into the shared
:class:`~fedtalora.model.FedModel`; afterwards the trained state is read back out. The frozen base is
the global one (all clients of a round start from the same base), so this is exactly a fresh copy of
the global model per client, without the copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Split
from ..methods import Method
from ..model import FedModel

Transform = Callable[..., torch.Tensor]


@dataclass
class ClientResult:
    """What one client returns after local training."""

    client: int
    state: dict[str, torch.Tensor]
    """Trained tensors (the keys of :meth:`Method.trainable_keys`), on the CPU."""
    num_samples: int
    loss: float
    """Mean training loss over all local steps."""
    steps: int
    report: dict[str, Any] = field(default_factory=dict)
    """The method's :meth:`~fedtalora.methods.Method.client_report` of the round (JSON-able)."""


@dataclass
class ClientJob:
    """One client's local round, as the engine hands it to the trainer (serial or parallel)."""

    client: int
    indices: np.ndarray
    """Positions of the client's samples of the task in the training split."""
    targets: np.ndarray
    """Their head-output labels."""
    class_mask: torch.Tensor | None
    """Bool ``(num_classes,)``: logits where it is False are excluded from the loss (None: all take part)."""
    generator: torch.Generator
    """CPU generator of the client's shuffling and augmentation (derived from ``(seed, task, round, client)``)."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast of the forward pass on ``device`` (``precision="bf16"``), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Any, device: torch.device) -> Any:
    """A host batch (tensor or :class:`~fedtalora.data.transforms.Tokens`) on ``device``.

    For a GPU the batch is first put in page-locked memory, so the copy is asynchronous
    (``non_blocking``): from pageable memory the copy would wait for the GPU's queue, a host-device
    synchronisation per batch.
    """
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def batches(n: int, batch_size: int, generator: torch.Generator,
             lengths: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Shuffled mini-batches of ``range(n)``; with ``lengths``, grouped by length (see
    ``train.group_by_length``): every window of 50 batches is sorted by length, then the batches of all
    windows are shuffled."""
    perm = torch.randperm(n, generator=generator)
    if lengths is None:
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]
        return
    window = 50 * batch_size
    groups: list[torch.Tensor] = []
    for w in range(0, n, window):
        chunk = perm[w:w + window]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        groups.extend(chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size))
    for i in torch.randperm(len(groups), generator=generator).tolist():
        yield groups[i]


def local_train(
    model: FedModel,
    method: Method,
    global_state: dict[str, torch.Tensor],
    *,
    client: int,
    split: Split,
    indices: np.ndarray,
    targets: np.ndarray,
    class_mask: torch.Tensor | None,
    transform: Transform,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    frozen: set[str] | frozenset[str] = frozenset(),
) -> ClientResult:
    """Train the method's tensors on one client's data, starting from ``global_state``.

    Args:
        indices: positions of the client's samples in ``split``.
        targets: their head-output labels (positions in the scenario's class order).
        class_mask: bool ``(num_classes,)``; logits where it is False are excluded from the loss.
        generator: CPU generator for shuffling and augmentation (derived from the root seed).
        frozen: keys of ``global_state`` not trained this round (returned unchanged), e.g. LoRA after the
            first task with ``lora.train_tasks=first``.
    """
    model.load_trainable(global_state)
    keys = list(global_state)
    params = model.parameters_by_key()
    wanted = set(keys) - set(frozen)
    for k, p in params.items():
        p.requires_grad_(k in wanted)
    method.on_local_start(model, global_state)
    opt = make_optimizer(method.param_groups(model, [k for k in keys if k in wanted]), cfg)
    idx = torch.as_tensor(indices, dtype=torch.long)
    lengths = getattr(split.inputs, "lengths", None) if cfg.group_by_length else None
    total, steps = train_steps(
        model, method, opt, split.inputs, idx, torch.as_tensor(targets, dtype=torch.long), class_mask,
        transform=transform, cfg=cfg, generator=generator, device=device,
        lengths=None if lengths is None else lengths[idx],
    )
    state = {k: params[k].detach().to("cpu", copy=True) for k in keys}
    return ClientResult(client=client, state=state, num_samples=len(indices),
                        loss=float(total) / max(steps, 1), steps=steps)  # the round's one read-back


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimiser (``train.optimizer``), created afresh for every client round."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_steps(
    model: FedModel,
    method: Method,
    opt: torch.optim.Optimizer,
    inputs: Any,
    idx: torch.Tensor,
    targets: torch.Tensor,
    class_mask: torch.Tensor | None,
    *,
    transform: Transform,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The inner loop of :func:`local_train`: ``cfg.local_epochs`` epochs of mini-batch steps over
    ``inputs[idx]`` (host data, labels ``targets`` aligned with ``idx``).

    Nothing in here reads a value back from ``device``: batches go up asynchronously (:func:`to_device`)
    and the loss is summed on the device, so a GPU never waits for the host between steps.

    Returns:
        ``(sum of the step losses as a 0-d tensor on device, number of steps)``.
    """
    drop = None if class_mask is None else ~class_mask.to(device)
    model.train()
    total = torch.zeros((), device=device)
    steps = 0
    for _ in range(cfg.local_epochs):
        for b in batches(len(idx), cfg.batch_size, generator, lengths):
            x = transform(to_device(inputs[idx[b]], device), train=True, generator=generator)
            y = to_device(targets[b], device)
            with autocast(device, cfg.precision):
                logits = method.forward(model, x)
            logits = logits.float()
            if drop is not None:
                logits = logits.masked_fill(drop, float("-inf"))
            loss = method.local_loss(model, x, logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
    return total, steps


@torch.inference_mode()
def predict(
    model: FedModel,
    split: Split,
    indices: np.ndarray,
    *,
    num_seen: int,
    transform: Transform,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    scores: Callable[[Any], torch.Tensor] | None = None,
) -> np.ndarray:
    """Arg-max over the first ``num_seen`` outputs (all classes seen so far, no task id) of the model's
    head, or of ``scores(x)`` when given (the classifier's evaluation scores, e.g. prototype similarities)."""
    forward = model if scores is None else scores
    out = _evaluate(lambda x: forward(x)[:, :num_seen].argmax(dim=1), model, split, indices, transform=transform,
                    batch_size=batch_size, device=device, precision=precision)
    return np.zeros(0, dtype=np.int64) if out is None else out.numpy()


@torch.no_grad()
def extract_features(
    model: FedModel,
    split: Split,
    indices: np.ndarray,
    *,
    transform: Transform,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """The backbone's pooled features (:meth:`FedModel.features`, eval mode) of ``split[indices]``:
    float32 ``(len(indices), num_features)`` on the CPU, in the order of ``indices``."""
    out = _evaluate(lambda x: model.features(x).float(), model, split, indices, transform=transform,
                    batch_size=batch_size, device=device, precision=precision)
    return torch.zeros(0, model.spec.num_features) if out is None else out


def _evaluate(fn: Callable[[torch.Tensor], torch.Tensor], model: FedModel, split: Split, indices: np.ndarray, *,
              transform: Transform, batch_size: int, device: torch.device, precision: str) -> torch.Tensor | None:
    """``fn`` over batches of ``split[indices]`` in eval mode, concatenated on the CPU in the order of
    ``indices`` (None when there are none)."""
    model.eval()
    outs: list[torch.Tensor] = []
    idx = torch.as_tensor(indices, dtype=torch.long)
    lengths = getattr(split.inputs, "lengths", None)
    order = None
    if lengths is not None and len(idx):  # text: batch similar lengths together (less padding)
        order = torch.argsort(lengths[idx], stable=True)
        idx = idx[order]
    for start in range(0, len(idx), batch_size):
        x = transform(to_device(split.inputs[idx[start:start + batch_size]], device), train=False)
        with autocast(device, precision):
            outs.append(fn(x))
    if not outs:
        return None
    out = torch.cat(outs).cpu()
    if order is not None:
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out


def accuracy_per_task(preds: np.ndarray, targets: np.ndarray, task_of: np.ndarray,
                      num_tasks_seen: int) -> list[float]:
    """Top-1 accuracy on each task's test samples (``task_of`` gives the task of each sample)."""
    out = []
    for t in range(num_tasks_seen):
        sel = task_of == t
        out.append(float((preds[sel] == targets[sel]).mean()) if sel.any() else 0.0)
    return out

