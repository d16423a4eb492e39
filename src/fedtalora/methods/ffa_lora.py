"""``ffa-lora``: A frozen at its (seeded) initialisation; only B and the head train and travel.

Follows FFA-LoRA (Sun et al., "Improving LoRA in privacy-preserving federated learning", ICLR 2024):
with every client sharing the same fixed A, averaging B is exact, ``sum_k p_k B_k A = Bbar A``, so no
residual is needed and the uplink halves. The per-layer aggregation error is still measured (it is
rounding only).

Departures: the paper freezes A at a random init with zero B like here, but targets language models with
DP-SGD; here the placement, head and loss are Fed-TaLoRA's and there is no differential privacy. A
never travels: clients regenerate it from the seed (``fed.residual`` is ignored: there is nothing to fold).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.aggregation import Aggregate, fedavg, relative_aggregation_error
from ..errors import AggregationError
from .base import METHODS, Method

if TYPE_CHECKING:
    from ..model import FedModel


@METHODS.register("ffa-lora")
class FFALoRA(Method):
    """Train and average B and the head; A stays at its initialisation."""

    name = "ffa-lora"
    summary = "A frozen at init, only B + head trained and averaged (exact by construction)"
    folds_residual = False  # exact by construction: nothing to fold

    def trainable_keys(self, model: FedModel) -> list[str]:
        return [p.b_key for p in model.lora_pairs()] + list(model.head_parameters())

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        state = fedavg(updates, weights)
        params = model.parameters_by_key()
        errors = {}
        for pair in model.lora_pairs():
            if pair.a_key in state or pair.b_key not in state:
                raise AggregationError(f"ffa-lora updates must hold {pair.b_key!r} and not {pair.a_key!r}")
            A = params[pair.a_key].detach().to("cpu")
            Bs = [u[pair.b_key] for u in updates]
            errors[pair.layer] = relative_aggregation_error(Bs, [A] * len(Bs), weights, pair.scaling,
                                                            state[pair.b_key], A, None)
        return Aggregate(state=state, residuals={}, errors=errors, residual_ranks={}, naive_errors=dict(errors))
