"""Class prototypes: exact federated class means of backbone features, and nearest-prototype prediction.

A client sends, once per task, the per-class sums of its features and its per-class counts; the server
adds them up. The global prototype of class ``c`` is then ``sum_k S_kc / sum_k n_kc`` -- exactly the
mean over every client's samples of that class, whatever the partition (no weighting to choose).

Pure functions of tensors; the engine decides when they are computed (``classifier.kind``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import AggregationError

__all__ = ["aggregate_class_sums", "class_sums", "nearest_prototype", "prototype_nbytes"]


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (float64, ``(C, D)``) and counts (int64, ``(C,)``) of ``features`` ``(N, D)`` for the
    classes ``offset .. offset + C - 1`` (row ``i`` is class ``offset + i``; other labels are left out)."""
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    rel = labels.to(device=features.device, dtype=torch.long) - offset
    keep = (rel >= 0) & (rel < num_classes)
    if not bool(keep.all()):
        features, rel = features[keep], rel[keep]
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, rel, features.to(torch.float64))
    counts = torch.bincount(rel, minlength=num_classes)
    return sums, counts


def aggregate_class_sums(sums: Sequence[torch.Tensor], counts: Sequence[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Global class means (``(C, D)``, NaN rows for classes nobody holds) and total counts."""
    if not sums or len(sums) != len(counts):
        raise AggregationError(f"need one counts vector per sums matrix, got {len(sums)} and {len(counts)}")
    shape = sums[0].shape
    for i, (s, n) in enumerate(zip(sums, counts, strict=True)):
        if s.shape != shape or n.shape != (shape[0],):
            raise AggregationError(f"client {i}: class sums {tuple(s.shape)} / counts {tuple(n.shape)} do not "
                                   f"match {tuple(shape)}")
        if not torch.isfinite(s).all() or (n < 0).any():
            raise AggregationError(f"client {i}: non-finite class sums or negative counts")
    total = torch.stack([s.to(torch.float64) for s in sums]).sum(0)
    n = torch.stack([c.to(torch.int64) for c in counts]).sum(0)
    means = total / n.clamp_min(1).unsqueeze(1).to(torch.float64)
    means[n == 0] = float("nan")
    return means, n


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Index of the closest prototype for each row of ``features`` (``cosine`` or ``euclidean``)."""
    p = prototypes.to(device=features.device, dtype=torch.float32)
    x = features.float()
    if metric == "cosine":
        scores = F.normalize(x, dim=1) @ F.normalize(p, dim=1).T
    elif metric == "euclidean":
        scores = -torch.cdist(x, p)
    else:
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    return scores.argmax(dim=1)


def prototype_nbytes(num_classes: int, dim: int, dtype_bytes: int = 4) -> int:
    """Bytes of one client's upload: class sums in ``dtype_bytes`` floats plus int64 counts."""
    return num_classes * dim * dtype_bytes + num_classes * 8
