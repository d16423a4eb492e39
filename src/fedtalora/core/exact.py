"""Exact base accumulation: the float32 weight a layer computes with, kept one rounding from the exact chain.

**The chain.** One adapted layer, LoRA scaling ``s``; the model holds a float32 base ``b`` and float32
factors ``(B, A)`` and computes with ``E = b + s B A``. In round ``t`` the clients start from the global
``(B_o, A_o)`` and return ``(B_k, A_k)`` with weights ``p_k`` (float64, summing to one); client ``k``'s
change is ``dE_k = s B_k A_k - s B_o A_o``. The exact chain of weighted averages is

    E*_0 = W0 + s B_0 A_0,        E*_t = E*_{t-1} + sum_k p_k dE_k

(``W0`` the untouched pre-trained weight). The server loads the float32 averages ``(B_n, A_n)``
(:func:`fedtalora.core.aggregation.fedavg`), so the base the model must hold is ``T*_t = E*_t - s B_n A_n``, and

    T*_t = T*_{t-1} + R_t,   R_t = s (sum_k p_k B_k A_k - B_n A_n),   T*_0 = W0.          (1)

``R_t`` is the residual (ResWU) taken against the *rounded* averages the model holds, so their rounding
is absorbed into the base instead of lost. Every term of (1) is a product of float32 values.

**The accumulator.** Per layer, keep ``W0`` (float32, never modified) and ``D`` (float64) with
``D_0 = 0`` and ``D_t = fl64(D_{t-1} + fl64(R_t))`` (:func:`~fedtalora.core.aggregation.exact_residual`:
one float64 GEMM of the float32 factors), and materialise the float32 base from exact parts every round,
``b_t = fl32(fl64(W0 + D_t))`` (:func:`materialise`). Nothing is ever added to a float32 weight.

**Claim.** With ``u = 2**-24`` (float32 unit roundoff), ``eps = 2**-53`` (float64) and ``q`` the inner
dimension of the residual GEMM ((K'+1) r), elementwise

    |b_t - T*_t| <= (u + eps) |T*_t|  +  sum_{tau <= t} ( eps |D_tau| + 2 (q+1) eps s |P_tau| |Q_tau| )   (2)

where ``|P||Q|`` is the product of the absolute factor matrices ``P = [p_k B_k ..., -B_n]``,
``Q = [A_k ...; A_n]`` of round ``tau``. Since
``E_model - E*_t = b_t - T*_t`` (both hold the same ``s B_n A_n``; the difference is evaluated exactly),
``||E_model - E*_t||_F <= u ||T*_t||_F (1 + 2**-29) + t * eps * c`` (and ``||T*_t|| = ||b_t||`` to
a relative ``u``: the unit of one float32 rounding is ``u ||b||``) with ``c`` bounded by the largest
``||D||`` and ``(q+1) s || |P||Q| ||``. The second term reaches ``u ||W||`` only after ``~2**29 / q``
rounds of residuals as large as ``W`` itself, i.e. never in practice: the model is within one float32
rounding of the exact chain at every round of a run of any realistic length, whatever the direction
of the residuals.

*Proof of (2).* (i) ``D_t - sum R_tau`` collects one float64 rounding of each addition,
``|fl64(x) - x| <= eps |x|``, plus the GEMM error ``|fl64(R) - R| <= gamma_{q+1} s |P||Q|`` with
``gamma_n = n eps / (1 - n eps) <= 2 n eps`` (the dot-product bound, Higham, *Accuracy and Stability
of Numerical Algorithms*, sec. 3.1, with one more rounding for the entries ``p_k B_k``; the scaling
by ``s``, a power of two in practice, adds at most one ``eps``). (ii) ``W0 + D_t`` is rounded once in
float64 (``eps``) and once to float32 (``u``); ``W0`` is exact in float64. (iii) ``T*_t = W0 + sum R_tau``. Adding the three
bounds gives (2). Float32 subnormals (``|x| < 2**-126``) add at most ``2**-150`` absolutely. QED.

**Compared with folding** (``b += fl32(R)``, what :meth:`FedModel.add_to_base` does without the exact base): every round
rounds ``b + R`` to float32 and the errors add up: a residual below half an ulp of ``b`` is dropped
entirely, and for a residual that points the same way every round, ``fl32(b + R) - b`` is ``R``
rounded to the local float32 grid *the same way every round* while ``b`` stays in its binade, so the
error grows linearly with the number of rounds (``benchmarks/exactness.py`` measures it).

**Choice of accumulator** (measured in ``benchmarks/results/exactness.md``):

========================  ==================  =============================================================
accumulator               extra memory/elem   exactness
========================  ==================  =============================================================
``W0`` fp32 + ``D`` fp64  12 B                (2): one float32 rounding for ~2**29 rounds
``T = W0 + D`` fp64       8 B                 same; but ``W0`` is gone, so the accumulated update
                                              ``E*_t - E*_0`` (the denominator of the accumulated
                                              error) cannot be formed
fp32 pair ``b + lo``      4 B                 ``2**-48 |T|`` lost per round: within ``u`` for
                                              ``< 2**24`` rounds; needs a separate fp64 chain for the
                                              accumulated error (then 12 B again)
========================  ==================  =============================================================

``W0`` + float64 ``D`` is chosen: the simplest proof, the accumulated error for free (``D`` *is* the
exact chain, so the server keeps nothing else for the measurement), ``D`` is small and starts at zero
(checkpoints and dense catch-ups carry ``D``; ``W0`` is rebuilt from the config and checked by
``fl32(W0 + D) == b``), and Flower clients already keep ``W0`` (their pristine base).

**Bit-identical replicas.** A Flower client holds its own ``(W0, D)`` and receives, per missed round, the
:class:`~fedtalora.core.aggregation.ResidualFactors` the server used (the live clients' float32 ``B_k``,
``A_k`` and float64 ``p_k``); :meth:`~fedtalora.core.aggregation.ResidualFactors.dense` recomputes the
averages with the server's own :func:`~fedtalora.core.aggregation.weighted_average` and ``R_t`` with the
same float64 GEMM, so both sides
perform the same IEEE operations on the same bits (on one machine type and BLAS, as before). A dense
catch-up sends ``D`` itself (float64), never the float32 base, so later factored catch-ups stay
bit-identical.

**The truthful metrics** (:func:`round_error`, :func:`accumulated_error`) are computed in float64 from
what the model holds, never from the factors alone: the per-round error compares the change of the
model's ``E = b + s B A`` with ``sum_k p_k dE_k`` taken directly from the clients' factors (so it does
not trust :func:`~fedtalora.core.aggregation.exact_residual`); the accumulated error compares ``b`` with
``W0 + D``. Differences of float32 values are exact in float64 (for exponents at most 28 apart; else
rounded by ``2**-53``), so no large weight drowns them. Inputs may live on any device: they are taken
to the device of the base weight (the per-round error) or of the accumulator (the accumulated error).

Every function is pure; :class:`ExactBase` is a plain container of the per-layer tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import AggregationError
from .aggregation import LoraPair

U = 2.0 ** -24
"""Unit roundoff of float32 (round to nearest): ``|fl32(x) - x| <= U |x|``."""

F64 = torch.float64
F32 = torch.float32


# --- the accumulator ---------------------------------------------------------------------------------


def materialise(w0: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """The float32 base ``fl32(W0 + D)``: ``W0`` (float32) plus the float64 accumulator, rounded once."""
    return torch.add(acc, w0).to(F32)  # w0 is promoted to float64 exactly inside the kernel


class ExactBase:
    """Per adapted layer: the untouched ``W0`` (float32) and the float64 accumulator ``D`` of residuals.

    A plain container: :meth:`add` accumulates, :meth:`base` materialises ``fl32(W0 + D)``. It never
    touches a model; :class:`~fedtalora.model.FedModel` copies :meth:`base` into its weights.
    """

    def __init__(self, w0: Mapping[str, torch.Tensor]) -> None:
        self.w0: dict[str, torch.Tensor] = {k: v.detach().to(F32).clone() for k, v in w0.items()}
        self.acc: dict[str, torch.Tensor] = {k: torch.zeros(v.shape, dtype=F64, device=v.device)
                                             for k, v in self.w0.items()}

    def layers(self) -> list[str]:
        return list(self.w0)

    def add(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """``D += delta`` per layer (float64; a float32 delta is widened exactly)."""
        unknown = sorted(set(deltas) - set(self.acc))
        if unknown:
            raise KeyError(f"no accumulator for layers {unknown[:3]}")
        for layer, d in deltas.items():
            acc = self.acc[layer]
            if d.shape != acc.shape:
                raise ValueError(f"{layer}: delta of shape {tuple(d.shape)}, expected {tuple(acc.shape)}")
            acc.add_(d.to(device=acc.device, dtype=F64))

    def base(self, layer: str) -> torch.Tensor:
        """``fl32(W0 + D)``: the float32 base weight the layer must compute with."""
        return materialise(self.w0[layer], self.acc[layer])

    def materialise_into(self, layer: str, out: torch.Tensor) -> None:
        """``out <- fl32(W0 + D)`` in place (one float64 temporary; ``out`` is the model's weight)."""
        out.copy_(torch.add(self.acc[layer], self.w0[layer]))

    def target(self, layer: str) -> torch.Tensor:
        """``W0 + D`` in float64: the exact base (before its float32 rounding)."""
        return torch.add(self.acc[layer], self.w0[layer])

    def to(self, device: torch.device | str) -> ExactBase:
        self.w0 = {k: v.to(device) for k, v in self.w0.items()}
        self.acc = {k: v.to(device) for k, v in self.acc.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators ``D`` (float64) by layer: what checkpoints and dense catch-ups carry."""
        return {k: v.detach().clone() for k, v in self.acc.items()}

    def set(self, layer: str, acc: torch.Tensor) -> None:
        """Replace one layer's accumulator (a dense catch-up of that layer; float64, same shape)."""
        if layer not in self.acc:
            raise KeyError(f"no accumulator for layer {layer!r}")
        if acc.shape != self.acc[layer].shape or acc.dtype != F64:
            raise ValueError(f"{layer}: accumulator of {acc.dtype} {tuple(acc.shape)}, expected float64 "
                             f"{tuple(self.acc[layer].shape)}")
        self.acc[layer] = acc.detach().to(self.acc[layer].device).clone()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every accumulator (keys and shapes must match; values must be float64)."""
        if set(state) != set(self.acc):
            raise KeyError(f"accumulator layers differ: got {sorted(state)[:3]}, expected {sorted(self.acc)[:3]}")
        for k, v in state.items():
            self.set(k, v)

    @property
    def nbytes(self) -> int:
        """Memory held: ``W0`` (4 B) and ``D`` (8 B) per element of every adapted layer."""
        return sum(t.numel() * t.element_size() for d in (self.w0, self.acc) for t in d.values())


# --- the truthful metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactnessError:
    """An error of the global effective weight, in two units."""

    relative: float
    """``||error||_F / ||update||_F`` (0 when both are 0, inf for an error without an update)."""
    in_rounding: float
    """``||error||_F / (U ||b||_F)``: in units of one float32 rounding of the base weight ``b`` (the only
    rounding the exact base makes; <= 1 accumulated and <= 2 per round: float32 resolution, nothing more)."""
    error_norm: float
    update_norm: float
    weight_norm: float
    """``||b||_F`` of the float32 base weight after the round."""
    naive: float | None = None
    """Per round only: the same error without the round's change of the base, relative to the same update:
    what averaging the LoRA factors alone loses (:func:`round_error`)."""


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _norm(t: torch.Tensor) -> float:
    """Frobenius norm, accumulated in float64 (a float32 input is not copied first)."""
    return float(torch.linalg.vector_norm(t, dtype=F64))


def _error(err: torch.Tensor, update: torch.Tensor, b: torch.Tensor, naive_norm: float | None = None,
           ) -> ExactnessError:
    e, d, w = _norm(err), _norm(update), _norm(b)
    return ExactnessError(relative=_ratio(e, d), in_rounding=_ratio(e, U * w), error_norm=e, update_norm=d,
                          weight_norm=w, naive=None if naive_norm is None else _ratio(naive_norm, d))


def round_error(
    base_old: torch.Tensor, base_new: torch.Tensor,
    lora_old: tuple[torch.Tensor, torch.Tensor], lora_new: tuple[torch.Tensor, torch.Tensor],
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: torch.Tensor, scaling: float,
) -> ExactnessError:
    """One round's error of one layer: ``E_new - (E_old + sum_k p_k dE_k)``, as the model holds ``E``.

    Args:
        base_old, base_new: the layer's float32 base weight before and after the round.
        lora_old: the global ``(B, A)`` the clients started from; lora_new: the global ``(B, A)`` after.
        Bs, As, weights, scaling: the clients' factors, their weights ``p_k`` and the LoRA scaling.

    In float64, from the clients' factors directly (not from
    :func:`~fedtalora.core.aggregation.exact_residual`), in difference form so that no large product
    cancels: with ``Abar = sum_k p_k A_k`` (float64) and ``P = sum_k p_k``,

        sum_k p_k dE_k   = s [ sum_k p_k (B_k - B_o) A_k + B_o (Abar - P A_o) ]
        E_new - E_old - sum_k p_k dE_k
                         = (b_new - b_old) - s [ sum_k p_k (B_k - B_n) A_k + B_n (Abar - P A_n)
                                                 + (P - 1) (B_n A_n - B_o A_o) ]

    (expand ``B_k A_k - B A = (B_k - B) A_k + B (A_k - A)``). Differences of float32 values and
    ``b_new - b_old`` are exact in float64, so the float64 noise is relative to the update, not to the weight,
    and an error that is exactly zero (one client, whose factors the model loads unchanged) reads 0. Each side
    is one GEMM. Units: the update and ``U ||b_new||``. The GEMM alone (the error without ``b_new - b_old``) is
    what naive averaging of the factors loses, relative to the same update (:attr:`ExactnessError.naive`).
    """
    if len(Bs) != weights.numel() or len(As) != weights.numel():
        raise AggregationError(f"{len(Bs)} B and {len(As)} A factors but {weights.numel()} weights")
    dev = base_new.device

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=dev, dtype=F64)

    p = weights.to(F64).tolist()
    sp = sum(p)
    (Bo, Ao), (Bn, An) = (f64(t) for t in lora_old), (f64(t) for t in lora_new)
    Bk, Ak = [f64(B) for B in Bs], [f64(A) for A in As]
    Abar = torch.zeros_like(Ao)
    for pk, A in zip(p, Ak, strict=True):
        Abar.add_(A, alpha=pk)
    update = torch.cat([(B - Bo).mul_(pk) for B, pk in zip(Bk, p, strict=True)] + [Bo], dim=1) @ torch.cat(
        [*Ak, Abar - Ao * sp], dim=0)
    update.mul_(scaling)
    naive = torch.cat([(B - Bn).mul_(pk) for B, pk in zip(Bk, p, strict=True)]
                      + [Bn, Bn * (sp - 1.0), Bo * (1.0 - sp)], dim=1) @ torch.cat([*Ak, Abar - An * sp, An, Ao], dim=0)
    naive_norm = abs(scaling) * _norm(naive)
    base_new = base_new.detach()
    err = f64(base_new).sub_(base_old.detach().to(dev))  # b_new - b_old: exact in float64 (promoted in the kernel)
    err.add_(naive, alpha=-scaling)
    return _error(err, update, base_new, naive_norm)


def accumulated_error(
    base: torch.Tensor, w0: torch.Tensor, acc: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor], lora_start: tuple[torch.Tensor, torch.Tensor], scaling: float,
) -> ExactnessError:
    """The model's distance from the exact chain since the start of the run, for one layer.

    ``E_model - E* = b - (W0 + D)`` (the LoRA product is the same on both sides) over the accumulated
    update ``E* - E*_0 = D + s (B A - B_0 A_0)`` and in units of ``U ||b||``; ``lora_start`` is the global
    ``(B_0, A_0)`` when the accumulator started.
    """
    dev = acc.device

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=dev, dtype=F64)

    b = base.detach()
    err = f64(b).sub_(w0.detach().to(dev)).sub_(acc)  # (b - W0) is exact in float64
    (B, A), (B0, A0) = (f64(t) for t in lora), (f64(t) for t in lora_start)
    # s (B A - B0 A0) = s [(B - B0) A + B0 (A - A0)]: differences of float32 values are exact
    update = torch.addmm(acc.to(F64), torch.cat([B - B0, B0], dim=1), torch.cat([A, A - A0], dim=0),
                         alpha=scaling)
    return _error(err, update, b)


def round_errors(
    pairs: Sequence[LoraPair], base_old: Mapping[str, torch.Tensor], base_new: Mapping[str, torch.Tensor],
    state_old: Mapping[str, torch.Tensor], state_new: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
) -> dict[str, ExactnessError]:
    """:func:`round_error` of every adapted layer, from state dicts: the base weights before and after the
    round (by layer), the global trainable state before and after (by key) and the clients' updates."""
    out = {}
    for pr in pairs:
        out[pr.layer] = round_error(
            base_old[pr.layer], base_new[pr.layer], (state_old[pr.b_key], state_old[pr.a_key]),
            (state_new[pr.b_key], state_new[pr.a_key]), [u[pr.b_key] for u in updates],
            [u[pr.a_key] for u in updates], weights, pr.scaling)
    return out


def max_error(errors: Mapping[str, ExactnessError]) -> tuple[float | None, float | None]:
    """``(max relative, max in_rounding)`` over layers (None, None without layers): the round record's
    ``aggregation_error`` and ``aggregation_error_rounding``."""
    if not errors:
        return None, None
    return max(e.relative for e in errors.values()), max(e.in_rounding for e in errors.values())


def max_naive(errors: Mapping[str, ExactnessError]) -> float | None:
    """The largest :attr:`ExactnessError.naive` over layers (None without it): the round record's
    ``naive_aggregation_loss``."""
    values = [e.naive for e in errors.values() if e.naive is not None]
    return max(values) if values else None


def within_resolution(err: ExactnessError, *, roundings: float = 2.0, rel: float = 1e-5) -> bool:
    """The issue's acceptance bound: ``||error|| <= max(roundings U ||W||, rel ||update||)``."""
    return err.error_norm <= max(roundings * U * err.weight_norm, rel * err.update_norm)
