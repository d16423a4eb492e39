"""``finetune``: full fine-tuning of the backbone and the head, FedAvg of everything (the expensive reference).

Every backbone parameter (embeddings, attention, MLPs, norms -- the adapted layers' base weights
included) and the head train locally and travel both ways; the server takes the sample-weighted
FedAvg (McMahan et al., AISTATS 2017). This is the "Finetune" row of FCIL tables (TARGET, LANDER): no
mechanism against forgetting beyond the task-masked loss, and the full model's traffic.

Memory: the server never holds the ``K`` client copies of the model. Each accepted update is folded
into a running float64 sum ``sum_k n_k w_k`` (and ``sum_k n_k``) as it arrives and then dropped, so the
server's extra memory is one float64 copy of the trainable tensors whatever the number of clients.

Departures: the LoRA layers exist (the model is built the same way for every method) but stay at
``B = 0`` and never travel, so they do nothing. ``train.lr`` is the backbone's rate, ``train.head_lr``
the head's. The run's ``final_model.safetensors`` holds every fine-tuned backbone tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.aggregation import Aggregate
from ..errors import AggregationError
from .base import METHODS, Method, UpdateBuffer

if TYPE_CHECKING:
    from ..model import FedModel


class RunningMean(UpdateBuffer):
    """``sum_k c_k w_k`` and ``sum_k c_k`` in float64, accumulated update by update (nothing else kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def add(self, state: dict[str, torch.Tensor], count: float) -> None:
        if not self.counts:
            self.sums = {k: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for k, t in state.items()}
            self.dtypes = {k: t.dtype for k, t in state.items()}
        elif set(state) != set(self.sums):
            raise AggregationError(f"update {len(self.counts)} has different keys than the first")
        for k, t in state.items():
            if t.shape != self.sums[k].shape or t.dtype != self.dtypes[k]:
                raise AggregationError(f"update {len(self.counts)}: {k} is {tuple(t.shape)} {t.dtype}, expected "
                                       f"{tuple(self.sums[k].shape)} {self.dtypes[k]}")
        if not math.isfinite(count) or count < 0:
            raise AggregationError(f"aggregation weight must be finite and >= 0, got {count}")
        for k, t in state.items():
            self.sums[k].add_(t.to(torch.float64), alpha=float(count))
        self.counts.append(float(count))

    def mean(self) -> dict[str, torch.Tensor]:
        """``sum_k c_k w_k / sum_k c_k`` in each tensor's dtype."""
        total = sum(self.counts)
        if not self.counts or total <= 0:
            raise AggregationError("cannot aggregate zero client updates")
        return {k: (s / total).to(self.dtypes[k]) for k, s in self.sums.items()}


@METHODS.register("finetune")
class Finetune(Method):
    """Train and FedAvg the whole backbone and the head."""

    name = "finetune"
    summary = "full fine-tuning of backbone + head, FedAvg of everything (streamed on the server)"
    folds_residual = False  # the LoRA layers stay at B = 0; the backbone trains and travels

    def attach(self, model: FedModel) -> None:
        model.add_trainable({f"backbone.{n}": p for n, p in model.backbone.named_parameters()
                             if ".lora_A." not in n and ".lora_B." not in n})

    def trainable_keys(self, model: FedModel) -> list[str]:
        return model.extra_keys() + list(model.head_parameters())

    def new_buffer(self) -> UpdateBuffer:
        return RunningMean()

    def aggregate_buffer(self, model: FedModel, buffer: UpdateBuffer) -> Aggregate:
        if not isinstance(buffer, RunningMean):
            return super().aggregate_buffer(model, buffer)
        return Aggregate(state=buffer.mean(), residuals={}, errors={}, residual_ranks={})

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        buf = RunningMean()
        for u, w in zip(updates, weights.tolist(), strict=True):
            buf.add(dict(u), w)
        return Aggregate(state=buf.mean(), residuals={}, errors={}, residual_ranks={})
