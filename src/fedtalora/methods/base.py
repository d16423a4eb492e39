"""Methods plug into the single task x round loop (:mod:`fedtalora.engine`) through small hooks.

A method says only what differs: which tensors train and travel (:meth:`Method.trainable_keys`),
their optimiser groups, the local loss, how the server aggregates and how the result is applied to
the global model. The loop, data, partitions, evaluation and metrics are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .aggregation import Aggregate, aggregate_lora
from .registry import Registry

if TYPE_CHECKING:
    from .config import RunConfig
    from .model import FedModel


class Method:
    """Base hooks. The defaults implement Fed-TaLoRA; subclasses override what differs."""

    name = "base"
    summary = ""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def trainable_keys(self, model: FedModel) -> list[str]:
        """Keys (in :meth:`FedModel.parameters_by_key`) that clients train and send."""
        return list(model.lora_parameters()) + list(model.head_parameters())

    def param_groups(self, model: FedModel, keys: Sequence[str]) -> list[dict[str, Any]]:
        """Optimiser groups: LoRA at ``train.lr``, the head at ``train.head_lr``."""
        params = model.parameters_by_key()
        lora = [params[k] for k in keys if not k.startswith("head.")]
        head = [params[k] for k in keys if k.startswith("head.")]
        groups = []
        if lora:
            groups.append({"params": lora, "lr": self.cfg.train.lr})
        if head:
            groups.append({"params": head, "lr": self.cfg.train.head_lr})
        return groups

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The local objective on one batch of (already masked) logits."""
        return F.cross_entropy(logits, targets)

    def aggregate(self, model: FedModel, updates: Sequence[dict[str, torch.Tensor]],
                  weights: torch.Tensor) -> Aggregate:
        """Server aggregation of the clients' trainable states."""
        return aggregate_lora(updates, weights, model.lora_pairs(), residual=self.cfg.fed.residual)

    def apply(self, model: FedModel, agg: Aggregate) -> None:
        """Make ``agg`` the new global model: load the averaged state, fold residuals into the base."""
        model.load_trainable(agg.state)
        model.add_to_base(agg.residuals)


METHODS: Registry[type[Method]] = Registry("method")


@METHODS.register("fedtalora")
class FedTaLoRA(Method):
    """Fed-TaLoRA (Yu, Hu, Min; arXiv 2505.12318): one shared task-agnostic LoRA + linear head,
    sample-weighted FedAvg of A, B and head, and the exact residual ``s (sum p_k B_k A_k - Bbar Abar)``
    folded into the frozen base every round (``fed.residual``, on by default; off = naive averaging).
    """

    name = "fedtalora"
    summary = "shared task-agnostic LoRA + head, exact residual aggregation (fed.residual)"


for _name, _note in {
    "fedlora": "naive averaging of shared LoRA, FedIT-style",
    "ffa-lora": "A frozen at init, only B trained",
    "fedprox": "fedtalora + proximal term",
    "finetune": "full fine-tuning with FedAvg",
    "head-only": "frozen backbone, linear head only",
    "pilora": "PILoRA (ECCV 2024)",
    "prompt": "prompt pool (L2P/CODA-Prompt as in Fed-CPrompt)",
    "target": "TARGET (ICCV 2023)",
    "lander": "LANDER (CVPR 2024)",
    "glfc": "GLFC (CVPR 2022), exemplar memory",
}.items():
    METHODS.plan(_name, _note)
