"""``fedprox``: Fed-TaLoRA plus FedProx's proximal term on the trainable tensors.

Follows FedProx (Li et al., "Federated optimization in heterogeneous networks", MLSys 2020): each client
minimises ``loss + mu/2 * ||w - w_global||^2`` over the tensors it trains (here: LoRA A, B and the head,
``w_global`` the state it received), which limits client drift under non-IID data. Aggregation is
Fed-TaLoRA's, so ``fed.residual`` applies (``fed.residual=false`` gives FedIT + FedProx).

Departures: FedProx also tolerates partial local work (``gamma``-inexact solutions); every client here runs
its full ``train.local_epochs``. Option: ``method_options.mu`` (default 0.01, FedProx's grid is
{0.001, 0.01, 0.1, 1}); ``mu=0`` is exactly ``fedtalora``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .base import METHODS, MethodContext, check_option
from .fedtalora import FedTaLoRA

if TYPE_CHECKING:
    from ..model import FedModel


@dataclass
class FedProxOptions:
    mu: float = 0.01
    """Weight of the proximal term ``mu/2 ||w - w_global||^2``."""

    def validate(self) -> None:
        check_option(self.mu >= 0, "mu", self.mu, "a number >= 0")


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_key ||params[key] - anchor[key]||_F^2`` (differentiable in ``params``)."""
    total = None
    for k, a in anchor.items():
        d = (params[k] - a).pow(2).sum()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("proximal term over no tensors")
    return total


@METHODS.register("fedprox")
class FedProx(FedTaLoRA):
    """Fed-TaLoRA with ``mu/2 ||w - w_global||^2`` added to every local batch loss."""

    name = "fedprox"
    summary = "fedtalora + proximal term mu/2 ||w - w_global||^2 (options: mu)"
    Options = FedProxOptions

    def __init__(self, options: Any, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self._anchor: dict[str, torch.Tensor] = {}

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        device = next(iter(model.parameters_by_key().values())).device
        self._anchor = {k: v.detach().to(device) for k, v in global_state.items()}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: FedModel) -> torch.Tensor:
        params = model.parameters_by_key()
        prox = proximal_term({k: params[k] for k in self._anchor}, self._anchor)
        return F.cross_entropy(logits, targets) + 0.5 * self.options.mu * prox
