"""Finite or refused: one check for every tensor that enters a run from outside.

Weights loaded from ``model.checkpoint``, the tensors of a round checkpoint being resumed, a final
model being exported: a NaN or an infinity in any of them makes every later round produce non-finite
updates, which screening rejects, so the run "completes" with every round skipped and accuracy at
chance. Checking once, where the tensors enter, turns that into one line naming the first bad tensor.

Pure functions of tensors; no file access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["LARGE_UPDATE_RATIO", "first_nonfinite", "nonfinite_message", "relative_update_norm"]

LARGE_UPDATE_RATIO = 10.0
"""An update whose distance from the global state exceeds this many times the global state's own norm is
"an order of magnitude larger than the global state": the run warns about it when ``fed.max_update_norm=0``
leaves updates unbounded. Ordinary local training moves the state far less (measured on the tiny test runs of
every LoRA method and full fine-tuning: at most 0.26 times its norm per round); a ``scale`` fault multiplies
the distance by 1000, which crosses the threshold unless the round's ordinary change was below 1 %."""


def _bad_count(t: torch.Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()):
        return 0  # integer and bool tensors are always finite
    return int(t.numel() - torch.isfinite(t).sum().item())


def first_nonfinite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """``(name, count)`` of the first tensor (in the mapping's order) holding a NaN or an infinity,
    with how many of its elements are not finite; None when every element of every tensor is finite.

    Integer and bool tensors are finite by construction. Works on any device; the count is exact.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        n = _bad_count(t.detach())
        if n:
            return name, n
    return None


def nonfinite_message(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      source: str) -> str | None:
    """One line for an error naming ``source`` and its first non-finite tensor, or None if all are finite."""
    bad = first_nonfinite(tensors)
    if bad is None:
        return None
    name, n = bad
    return f"{source}: tensor {name!r} has {n} non-finite value(s) (NaN or infinity); refusing to use it"


def relative_update_norm(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> float:
    """``sqrt(sum_k ||update_k - global_k||^2) / sqrt(sum_k ||global_k||^2)`` over the keys of
    ``global_state``, in float64: how large a client's change is relative to the state it started from.

    ``inf`` when the global state is all zeros and the update is not; ``0.0`` when both are zero.
    The keys and shapes must agree (screening checks them first: :func:`fedtalora.core.validation.check_update`).
    """
    diff = 0.0
    base = 0.0
    for key, g in global_state.items():
        g64 = g.detach().to(torch.float64)
        diff += float(((update[key].detach().to(torch.float64) - g64) ** 2).sum())
        base += float((g64**2).sum())
    if base == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return (diff / base) ** 0.5
