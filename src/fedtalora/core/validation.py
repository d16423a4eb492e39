"""Server-side screening of client updates before aggregation.

A client update is a state dict of trainable tensors plus a sample count. The server never trusts
it: before aggregation every update is checked against the global state the client started from,

1. the same keys (none missing, none extra),
2. every tensor with the expected shape and dtype,
3. every value finite (no NaN, no inf),
4. a positive, finite sample count,
5. optionally, ``||update - global||_2 <= max_norm`` over all tensors together,

and a failing update is rejected with a one-line reason. What the server then does (aggregate the
rest, or skip the round when fewer than ``fed.min_clients`` remain) is the loop's business
(:mod:`fedtalora.fed.loop`). Every function here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

StateDict = Mapping[str, torch.Tensor]


def update_norm(update: StateDict, reference: StateDict) -> float:
    """``sqrt(sum_key ||update[key] - reference[key]||_F^2)`` in float64 (keys and shapes must match)."""
    total = 0.0
    for key, ref in reference.items():
        diff = update[key].detach().to(torch.float64) - ref.detach().to(device=update[key].device,
                                                                        dtype=torch.float64)
        total += float(torch.sum(diff * diff))
    return math.sqrt(total)


def tensor_mismatch(got: Mapping[str, object], expected: StateDict, *, check_dtype: bool = True) -> str | None:
    """How ``got`` differs from ``expected`` in keys, tensor type, shapes (and dtypes), or None.

    The structural check shared by update screening, checkpoints and final-model loading.
    """
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        return f"missing tensors {_few(missing)}"
    if extra:
        return f"unexpected tensors {_few(extra)}"
    for key, ref in expected.items():
        t = got[key]
        if not isinstance(t, torch.Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if check_dtype and t.dtype != ref.dtype:
            return f"{key} has dtype {t.dtype}, expected {ref.dtype}"
    return None


def check_update(
    update: StateDict, num_samples: float, reference: StateDict, *, max_norm: float = 0.0,
) -> str | None:
    """Why ``update`` must be rejected, or None when it is valid.

    Args:
        update: the client's trained tensors.
        num_samples: the sample count it reports (its aggregation weight under ``fed.weighting=samples``).
        reference: the global state the client started from: the expected keys, shapes and dtypes.
        max_norm: bound on :func:`update_norm`; 0 (or less) disables it.

    Returns:
        A one-line reason naming the first problem found, or None.
    """
    reason = tensor_mismatch(update, reference)
    if reason is not None:
        return reason
    for key in reference:
        bad = int((~torch.isfinite(update[key])).sum())
        if bad:
            return f"{key} has {bad} non-finite values"
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or not math.isfinite(num_samples) \
            or num_samples <= 0:
        return f"num_samples={num_samples!r} is not a positive number"
    if max_norm > 0:
        norm = update_norm(update, reference)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds fed.max_update_norm={max_norm:g}"
    return None


@dataclass(frozen=True)
class Screening:
    """The outcome of screening one round's updates."""

    accepted: list[int]
    """Positions (in the input sequence) of the valid updates, in input order."""
    rejected: list[tuple[int, str]]
    """``(position, reason)`` of every rejected update, in input order."""


def screen_updates(
    updates: Sequence[StateDict], num_samples: Sequence[float], reference: StateDict, *, max_norm: float = 0.0,
) -> Screening:
    """Apply :func:`check_update` to each update of a round."""
    if len(updates) != len(num_samples):
        raise ValueError(f"{len(updates)} updates but {len(num_samples)} sample counts")
    accepted: list[int] = []
    rejected: list[tuple[int, str]] = []
    for i, (upd, n) in enumerate(zip(updates, num_samples, strict=True)):
        reason = check_update(upd, n, reference, max_norm=max_norm)
        if reason is None:
            accepted.append(i)
        else:
            rejected.append((i, reason))
    return Screening(accepted, rejected)


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
