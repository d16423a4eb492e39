"""Communication accounting: what travels up and down each round, in bytes.

Uplink is each sampled client's trainable state. Downlink is the global trainable state plus the
part of the frozen base a client does not have yet: the residuals of every round since it last
participated. Per adapted layer it receives whichever is smaller, the factors of the residuals it
missed or the dense state of the base. With the exact base (:mod:`fedtalora.core.exact`, every method that
changes the base) the factors of a round are the live clients' own factors and weights
(:class:`~fedtalora.core.aggregation.ResidualFactors`: ``4 (d_out + d_in) K' r + 8 K'`` bytes) and the dense
state is the float64 accumulator ``D`` (``8 d_out d_in`` bytes); without it, ``(L, R)`` of inner dimension
``(K' - 1) r`` and the float32 base (``4 d_out d_in``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .aggregation import ResidualFactors


def dense_catch_up_nbytes(shape: tuple[int, ...] | torch.Size, *, exact: bool) -> int:
    """Bytes of one layer's dense catch-up: the float64 accumulator ``D`` with the exact base, else the
    float32 base weight."""
    return math.prod(shape) * (8 if exact else 4)


def factored_nbytes(factors: ResidualFactors | tuple[torch.Tensor, torch.Tensor]) -> int:
    """Bytes of one round's residual factors of one layer, as they travel."""
    if isinstance(factors, ResidualFactors):
        return factors.nbytes
    return sum(t.numel() * t.element_size() for t in factors)


class DownlinkLedger:
    """Cumulative per-layer residual sizes, and each client's last synchronised round."""

    def __init__(self, dense_bytes: Mapping[str, int]) -> None:
        self.dense = dict(dense_bytes)
        self.cumulative: dict[str, list[int]] = {k: [0] for k in self.dense}
        self.last_sync: dict[int, int] = {}

    @property
    def rounds(self) -> int:
        """Residual rounds recorded so far."""
        return len(next(iter(self.cumulative.values()), [0])) - 1

    def record_round(self, factored_bytes: Mapping[str, int]) -> None:
        """Record one round's residual (per layer, the bytes of its factors; 0 when there is none)."""
        for k, cum in self.cumulative.items():
            cum.append(cum[-1] + int(factored_bytes.get(k, 0)))

    def catch_up_bytes(self, client: int, encoding: str = "best") -> int:
        """Bytes to bring ``client`` up to the current base.

        Args:
            encoding: per layer with a missed residual, ``best`` the smaller of the missed factors and the
                dense accumulated delta (what the engine sends), ``dense`` always the dense delta,
                ``factored`` always the factors.
        """
        if encoding not in ("best", "dense", "factored"):
            raise ValueError(f"encoding must be best, dense or factored, got {encoding!r}")
        since = self.last_sync.get(client, 0)
        total = 0
        for k, cum in self.cumulative.items():
            missed = cum[-1] - cum[since]
            if missed:
                total += {"best": min(missed, self.dense[k]), "dense": self.dense[k], "factored": missed}[encoding]
        return total

    def sync(self, client: int) -> None:
        self.last_sync[client] = self.rounds

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (for checkpoints)."""
        return {"dense": dict(self.dense), "cumulative": {k: list(v) for k, v in self.cumulative.items()},
                "last_sync": {str(k): v for k, v in self.last_sync.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the layers must be the same."""
        if set(state["dense"]) != set(self.dense) or set(state["cumulative"]) != set(self.dense):
            raise ValueError("ledger state is for other layers")
        self.dense = {k: int(v) for k, v in state["dense"].items()}
        self.cumulative = {k: [int(x) for x in v] for k, v in state["cumulative"].items()}
        self.last_sync = {int(k): int(v) for k, v in state["last_sync"].items()}
