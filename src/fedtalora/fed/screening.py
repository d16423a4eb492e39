"""Updates that screening lets through but that deserve a warning.

The server screens every update on arrival (:func:`fedtalora.core.validation.check_update`: keys, shapes,
dtypes, finite values, a positive sample count, and ``||update - global|| <= fed.max_update_norm`` when that
bound is set). The bound is off by default (``fed.max_update_norm=0``): an update a thousand times larger
than the global state is finite and well-shaped, so it is aggregated. :func:`warn_if_large` logs such an
update (relative change above :data:`~fedtalora.core.integrity.LARGE_UPDATE_RATIO`) so that it is seen, and
:func:`screening_summary` says in a run's summary what screening bounded and what it did not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from ..core.integrity import LARGE_UPDATE_RATIO, relative_update_norm
from .history import History

logger = logging.getLogger(__name__)

__all__ = ["LARGE_UPDATE_RATIO", "large_update_ratio", "screening_summary", "warn_if_large"]


def large_update_ratio(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                       max_norm: float) -> float | None:
    """``||update - global|| / ||global||`` when no norm bound is set (``max_norm <= 0``) and it exceeds
    :data:`LARGE_UPDATE_RATIO`; None otherwise (a bound is set and screening enforced it, the change is
    ordinary, or the global state is all zeros, where no ratio is defined)."""
    if max_norm > 0:
        return None
    ratio = relative_update_norm(update, global_state)
    return ratio if math.isfinite(ratio) and ratio > LARGE_UPDATE_RATIO else None


def warn_if_large(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], max_norm: float,
                  where: str, client: int) -> bool:
    """Log a warning (and return True) when :func:`large_update_ratio` flags ``client``'s accepted update."""
    ratio = large_update_ratio(update, global_state, max_norm)
    if ratio is None:
        return False
    logger.warning("%s the update of client %d changes the global state by %.3g times its norm; it is aggregated "
                   "because fed.max_update_norm=0 sets no bound (set one to reject such updates)", where, client, ratio)
    return True


def screening_summary(max_norm: float, history: History) -> str:
    """One line for a run's summary: what screening bounded, and how many accepted updates were flagged large."""
    large = sum(len(r.large_updates) for r in history.rounds)
    if max_norm > 0:
        return f"shapes, finite values, update norm <= {max_norm:g} (fed.max_update_norm)"
    note = f"; {large} accepted update(s) were over {LARGE_UPDATE_RATIO:g}x the global state" if large else ""
    return f"shapes and finite values only; update norms unbounded (fed.max_update_norm=0){note}"
