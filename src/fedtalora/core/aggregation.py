"""Server-side aggregation: weighted FedAvg and the exact LoRA residual (ResWU).

For one adapted weight ``W`` with LoRA factors ``B (d_out x r)``, ``A (r x d_in)`` and scaling ``s``,
``K`` clients with weights ``p_k`` (summing to one) return ``(B_k, A_k)``. Naive averaging gives the
global effective weight ``W_base + s * Bbar @ Abar`` with ``Bbar = sum_k p_k B_k``, ``Abar = sum_k p_k A_k``,
which is *not* the average of the clients' effective weights ``W_base + s * B_k @ A_k``. The residual

    W_res = s * (sum_k p_k B_k A_k - Bbar Abar)

folded into the base (``W_base += W_res``, accumulated over rounds and tasks) makes the global model
the exact weighted average of the clients' models (Fed-TaLoRA, arXiv 2505.12318; FedEx-LoRA).

Because ``sum_k p_k (A_k - Abar) = 0``, for any reference client ``j``

    sum_k p_k B_k A_k - Bbar Abar = sum_k p_k B_k (A_k - Abar) = sum_{k != j} p_k (B_k - B_j) (A_k - Abar)

so the residual has rank at most ``(K - 1) r`` and is computed from its factors

    L = [p_k (B_k - B_j)]_{k != j}   (d_out x (K-1) r)
    R = [A_k - Abar]_{k != j}         ((K-1) r x d_in)

(clients of weight 0 drop out; ``j`` is the client of largest weight). ``W_res = s * L @ R`` is one
GEMM, and ``(L, R)`` is also the compact form a server can send instead of the dense ``d_out x d_in``
matrix (see :func:`residual_nbytes`): ``(d_out + d_in) (K-1) r`` numbers instead of ``d_out d_in``.

**For the exact base** (:mod:`fedtalora.core.exact`) the residual is taken in float64 against the *rounded*
averages the model holds (:func:`exact_residual`, one GEMM of the clients' own factors), and its compact form
is the live clients' factors themselves with their weights (:class:`ResidualFactors`, ``K' r`` columns), from
which a replica recomputes the averages and the residual bit for bit: ``aggregate_lora(..., exact=True)``.

Every function here is pure: tensors in, new tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import AggregationError

__all__ = ["Aggregate", "LoraPair", "ResidualFactors", "StateDict", "aggregate_lora", "aggregation_errors",
           "check_updates", "exact_factors", "exact_factors_nbytes", "exact_residual", "fedavg", "lora_residual",
           "normalize_weights", "relative_aggregation_error", "residual_factors", "residual_nbytes", "residual_rank",
           "state_nbytes", "weighted_average"]

StateDict = Mapping[str, torch.Tensor]


def normalize_weights(counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Aggregation weights ``p_k = n_k / sum(n)`` in float64.

    Raises:
        AggregationError: if there are no clients, a count is negative or not finite, or all are zero.
    """
    w = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if w.numel() == 0:
        raise AggregationError("cannot aggregate zero client updates")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise AggregationError(f"aggregation weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise AggregationError("aggregation weights sum to zero")
    return w / total


def check_updates(updates: Sequence[StateDict]) -> None:
    """Raise :class:`AggregationError` unless all updates share the same keys, shapes and dtypes."""
    if not updates:
        raise AggregationError("cannot aggregate zero client updates")
    ref = updates[0]
    for i, upd in enumerate(updates[1:], start=1):
        if set(upd) != set(ref):
            missing = sorted(set(ref) - set(upd))
            extra = sorted(set(upd) - set(ref))
            raise AggregationError(f"update {i} has different keys (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, t in upd.items():
            if t.shape != ref[k].shape:
                raise AggregationError(f"update {i}: {k} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
            if t.dtype != ref[k].dtype:
                raise AggregationError(f"update {i}: {k} has dtype {t.dtype}, expected {ref[k].dtype}")


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k t_k`` accumulated in float64, returned in the tensors' dtype."""
    if len(tensors) != weights.numel():
        raise AggregationError(f"{len(tensors)} tensors but {weights.numel()} weights")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t, p in zip(tensors, weights.tolist(), strict=True):
        acc.add_(t.to(torch.float64), alpha=p)
    return acc.to(tensors[0].dtype)


def fedavg(updates: Sequence[StateDict], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Key-wise weighted average of state dicts (checked for matching keys and shapes)."""
    check_updates(updates)
    return {k: weighted_average([u[k] for u in updates], weights) for k in updates[0]}


def residual_factors(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor,
    Bbar: torch.Tensor, Abar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(L, R)`` with ``L @ R = sum_k p_k B_k A_k - Bbar Abar``, of inner dimension ``(K' - 1) r``.

    ``L = [p_k (B_k - B_j)]`` and ``R = [A_k - Abar]`` over the ``K'`` clients of nonzero weight except the
    reference ``j`` (the one of largest weight); see the module docstring. The differences are taken
    in float64 and rounded once to the factors' dtype, so ``L @ R`` differs from the residual of the
    (rounded) ``Bbar``, ``Abar`` only by rounding.

    Shapes: ``B_k (d_out, r)``, ``A_k (r, d_in)`` -> ``L (d_out, (K'-1) r)``, ``R ((K'-1) r, d_in)``
    (zero inner dimension, i.e. a zero residual, for a single client).
    """
    p = weights.tolist()
    if len(Bs) != len(p) or len(As) != len(p):
        raise AggregationError(f"{len(Bs)} B and {len(As)} A factors but {len(p)} weights")
    f64, dtype = torch.float64, Bbar.dtype
    live = [k for k, pk in enumerate(p) if pk > 0]
    j = max(live, key=lambda k: p[k]) if live else 0
    others = [k for k in live if k != j]
    if not others:
        return (Bbar.new_zeros(Bbar.shape[0], 0), Abar.new_zeros(0, Abar.shape[1]))
    Bj = Bs[j].to(f64)
    Abar64 = Abar.to(f64)
    L = torch.cat([((Bs[k].to(f64) - Bj) * p[k]).to(dtype) for k in others], dim=1)
    R = torch.cat([(As[k].to(f64) - Abar64).to(dtype) for k in others], dim=0)
    return L, R


def residual_rank(weights: torch.Tensor, rank: int) -> int:
    """Inner dimension ``(K' - 1) r`` of :func:`residual_factors` (``K'`` clients of nonzero weight)."""
    return max(int((weights > 0).sum()) - 1, 0) * rank


def lora_residual(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """``W_res = s * (sum_k p_k B_k A_k - Bbar Abar)`` (dense, ``d_out x d_in``)."""
    Bbar = weighted_average(Bs, weights)
    Abar = weighted_average(As, weights)
    L, R = residual_factors(Bs, As, weights, Bbar, Abar)
    return (L @ R) * scaling


def relative_aggregation_error(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor, scaling: float,
    Bbar: torch.Tensor, Abar: torch.Tensor, residual: torch.Tensor | None,
) -> float:
    """Fraction of the clients' averaged update that aggregation loses, for one layer.

    ``|dW_global - sum_k p_k dW_k|_F / |sum_k p_k dW_k|_F`` with ``dW_k = s B_k A_k`` and
    ``dW_global = s Bbar Abar + W_res`` (``W_res = 0`` without the residual). Computed in float64
    from the factors, never by subtracting the large frozen weights (which would drown it in rounding).
    """
    return aggregation_errors(Bs, As, weights, scaling, Bbar, Abar, residual)[0]


def aggregation_errors(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor, scaling: float,
    Bbar: torch.Tensor, Abar: torch.Tensor, residual: torch.Tensor | None,
) -> tuple[float, float]:
    """:func:`relative_aggregation_error` with ``residual`` and without it (what naive averaging of the
    factors loses), from one product of the factors. Equal when ``residual`` is None."""
    f64 = torch.float64
    p = weights.tolist()
    # target = s sum_k p_k B_k A_k as ONE GEMM of inner K r (not K rank-r updates of a dense matrix)
    P = torch.cat([B.to(f64) * pk for B, pk in zip(Bs, p, strict=True)], dim=1)
    target = (P @ torch.cat([A.to(f64) for A in As], dim=0)).mul_(scaling)
    diff = (Bbar.to(f64) @ Abar.to(f64)).mul_(scaling).sub_(target)  # naive global update - target
    denom = torch.linalg.matrix_norm(target)
    naive = _ratio(torch.linalg.matrix_norm(diff), denom)
    if residual is None:
        return naive, naive
    return _ratio(torch.linalg.matrix_norm(diff.add_(residual.to(f64))), denom), naive


def _ratio(num: torch.Tensor, denom: torch.Tensor) -> float:
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)


# --- the exact residual and its factors (for the exact base, :mod:`fedtalora.core.exact`) ---------------


def _live(weights: torch.Tensor) -> list[int]:
    return [k for k, p in enumerate(weights.tolist()) if p > 0]


def exact_residual(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor, scaling: float,
    Bbar: torch.Tensor, Abar: torch.Tensor,
) -> torch.Tensor:
    """``R = s (sum_k p_k B_k A_k - Bbar Abar)`` in float64: the exact change of the base target (eq. (1) of
    :mod:`fedtalora.core.exact`).

    ``Bbar``, ``Abar`` are the averages *as the model holds them* (float32); clients of weight 0 drop out.
    One float64 GEMM ``[p_k B_k ..., -Bbar] @ [A_k ...; Abar]`` of inner dimension ``(K'+1) r``: every
    product of two float32 values is exact in float64, only the sums round (``2**-53``).

    Shapes: ``B_k (d_out, r)``, ``A_k (r, d_in)`` -> ``(d_out, d_in)`` float64.
    """
    p = weights.tolist()
    if len(Bs) != len(p) or len(As) != len(p):
        raise AggregationError(f"{len(Bs)} B and {len(As)} A factors but {len(p)} weights")
    live = _live(weights)
    P = torch.cat([Bs[k].to(torch.float64) * p[k] for k in live] + [-Bbar.to(torch.float64)], dim=1)
    Q = torch.cat([As[k].to(torch.float64) for k in live] + [Abar.to(torch.float64)], dim=0)
    return (P @ Q).mul_(scaling)


@dataclass(frozen=True)
class ResidualFactors:
    """What reproduces one round's residual bit for bit: the live clients' factors side by side.

    ``B = [B_1 ... B_K']`` (``d_out x K' r``, float32 as the clients sent them), ``A = [A_1; ...; A_K']``
    (``K' r x d_in``) and ``weights`` (``K'``, float64, all > 0). :meth:`dense` recomputes the averages
    exactly as :func:`fedavg` does and returns :func:`exact_residual`.
    """

    B: torch.Tensor
    A: torch.Tensor
    weights: torch.Tensor

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return self.B.shape[1] // max(self.weights.numel(), 1)

    def split(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The clients' ``B_k`` and ``A_k``."""
        K, r = self.weights.numel(), self.rank
        return ([self.B[:, i * r:(i + 1) * r] for i in range(K)], [self.A[i * r:(i + 1) * r] for i in range(K)])

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Bbar, Abar)`` as the server's FedAvg computes them (float64 sums, rounded once)."""
        Bs, As = self.split()
        return weighted_average(Bs, self.weights), weighted_average(As, self.weights)

    def dense(self, scaling: float) -> torch.Tensor:
        """The round's residual ``R`` (float64, ``d_out x d_in``)."""
        Bs, As = self.split()
        Bbar, Abar = self.averages()
        return exact_residual(Bs, As, self.weights, scaling, Bbar, Abar)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: ``4 (d_out + d_in) K' r + 8 K'``."""
        return sum(t.numel() * t.element_size() for t in (self.B, self.A, self.weights))


def exact_factors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor) -> ResidualFactors:
    """The :class:`ResidualFactors` of one round (clients of weight 0 dropped; weights kept as given)."""
    if len(Bs) != weights.numel() or len(As) != weights.numel():
        raise AggregationError(f"{len(Bs)} B and {len(As)} A factors but {weights.numel()} weights")
    live = _live(weights)
    if not live:
        raise AggregationError("aggregation weights sum to zero")
    w = weights.to(torch.float64).flatten()
    return ResidualFactors(B=torch.cat([Bs[k] for k in live], dim=1), A=torch.cat([As[k] for k in live], dim=0),
                           weights=w[live].clone())


def exact_factors_nbytes(d_out: int, d_in: int, rank: int, clients: int, element_size: int = 4) -> int:
    """Bytes of :class:`ResidualFactors` for ``clients`` live clients (without building them)."""
    return (d_out + d_in) * rank * clients * element_size + 8 * clients


@dataclass(frozen=True)
class LoraPair:
    """Keys of one adapted layer's factors in a state dict, and its LoRA scaling ``alpha / r``."""

    layer: str
    a_key: str
    b_key: str
    scaling: float


@dataclass
class Aggregate:
    """The result of one round's aggregation."""

    state: dict[str, torch.Tensor]
    """New global trainable state (averaged LoRA factors, head, ...)."""
    residuals: dict[str, torch.Tensor]
    """Per adapted layer, the dense ``W_res`` to add into the base weight (empty without the residual)."""
    errors: dict[str, float]
    """Per adapted layer, :func:`relative_aggregation_error`."""
    residual_ranks: dict[str, int]
    """Per adapted layer, the inner dimension ``(K' - 1) r`` of the factored residual (:func:`residual_factors`;
    ``K'`` the clients of nonzero weight)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | ResidualFactors] = field(default_factory=dict)
    """Per adapted layer with a residual, its factors ``(L, R)``: ``residuals[layer] == (L @ R) * scaling``
    (what a server sends instead of the dense matrix when it is smaller; empty without the residual).
    With ``exact=True`` a :class:`ResidualFactors`: ``residuals[layer] == f.dense(scaling)``."""

    naive_errors: dict[str, float] = field(default_factory=dict)
    """Per adapted layer, what naive averaging of the factors would lose this round (equal to
    :attr:`errors` without the residual; empty for methods that aggregate no LoRA factors)."""

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def max_naive_error(self) -> float | None:
        return max(self.naive_errors.values()) if self.naive_errors else None


def aggregate_lora(
    updates: Sequence[StateDict], weights: torch.Tensor, pairs: Sequence[LoraPair], *, residual: bool,
    exact: bool = False,
) -> Aggregate:
    """FedAvg of every tensor, plus (optionally) the exact residual of every LoRA pair.

    Args:
        updates: one state dict per client, all with the same keys and shapes.
        weights: normalised aggregation weights (see :func:`normalize_weights`).
        pairs: the LoRA layers whose ``(B, A)`` appear in the updates.
        residual: compute ``W_res`` (ResWU); without it the residuals dict is empty.
        exact: the residual in float64 against the rounded averages (:func:`exact_residual`, for a model with
            the exact base, :mod:`fedtalora.core.exact`), and its factors as :class:`ResidualFactors` (the live
            clients' factors: ``residual_ranks`` is ``K' r``; a round with one live client has no residual, as
            it is exactly zero). ``errors`` are still computed from the factors before the residual is applied;
            the model's real error is :func:`fedtalora.core.exact.round_error`.
    """
    check_updates(updates)
    if len(updates) != weights.numel():
        raise AggregationError(f"{len(updates)} updates but {weights.numel()} weights")
    for pair in pairs:
        for k in (pair.a_key, pair.b_key):
            if k not in updates[0]:
                raise AggregationError(f"LoRA key {k!r} of layer {pair.layer!r} is missing from the updates")
    state = fedavg(updates, weights)
    residuals: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    naive: dict[str, float] = {}
    ranks: dict[str, int] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | ResidualFactors] = {}
    for pair in pairs:
        Bs = [u[pair.b_key] for u in updates]
        As = [u[pair.a_key] for u in updates]
        Bbar, Abar = state[pair.b_key], state[pair.a_key]
        res = None
        ranks[pair.layer] = residual_rank(weights, Bbar.shape[1])
        if residual and exact and ranks[pair.layer]:  # (one live client: Bbar Abar = B_1 A_1 exactly, R = 0)
            f = exact_factors(Bs, As, weights)
            if not all(torch.equal(x, y) for x, y in zip(f.averages(), (Bbar, Abar), strict=True)):
                raise AggregationError(f"{pair.layer}: the residual's factors do not reproduce the averaged factors")
            res = f.dense(pair.scaling)
            residuals[pair.layer] = res
            factors[pair.layer] = f
            ranks[pair.layer] = f.B.shape[1]
        elif residual and not exact:
            L, R = residual_factors(Bs, As, weights, Bbar, Abar)
            res = (L @ R).mul_(pair.scaling)
            residuals[pair.layer] = res
            factors[pair.layer] = (L, R)
        errors[pair.layer], naive[pair.layer] = aggregation_errors(Bs, As, weights, pair.scaling, Bbar, Abar, res)
    return Aggregate(state=state, residuals=residuals, errors=errors, residual_ranks=ranks, factors=factors,
                     naive_errors=naive)


def residual_nbytes(d_out: int, d_in: int, inner: int, element_size: int = 4) -> tuple[int, int]:
    """Bytes of one layer's residual as a dense matrix and as its factors ``(L, R)``."""
    return d_out * d_in * element_size, (d_out + d_in) * inner * element_size


def state_nbytes(state: StateDict) -> int:
    """Bytes of a state dict's tensors as they would travel (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())
