"""``fedtalora``: the paper's method, and the defaults of every hook.

Follows Fed-TaLoRA (Yu, Hu, Min; arXiv 2505.12318): one shared task-agnostic LoRA (peft) on the frozen
backbone plus a linear head, trained by every client on its data of the current task; the server takes
the sample-weighted FedAvg of A, B and the head and folds the exact residual
``s (sum_k p_k B_k A_k - Bbar Abar)`` into the frozen base every round (``fed.residual``, on by default),
so the global model is the exact weighted average of the clients' models.

Departures: the paper's body was not available; the residual accumulates into the running base, weights
are sample counts, and old-class logits are masked out of the local loss (``train.logit_mask``) -- the
decisions where the paper is silent are listed in ``docs/design.md`` §4.
"""

from __future__ import annotations

from .base import METHODS, Method


@METHODS.register("fedtalora")
class FedTaLoRA(Method):
    """Shared task-agnostic LoRA + head, FedAvg + exact residual (the base class's defaults)."""

    name = "fedtalora"
    summary = "shared task-agnostic LoRA + head, exact residual aggregation (fed.residual)"
