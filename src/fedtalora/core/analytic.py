"""The analytic (ridge) classifier: exact federated sums of feature statistics and a closed-form solve.

A ridge-regression classifier on features ``phi`` (``(N, M)``) with one-hot targets ``Y`` (``(N, C)``) is

    W = (G + lam I)^-1 C,    G = sum_i phi_i phi_i^T  (M x M),    C = sum_i phi_i y_i^T  (M x C),

and predicts ``argmax_c (phi W)_c``. ``G`` and ``C`` are sums over samples, so the sums of the clients'
statistics *are* the statistics of the pooled data: summed over any partition of the samples into
clients and tasks, the federated, class-incremental solution equals the centralized, joint one (up to
float64 rounding of the sums). This is the idea of analytic federated learning (AFL, CVPR 2025) and of
RanPAC (NeurIPS 2023) in the federated setting.

Pieces, all pure functions of tensors:

* :func:`random_projection` / :func:`project` -- an optional fixed random ReLU expansion of the
  features to ``M`` dimensions (RanPAC): ``phi = relu(f R)`` with ``R ~ N(0, 1)`` of shape
  ``(D, M)``, drawn from the root seed, so every client and the server derive the same ``R`` without
  sending it. ``M = 0`` keeps the raw features.
* :func:`ridge_statistics` / :func:`sum_statistics` -- one client's ``(G, C, counts)`` in float64 for a
  range of head positions, and their exact sum.
* :func:`pack_symmetric` / :func:`unpack_symmetric` / :func:`encode_statistics` / :func:`decode_statistics` /
  :func:`statistics_nbytes` -- ``G`` is symmetric and travels as its upper triangle: ``M (M + 1) / 2``
  float64 numbers, plus ``M`` per class a client holds and a count and class index per such class.
* :func:`solve_ridge` -- ``(G + lam I) W = C`` by Cholesky in float64 (fallback below).
* :func:`select_ridge` -- ``ridge=auto``: lam by generalized cross-validation, from the sums alone.
* :func:`ridge_scores` -- scores over the classes, ``-inf`` for classes without any sample.

Choosing lam without test data (``ridge=auto``)
-----------------------------------------------
Generalized cross-validation (GCV; Golub, Heath and Wahba, 1979) estimates the leave-one-out squared
error of a ridge fit from the training statistics alone. With ``G = V diag(e) V^T``, ``Q = V^T C`` and
``q_i = ||Q_i||^2``, for every candidate lam::

    RSS(lam) = tr(Y^T Y) - sum_i q_i (e_i + 2 lam) / (e_i + lam)^2    (training squared error)
    df(lam)  = sum_i e_i / (e_i + lam)                                (effective parameters)
    GCV(lam) = n RSS(lam) / (n - df(lam))^2

where ``tr(Y^T Y) = n`` for one-hot targets (``n`` = the summed class counts). One eigendecomposition of
``G`` serves the whole grid. The criterion needs nothing beyond the sums the clients already send -- no
validation split, no raw feature leaves a client, no second message round, no extra uplink -- and, being
a function of the sums, it picks the same lam for every partition, so ``ridge=auto`` keeps the
"independent of the partition" property. The grid is relative, ``lam = s * tr(G) / M`` for ``s`` in
:data:`RIDGE_GRID`, so it follows the scale of the features and the number of samples.

Alternatives considered: a held-out split whose statistics ``G_val, C_val`` are sent as well gives the
validation squared error in closed form (``tr(Y_val^T Y_val) - 2 tr(W^T C_val) + tr(W^T G_val W)``) but
doubles the uplink and, split per client, makes lam depend on the partition; validation *accuracy*
reported by clients needs every candidate ``W`` sent down and, exemplar-free, cannot be re-evaluated on
the classes of earlier tasks. ``benchmarks/analytic_features.py`` compares the three criteria on
Banking77 (``benchmarks/results/analytic_features.md``). Limitations: GCV targets squared error, not
accuracy; it assumes exchangeable samples; and when LoRA was trained on the same samples, the features
are not independent of them (true of any split of the training data as well).

Numerics
--------
Sums and the solve are float64. ``G + lam I`` is positive definite for any ``lam > 0``; when Cholesky
still fails (``lam`` below the rounding of ``G``), the solve falls back to the eigendecomposition with
the (rounding-)negative eigenvalues of ``G`` clipped to 0 -- the exact solution for the nearest positive
semi-definite ``G`` -- and logs a warning. A ``lam`` that float64 cannot tell from 0 next to the largest
eigenvalue of ``G`` raises :class:`~fedtalora.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import AggregationError, ConfigError
from ..seeding import torch_generator

__all__ = [
    "RIDGE_GRID", "RidgeStatistics", "RidgeSelection", "decode_statistics", "encode_statistics", "gcv_curve",
    "pack_symmetric", "project",
    "random_projection", "ridge_scores", "ridge_statistics", "select_ridge", "solve_ridge", "statistics_nbytes",
    "sum_statistics", "unpack_symmetric",
]

log = logging.getLogger(__name__)

RIDGE_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 5))
"""Candidates of ``ridge=auto``, relative to the mean eigenvalue ``tr(G) / M``: 1e-6 .. 1e2, 2 per decade."""


# --- features -------------------------------------------------------------------------------------


def random_projection(in_dim: int, dim: int, seed: int) -> torch.Tensor | None:
    """The fixed ``(in_dim, dim)`` float64 Gaussian matrix of the ReLU expansion, from ``seed`` alone
    (None for ``dim = 0``: raw features). The same on every machine for the same arguments."""
    if in_dim < 1 or dim < 0:
        raise ConfigError(f"projection of {in_dim} features to {dim} dimensions is invalid: expected in_dim >= 1 "
                          f"and dim >= 0 (0: raw features)")
    if dim == 0:
        return None
    gen = torch_generator(seed, "classifier-projection", in_dim, dim)
    return torch.randn(in_dim, dim, generator=gen, dtype=torch.float64)


def project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """``relu(features @ projection)`` in float64 (``features`` in float64 when ``projection`` is None)."""
    x = features.to(torch.float64)
    if projection is None:
        return x
    if x.ndim != 2 or x.shape[1] != projection.shape[0]:
        raise ValueError(f"features (N, {projection.shape[0]}) expected, got {tuple(x.shape)}")
    return torch.relu(x @ projection.to(x.device))


# --- statistics -----------------------------------------------------------------------------------


@dataclass
class RidgeStatistics:
    """Sums over samples: ``gram`` ``(M, M)`` = sum phi phi^T, ``corr`` ``(M, C)`` = sum phi onehot(y)^T
    (float64) and ``counts`` ``(C,)`` (int64) of ``C`` consecutive head positions."""

    gram: torch.Tensor
    corr: torch.Tensor
    counts: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


def ridge_statistics(phi: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     offset: int = 0) -> RidgeStatistics:
    """``(G, C, counts)`` of the (already projected) features ``phi`` ``(N, M)`` for the head positions
    ``offset .. offset + num_classes - 1`` (column ``j`` of ``C`` is position ``offset + j``); samples of
    other labels are left out."""
    if phi.ndim != 2 or labels.ndim != 1 or len(phi) != len(labels):
        raise ValueError(f"features (N, M) and labels (N,) expected, got {tuple(phi.shape)} and {tuple(labels.shape)}")
    x = phi.to(torch.float64)
    rel = labels.to(device=x.device, dtype=torch.long) - offset
    keep = (rel >= 0) & (rel < num_classes)
    if not bool(keep.all()):
        x, rel = x[keep], rel[keep]
    onehot = torch.zeros(len(rel), num_classes, dtype=torch.float64, device=x.device)
    onehot[torch.arange(len(rel), device=x.device), rel] = 1.0
    return RidgeStatistics(gram=x.T @ x, corr=x.T @ onehot, counts=torch.bincount(rel, minlength=num_classes))


def sum_statistics(stats: Sequence[RidgeStatistics]) -> RidgeStatistics:
    """The exact sum of clients' statistics (shapes must agree; non-finite sums are rejected)."""
    if not stats:
        raise AggregationError("no ridge statistics to sum")
    m, c = stats[0].gram.shape[0], stats[0].corr.shape[1]
    for i, s in enumerate(stats):
        if s.gram.shape != (m, m) or s.corr.shape != (m, c) or s.counts.shape != (c,):
            raise AggregationError(f"client {i}: ridge statistics {tuple(s.gram.shape)} / {tuple(s.corr.shape)} / "
                                   f"{tuple(s.counts.shape)} do not match ({m}, {m}) / ({m}, {c}) / ({c},)")
        if not (torch.isfinite(s.gram).all() and torch.isfinite(s.corr).all()) or (s.counts < 0).any():
            raise AggregationError(f"client {i}: non-finite ridge statistics or negative counts")
    gram, corr, counts = (stats[0].gram.to(torch.float64).clone(), stats[0].corr.to(torch.float64).clone(),
                          stats[0].counts.to(torch.int64).clone())
    for s in stats[1:]:  # one at a time: no stack of K (M, M) matrices
        gram += s.gram
        corr += s.corr
        counts += s.counts
    return RidgeStatistics(gram=gram, corr=corr, counts=counts)


