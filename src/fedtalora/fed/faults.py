"""Injected client failures (``faults.*``), for tests and robustness studies.

Each sampled client of round ``r`` of task ``t`` draws its fate from its own generator
``numpy_rng(seed, "faults", t, r, k)``, so the faults of one client never shift the draws of another,
of another round, or of training itself:

* with probability ``faults.client_dropout`` it fails mid-round: it received the global model but
  returns nothing;
* otherwise, with probability ``faults.corrupt_update`` its update is corrupted on the way to the
  server (``faults.corrupt_kind``): NaN in one element of one tensor, one tensor with an extra row,
  or the whole update scaled by :data:`SCALE` around the global state.

The server's screening (:mod:`fedtalora.core.validation`) must catch the corrupted updates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..config import FaultsConfig
from ..seeding import numpy_rng

SCALE = 1000.0
"""Factor of a ``scale`` corruption: ``global + SCALE * (update - global)``."""


@dataclass(frozen=True)
class Fault:
    """What happens to one sampled client in one round."""

    dropped: bool = False
    corrupted: bool = False
    rng: np.random.Generator | None = None
    """The client's fault generator, positioned after the two fate draws (used by :func:`corrupt`)."""


def draw_fault(cfg: FaultsConfig, seed: int, task: int, round_: int, client: int) -> Fault:
    """The fate of ``client`` in round ``round_`` of ``task`` (no fault when all probabilities are 0)."""
    if cfg.client_dropout <= 0 and cfg.corrupt_update <= 0:
        return Fault()
    rng = numpy_rng(seed, "faults", task, round_, client)
    u_drop, u_corrupt = rng.random(2)
    dropped = bool(u_drop < cfg.client_dropout)
    corrupted = not dropped and bool(u_corrupt < cfg.corrupt_update)
    return Fault(dropped=dropped, corrupted=corrupted, rng=rng)


def corrupt(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], kind: str,
            rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A corrupted copy of ``state`` (``state`` itself is not modified).

    Args:
        state: the client's trained tensors.
        reference: the global state it started from (the centre of a ``scale`` corruption).
        kind: ``nan``, ``shape`` or ``scale``.
        rng: the client's fault generator (chooses the tensor and element).
    """
    out = {k: v.clone() for k, v in state.items()}
    keys = sorted(out)
    key = keys[int(rng.integers(len(keys)))]
    if kind == "nan":
        flat = out[key].view(-1)
        flat[int(rng.integers(flat.numel()))] = float("nan")
    elif kind == "shape":
        t = out[key]
        out[key] = torch.cat([t, torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=t.device)], dim=0)
    elif kind == "scale":
        out = {k: reference[k].to(v.device) + SCALE * (v - reference[k].to(v.device)) for k, v in out.items()}
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return out
