"""Shared pieces of the distillation baselines (``glfc``, ``target``, ``lander``).

* :class:`Snapshot` -- a frozen copy of a global model (the previous task's "old model", a generator's
  teacher): the tensors that change during federated training, i.e. the method's trainable tensors
  (LoRA, head, extras) and the adapted layers' base weights (which the residual updates). Its outputs
  come from the one shared model with these tensors substituted (:func:`torch.func.functional_call`), so
  no second backbone is ever built and the frozen weights are shared.
* The losses themselves are pure functions in :mod:`fedtalora.core.distill`.
* :class:`ServedClients` -- which clients already hold what the server sends once per task (so a
  method's :meth:`~fedtalora.methods.base.Method.downlink` counts it once per client and task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..model import FedModel

__all__ = ["ServedClients", "Snapshot", "parameter_names"]


def parameter_names(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: name in model.named_parameters()}`` for parameters given by any key (matched by identity)."""
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for key, t in tensors.items():
        if id(t) not in by_id:
            raise KeyError(f"{key} is not a parameter of the model")
        out[key] = by_id[id(t)]
    return out


class _Call(nn.Module):
    """``fn(model, *args)`` as a module, so that :func:`torch.func.functional_call` can substitute tensors."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.model, *args)


class Snapshot:
    """Frozen tensors of a global model, by parameter name (``named_parameters`` of the :class:`FedModel`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    @classmethod
    @torch.no_grad()
    def take(cls, model: FedModel, keys: Sequence[str]) -> Snapshot:
        """The model's tensors ``keys`` (of :meth:`FedModel.parameters_by_key`) and the adapted layers' base
        weights, copied to the CPU."""
        params = model.parameters_by_key()
        wanted = {k: params[k] for k in keys}
        wanted.update({f"base:{p.layer}": model.base_weight(p.layer) for p in model.lora_pairs()})
        names = parameter_names(model, wanted)
        return cls({names[k]: t.detach().to("cpu", copy=True) for k, t in wanted.items()})

    def to(self, device: torch.device | str) -> Snapshot:
        return Snapshot({n: t.to(device) for n, t in self.tensors.items()})

    def nbytes(self) -> int:
        """What sending it costs: every tensor, dense."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def call(self, model: FedModel, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` with the snapshot's tensors in place of the model's, in eval mode and without
        gradient (the model's own tensors and mode are untouched)."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(_Call(model, fn), {f"model.{n}": t for n, t in self.tensors.items()},
                                                  args, strict=False)
        finally:
            model.train(was)

    def logits(self, model: FedModel, x: Any) -> torch.Tensor:
        """The snapshot's logits over all classes for a batch of real inputs."""
        return self.call(model, lambda m, inp: m(inp), x)

    # checkpoints
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{n}": t.contiguous() for n, t in self.tensors.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str) -> Snapshot | None:
        tensors = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
        return cls(tensors) if tensors else None

    def check(self, model: FedModel) -> None:
        """Raise :class:`CheckpointError` unless every tensor names a parameter of ``model`` of the same shape."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for n, t in self.tensors.items():
            if n not in params or params[n].shape != t.shape:
                raise CheckpointError(f"snapshot tensor {n} does not fit the model")


class ServedClients:
    """Per task, the clients that already received what is sent once per task."""

    def __init__(self) -> None:
        self.task = -1
        self.clients: set[int] = set()

    def first_time(self, task: int, client: int) -> bool:
        """Whether ``client`` gets it now (and remember that it has it)."""
        if task != self.task:
            self.task, self.clients = task, set()
        if client in self.clients:
            return False
        self.clients.add(client)
        return True

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}task": torch.tensor([self.task], dtype=torch.int64),
                f"{prefix}clients": torch.tensor(sorted(self.clients), dtype=torch.int64)}

    def load(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        if f"{prefix}task" not in state:
            self.task, self.clients = -1, set()
            return
        self.task = int(state[f"{prefix}task"][0])
        self.clients = {int(c) for c in state[f"{prefix}clients"].tolist()}