def pack_symmetric(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric ``(M, M)`` matrix, row by row: ``M (M + 1) / 2``."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a square matrix expected, got {tuple(gram.shape)}")
    i, j = torch.triu_indices(gram.shape[0], gram.shape[0], device=gram.device)
    return gram[i, j]


def unpack_symmetric(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``(dim, dim)`` matrix whose :func:`pack_symmetric` is ``packed``."""
    if packed.ndim != 1 or packed.numel() != dim * (dim + 1) // 2:
        raise ValueError(f"{dim * (dim + 1) // 2} packed entries expected for dim {dim}, got {tuple(packed.shape)}")
    i, j = torch.triu_indices(dim, dim, device=packed.device)
    out = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    out[i, j] = packed
    out[j, i] = packed
    return out


def statistics_nbytes(dim: int, classes_held: int, dtype_bytes: int = 8) -> int:
    """Bytes of one client's upload for one task (:func:`encode_statistics`): the upper triangle of ``G``
    and the ``C`` columns of the classes it holds (``dtype_bytes`` each, float64 by default), and per such
    class an int64 count and an int64 class index."""
    return (dim * (dim + 1) // 2 + dim * classes_held) * dtype_bytes + classes_held * 2 * 8


def encode_statistics(stats: RidgeStatistics) -> dict[str, torch.Tensor]:
    """What a client sends for its statistics of one task: ``gram`` (packed upper triangle), ``corr`` and
    ``counts`` of the classes it holds only, and ``classes`` (their positions among the task's classes).
    Its size is :func:`statistics_nbytes`."""
    held = torch.nonzero(stats.counts > 0).squeeze(1).to(torch.int64)
    return {"gram": pack_symmetric(stats.gram.to(torch.float64)), "corr": stats.corr[:, held].to(torch.float64),
            "counts": stats.counts[held].to(torch.int64), "classes": held.cpu()}


def decode_statistics(message: dict[str, torch.Tensor], num_classes: int) -> RidgeStatistics:
    """The :class:`RidgeStatistics` over ``num_classes`` task classes of an :func:`encode_statistics` message;
    :class:`~fedtalora.errors.AggregationError` for a malformed one (wrong keys, shapes, indices, non-finite)."""
    if set(message) != {"gram", "corr", "counts", "classes"}:
        raise AggregationError(f"ridge statistics need gram, corr, counts, classes; got {sorted(message)}")
    packed, corr, counts, classes = (message[k] for k in ("gram", "corr", "counts", "classes"))
    if corr.ndim != 2 or packed.ndim != 1 or counts.ndim != 1 or classes.ndim != 1:
        raise AggregationError("ridge statistics: gram (P,), corr (M, h), counts (h,), classes (h,) expected")
    m, h = corr.shape
    if packed.numel() != m * (m + 1) // 2 or counts.shape != (h,) or classes.shape != (h,):
        raise AggregationError(f"ridge statistics: shapes {tuple(packed.shape)} / {tuple(corr.shape)} / "
                               f"{tuple(counts.shape)} / {tuple(classes.shape)} do not agree")
    if classes.is_floating_point() or counts.is_floating_point():
        raise AggregationError("ridge statistics: counts and classes must be integers")
    cls = classes.to(torch.int64)
    if h and (int(cls.min()) < 0 or int(cls.max()) >= num_classes or len(set(cls.tolist())) != h):
        raise AggregationError(f"ridge statistics: class indices outside 0..{num_classes - 1} or repeated")
    if not (torch.isfinite(packed).all() and torch.isfinite(corr).all()) or bool((counts < 0).any()):
        raise AggregationError("ridge statistics: non-finite sums or negative counts")
    full_corr = torch.zeros(m, num_classes, dtype=torch.float64)
    full_counts = torch.zeros(num_classes, dtype=torch.int64)
    full_corr[:, cls] = corr.to(torch.float64).cpu()
    full_counts[cls] = counts.to(torch.int64).cpu()
    return RidgeStatistics(gram=unpack_symmetric(packed.to(torch.float64).cpu(), m), corr=full_corr,
                           counts=full_counts)


# --- solving --------------------------------------------------------------------------------------


def _check_ridge(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ConfigError(f"classifier.ridge={lam!r} is invalid: expected a number > 0 or auto")


def solve_ridge(gram: torch.Tensor, corr: torch.Tensor, lam: float) -> torch.Tensor:
    """``W`` ``(M, C)`` float64 solving ``(gram + lam I) W = corr`` (Cholesky; see the module notes)."""
    _check_ridge(lam)
    g, c = gram.to(torch.float64), corr.to(torch.float64)
    eye = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g + lam * eye)
    if int(info) == 0:
        return torch.cholesky_solve(c, chol)
    e, v = torch.linalg.eigh(g)
    top = float(e.max().clamp_min(0))
    if lam <= top * g.shape[0] * torch.finfo(torch.float64).eps:
        raise ConfigError(f"classifier.ridge={lam:g} is too small for these statistics: next to their largest "
                          f"eigenvalue {top:.3g} it is 0 in float64; use classifier.ridge >= "
                          f"{top * 1e-10:.3g} or classifier.ridge=auto")
    log.warning("ridge solve: G + %g I is not positive definite in float64 (rounding); solved with G's negative "
                "eigenvalues clipped to 0", lam)
    return v @ ((v.T @ c) / (e.clamp_min(0) + lam).unsqueeze(1))


def gcv_curve(gram: torch.Tensor, corr: torch.Tensor, num_samples: int, lambdas: Sequence[float], *,
              eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(RSS, df, GCV)`` (float64, one per ``lambdas``) of the ridge fit with one-hot targets of
    ``num_samples`` samples (module notes). ``eig``: ``torch.linalg.eigh(gram)`` if already computed."""
    e, v = torch.linalg.eigh(gram.to(torch.float64)) if eig is None else eig
    e = e.clamp_min(0)
    q = ((v.T @ corr.to(torch.float64)) ** 2).sum(1)
    lam = torch.tensor(list(lambdas), dtype=torch.float64, device=e.device).unsqueeze(1)  # (L, 1)
    d = e.unsqueeze(0) + lam  # (L, M)
    n = float(num_samples)
    rss = (n - (q * (e + 2 * lam) / d**2).sum(1)).clamp_min(0)
    df = (e / d).sum(1)
    gcv = n * rss / (n - df).clamp_min(1e-12) ** 2
    return rss, df, gcv


@dataclass(frozen=True)
class RidgeSelection:
    """What :func:`select_ridge` chose and why."""

    lam: float
    """The chosen lambda (absolute)."""
    scale: float
    """``tr(G) / M``: candidates are ``s * scale`` for ``s`` in the grid."""
    relative: float
    """The chosen ``s``."""
    gcv: tuple[float, ...]
    """GCV of every candidate, in grid order."""


def select_ridge(stats: RidgeStatistics, grid: Sequence[float] = RIDGE_GRID, *,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> RidgeSelection:
    """``ridge=auto``: the lambda of ``grid`` (relative to ``tr(G) / M``) with the smallest GCV. Ties go
    to the larger lambda; a choice at either end of the grid is logged. ``eig`` as in :func:`gcv_curve`."""
    if stats.num_samples < 1:
        raise AggregationError("no samples: cannot choose the ridge lambda")
    scale = float(torch.diagonal(stats.gram).sum()) / stats.dim
    if not scale > 0:
        raise AggregationError("the features are all zero: cannot choose the ridge lambda")
    rel = sorted(float(s) for s in grid)
    _, _, gcv = gcv_curve(stats.gram, stats.corr, stats.num_samples, [s * scale for s in rel], eig=eig)
    best = int(len(rel) - 1 - torch.argmin(gcv.flip(0)))  # the last minimum: the larger lambda on ties
    if best in (0, len(rel) - 1) and len(rel) > 1:
        log.info("ridge=auto chose lambda = %g x tr(G)/M, the %s end of the grid", rel[best],
                 "lower" if best == 0 else "upper")
    return RidgeSelection(lam=rel[best] * scale, scale=scale, relative=rel[best],
                          gcv=tuple(float(x) for x in gcv))


def ridge_scores(phi: torch.Tensor, weights: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``phi @ W`` (float64) with ``-inf`` in the columns of classes not ``known`` (no sample yet)."""
    scores = phi.to(torch.float64) @ weights.to(device=phi.device, dtype=torch.float64)
    return scores.masked_fill(~known.to(scores.device).unsqueeze(0), float("-inf"))
