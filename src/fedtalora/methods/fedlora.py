"""``fedlora``: one shared LoRA averaged naively, FedIT-style (the inexact aggregation Fed-TaLoRA fixes).

Follows FedIT (Zhang et al., "Towards building the federated GPT: federated instruction tuning",
ICASSP 2024) as reimplemented in FedEx-LoRA's ``aggregate_models_normal``: A, B and the head are each
averaged, so the global update is ``s Bbar Abar`` rather than the average ``s sum_k p_k B_k A_k`` of the
clients' updates. Everything else (placement, head, loss, sample weights) is Fed-TaLoRA's, so the
difference to ``fedtalora`` is exactly the residual.

Departures: ``fed.residual`` is ignored (always off); the averages are sample-weighted (FedEx-LoRA's
reference code uses uniform means; ``fed.weighting=uniform`` gives those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.aggregation import Aggregate, aggregate_lora
from .base import METHODS, Method

if TYPE_CHECKING:
    from ..model import FedModel


@METHODS.register("fedlora")
class FedLoRA(Method):
    """Fed-TaLoRA without the residual, whatever ``fed.residual`` says."""

    name = "fedlora"
    summary = "shared LoRA + head, naive FedAvg of A and B (FedIT-style, no residual)"
    folds_residual = False  # naive FedAvg: fed.residual is ignored

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        return aggregate_lora(updates, weights, model.lora_pairs(), residual=False)
