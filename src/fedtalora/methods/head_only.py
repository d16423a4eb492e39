"""``head-only``: the frozen pre-trained backbone with only the linear head trained and averaged.

The cheapest reference (a federated linear probe trained class-incrementally): whatever LoRA adds over
it is what adaptation of the backbone buys. It follows no particular paper; it is the "frozen backbone"
row common to FCIL tables with pre-trained models (e.g. the linear-probe baselines of PILoRA and LoRM).

Departures: none to speak of; the LoRA layers exist but stay at ``B = 0`` (no effect) and never travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.aggregation import Aggregate, fedavg
from .base import METHODS, Method

if TYPE_CHECKING:
    from ..model import FedModel


@METHODS.register("head-only")
class HeadOnly(Method):
    """Train and FedAvg the head; nothing else changes."""

    name = "head-only"
    summary = "frozen backbone, only the linear head trained and averaged"
    folds_residual = False  # no LoRA

    def trainable_keys(self, model: FedModel) -> list[str]:
        return list(model.head_parameters())

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        return Aggregate(state=fedavg(updates, weights), residuals={}, errors={}, residual_ranks={})
