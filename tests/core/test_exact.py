"""Tests of fedtalora.core.exact: the exact base accumulation and the truthful aggregation error.

The oracle is this file's own: the exact chain of weighted averages ``E*_t = E*_{t-1} + sum_k p_k dE_k``
kept in float64 straight from the clients' factors, and the model's effective weight ``b + s B A`` formed
densely in float64. It shares no code with :mod:`fedtalora.core.exact` beyond torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

from fedtalora.core.aggregation import (
    aggregate_lora,
    aggregation_errors,
    exact_factors,
    exact_factors_nbytes,
    exact_residual,
    fedavg,
    lora_residual,
    normalize_weights,
    weighted_average,
)
from fedtalora.core.exact import (
    ExactBase,
    ExactnessError,
    U,
    accumulated_error,
    materialise,
    max_error,
    round_error,
    round_errors,
    within_resolution,
)
from fedtalora.seeding import torch_generator

F32, F64 = torch.float32, torch.float64
EPS64 = 2.0 ** -53


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- hand examples ------------------------------------------------------------------------------------


def test_exact_residual_hand_example() -> None:
    # Prepare: 1x1 factors, p = (1/2, 1/2), s = 2
    Bs = [torch.tensor([[1.0]]), torch.tensor([[3.0]])]
    As = [torch.tensor([[2.0]]), torch.tensor([[4.0]])]
    w = torch.tensor([0.5, 0.5], dtype=F64)
    # Execute: sum p B A = 0.5*2 + 0.5*12 = 7; Bbar Abar = 2 * 3 = 6; R = 2 * (7 - 6) = 2
    R = exact_residual(Bs, As, w, 2.0, torch.tensor([[2.0]]), torch.tensor([[3.0]]))
    # Assert
    assert R.dtype == F64 and R.item() == 2.0


def test_exact_residual_absorbs_the_rounding_of_the_averages() -> None:
    # p = (1/3, 2/3): Bbar = 5/3 is not a float32; the residual is taken against the float32 average.
    Bs = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    As = [torch.tensor([[1.0]]), torch.tensor([[1.0]])]
    w = normalize_weights([1, 2])
    Bbar = weighted_average(Bs, w)
    assert Bbar.item() != 5 / 3  # rounded
    R = exact_residual(Bs, As, w, 1.0, Bbar, weighted_average(As, w))
    # by hand: 1/3 * 1 + 2/3 * 2 - fl32(5/3) * 1
    assert R.item() == pytest.approx(5 / 3 - Bbar.double().item(), abs=5e-16)  # p_k are float64
    assert R.item() != 0.0
    # b + s Bbar Abar + R recovers the exact average 5/3 to float64 rounding
    assert Bbar.double().item() + R.item() == pytest.approx(5 / 3, abs=5e-16)


def test_sub_ulp_residuals_accumulate_instead_of_vanishing() -> None:
    # W0 = 1: float32 spacing 2**-23 above 1, so a residual of 2**-25 is under half a spacing.
    acc = ExactBase({"w": torch.ones(1, 1)})
    fold = torch.ones(1, 1)
    r = torch.full((1, 1), 2.0 ** -25, dtype=F64)
    for _ in range(3):
        acc.add({"w": r})
        fold += r.float()  # today's fold: 1 + 2**-25 rounds back to 1 every time
    assert fold.item() == 1.0
    assert acc.target("w").item() == 1 + 3 * 2.0 ** -25  # exact
    assert acc.base("w").item() == 1 + 2.0 ** -23  # the nearest float32 of 1 + 1.5 * 2**-24
    assert abs(acc.base("w").double().item() - (1 + 3 * 2.0 ** -25)) <= U * 1.0


def test_round_error_hand_example() -> None:
    # Layer 1x1, s = 1. Start: b = 1, (B, A) = (0, 1). Two clients: (1, 1) and (3, 1), p = (1/2, 1/2):
    # dE_1 = 1, dE_2 = 3 -> sum p dE = 2. The server loads Bbar = 2, Abar = 1, residual 0, b stays 1.
    one = torch.ones(1, 1)
    kw = dict(Bs=[one, 3 * one], As=[one, one], weights=torch.tensor([0.5, 0.5], dtype=F64), scaling=1.0)
    e = round_error(one, one, (0 * one, one), (2 * one, one), **kw)
    assert e.error_norm == 0.0 and e.update_norm == 2.0 and e.weight_norm == 1.0 and e.relative == 0.0
    # The base moved by 0.25 that it should not have: error 0.25 of an update of 2, in units of U * ||b_new||.
    e = round_error(one, 1.25 * one, (0 * one, one), (2 * one, one), **kw)
    assert e.relative == 0.125 and e.in_rounding == pytest.approx(0.25 / (U * 1.25))


def test_round_error_reads_exactly_zero_for_one_client_and_splits_off_the_naive_loss() -> None:
    """One live client: the model loads its factors unchanged, so the error is exactly 0 (not float64 noise);
    the naive loss is the error without the base's change, relative to the same update."""
    g = torch_generator(0, "exact-one-client")
    Bo, Ao = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    B1, A1 = Bo + 0.1 * torch.randn(6, 2, generator=g), Ao + 0.1 * torch.randn(2, 5, generator=g)
    b = torch.randn(6, 5, generator=g)
    w = normalize_weights([7, 0])  # the second client brings nothing
    e = round_error(b, b, (Bo, Ao), (B1, A1), [B1, Bo], [A1, Ao], w, 2.0)
    assert e.error_norm == 0.0 and e.naive == 0.0 and e.update_norm > 0
    # Hand example of the naive part: 1x1, s = 1, start B A = 0; clients (1, 1), (3, 1) with p = 1/2:
    # averages (2, 1) lose nothing; clients (1, 1), (3, 3): update 0.5 + 4.5 = 5, averages 2 * 2 = 4, naive
    # loss 1 / 5; a residual of exactly 1 in the base removes it.
    one = torch.ones(1, 1)
    kw = dict(Bs=[one, 3 * one], As=[one, 3 * one], weights=torch.tensor([0.5, 0.5], dtype=F64), scaling=1.0)
    e = round_error(one, 2 * one, (0 * one, one), (2 * one, 2 * one), **kw)
    assert e.naive == 0.2 and e.error_norm == 0.0 and e.update_norm == 5.0
    e = round_error(one, one, (0 * one, one), (2 * one, 2 * one), **kw)
    assert e.naive == 0.2 and e.relative == 0.2


def test_accumulated_error_hand_example() -> None:
    # W0 = 1, D = 0.5 (exact base 1.5) but the model holds 1.25; LoRA went from 0 to B A = 1 (s = 2).
    one = torch.ones(1, 1)
    e = accumulated_error(1.25 * one, one, 0.5 * one.double(), (one, one), (0 * one, one), 2.0)
    # error 0.25; update D + s (BA - B0A0) = 0.5 + 2 = 2.5; unit U * ||b|| = U * 1.25
    assert e.error_norm == 0.25 and e.update_norm == 2.5 and e.relative == 0.1
    assert e.in_rounding == pytest.approx(0.25 / (U * 1.25))


def test_within_resolution_and_max_error() -> None:
    e = ExactnessError(relative=0.0, in_rounding=1.9, error_norm=1.9 * U, update_norm=1e-9, weight_norm=1.0)
    assert within_resolution(e)
    assert not within_resolution(ExactnessError(0.0, 2.1, 2.1 * U, 1e-9, 1.0))
    assert within_resolution(ExactnessError(1e-6, 10.0, 10 * U, 1.0, 1.0))  # 1e-5 of a large update
    assert max_error({}) == (None, None)
    assert max_error({"a": ExactnessError(0.1, 1.0, 0, 0, 0), "b": ExactnessError(0.2, 0.5, 0, 0, 0)}) == (0.2, 1.0)


# --- properties ---------------------------------------------------------------------------------------


def _factors(g: torch.Generator, K: int, d_out: int, d_in: int, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.randn(d_out, r, generator=g) for _ in range(K)], [torch.randn(r, d_in, generator=g) for _ in range(K)])


@pytest.mark.parametrize("seed", range(4))
def test_exact_residual_matches_rational_arithmetic(seed: int) -> None:
    """Against exact rational arithmetic on the same float32 inputs: within the GEMM bound (2)."""
    g = torch_generator(seed, "exact-rational")
    K, d_out, d_in, r, s = 3, 3, 4, 2, 1.5
    Bs, As = _factors(g, K, d_out, d_in, r)
    w = normalize_weights(torch.randint(1, 50, (K,), generator=g).tolist())
    Bbar, Abar = weighted_average(Bs, w), weighted_average(As, w)
    R = exact_residual(Bs, As, w, s, Bbar, Abar)
    p = [Fraction(x) for x in w.tolist()]
    F = lambda t: [[Fraction(float(v)) for v in row] for row in t.tolist()]  # noqa: E731
    Bf, Af, Bb, Ab = [F(B) for B in Bs], [F(A) for A in As], F(Bbar), F(Abar)
    q = (K + 1) * r
    for i in range(d_out):
        for j in range(d_in):
            exact = Fraction(s) * (sum(p[k] * sum(Bf[k][i][a] * Af[k][a][j] for a in range(r)) for k in range(K))
                                   - sum(Bb[i][a] * Ab[a][j] for a in range(r)))
            mag = s * (sum(abs(float(p[k] * Bf[k][i][a] * Af[k][a][j])) for k in range(K) for a in range(r))
                       + sum(abs(float(Bb[i][a] * Ab[a][j])) for a in range(r)))
            assert abs(Fraction(R[i, j].item()) - exact) <= 2 * (q + 1) * EPS64 * mag + EPS64 * abs(float(exact))


@pytest.mark.parametrize("seed", range(3))
def test_factors_reproduce_the_servers_residual_bit_for_bit(seed: int) -> None:
    g = torch_generator(seed, "exact-factors")
    K, d_out, d_in, r, s = 4, 6, 5, 2, 2.0
    Bs, As = _factors(g, K, d_out, d_in, r)
    counts = torch.randint(1, 30, (K,), generator=g).tolist()
    counts[1] = 0  # a client of weight zero drops out
    w = normalize_weights(counts)
    avg = fedavg([{"B": B, "A": A} for B, A in zip(Bs, As, strict=True)], w)
    f = exact_factors(Bs, As, w)
    assert f.weights.numel() == K - 1 and f.rank == r and f.B.shape == (d_out, (K - 1) * r)
    assert torch.equal(f.averages()[0], avg["B"]) and torch.equal(f.averages()[1], avg["A"])
    assert torch.equal(f.dense(s), exact_residual(Bs, As, w, s, avg["B"], avg["A"]))
    assert f.nbytes == exact_factors_nbytes(d_out, d_in, r, K - 1)


def test_materialise_is_one_rounding_of_the_exact_base() -> None:
    g = torch_generator(0, "exact-materialise")
    w0 = torch.randn(50, 40, generator=g)
    acc = torch.randn(50, 40, generator=g, dtype=F64) * 1e-3
    b = materialise(w0, acc)
    exact = w0.double() + acc
    assert b.dtype == F32
    assert ((b.double() - exact).abs() <= (U + EPS64) * exact.abs()).all()
    assert torch.equal(b, exact.float())
    into = torch.empty(50, 40)
    one = ExactBase({"w": w0})
    one.add({"w": acc})
    one.materialise_into("w", into)
    assert torch.equal(into, b) and torch.equal(one.base("w"), b)


def test_state_dict_round_trip_is_bit_identical() -> None:
    g = torch_generator(1, "exact-state")
    w0 = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(2, 5, generator=g)}
    one = ExactBase(w0)
    for _ in range(5):
        one.add({k: torch.randn(v.shape, generator=g, dtype=F64) * 1e-6 for k, v in w0.items()})
    two = ExactBase(w0)
    two.load_state_dict(one.state_dict())
    for k in w0:
        assert torch.equal(one.base(k), two.base(k)) and torch.equal(one.target(k), two.target(k))
    assert one.nbytes == sum(12 * v.numel() for v in w0.values())
    with pytest.raises(KeyError):
        two.load_state_dict({"a": one.acc["a"]})
    with pytest.raises(ValueError, match="float64"):
        two.load_state_dict({"a": one.acc["a"].float(), "b": one.acc["b"]})
    with pytest.raises(KeyError):
        two.add({"c": torch.zeros(1)})
    three = ExactBase(w0)  # a dense catch-up of one layer at a time
    for k in w0:
        three.set(k, one.acc[k])
        assert torch.equal(three.base(k), one.base(k))
    with pytest.raises(KeyError):
        three.set("c", one.acc["a"])


# --- the long run: one layer, 3,000 rounds, an independent float64 oracle ---------------------------


@dataclass
class RunStats:
    """What one simulated run measured, per round (norms, float64)."""

    oracle_round: torch.Tensor
    """||(E_t - E_{t-1}) - sum_k p_k dE_k|| of the model, by the oracle."""
    oracle_acc: torch.Tensor
    """||E_t - E*_t|| of the model, by the oracle."""
    reported_round: dict[int, float]
    """Round -> the library's reported error norm (exact: round_error; fold: today's factor error), on a
    sample of rounds."""
    reported_acc: dict[int, float]
    """Round -> the library's accumulated_error norm (exact only)."""
    weight: torch.Tensor
    """||E*_t||."""
    update: torch.Tensor
    """||sum_k p_k dE_k||."""
    acc_update: torch.Tensor
    """||E*_t - E*_0||."""


def client_factors(kind: str, size: float, rounds: int, g: torch.Generator, W0: torch.Tensor, *, r: int, s: float,
                   clients: int) -> tuple[torch.Tensor, ...]:
    """Every round's client factors and the averages the model holds after it.

    Returns ``B (T, K, d_out, r)``, ``A (T, K, r, d_in)``, ``p (T, K)`` float64, the averages ``Bbar (T, d_out,
    r)``, ``Abar (T, r, d_in)`` (float64 sums rounded once, as FedAvg does) and the start ``(B0, A0)``.
    ``random``: each round a random 2..K of the K clients take part (the others have weight 0), with random
    sample counts, each perturbing the global factors at random. ``same``: two equally weighted clients
    ``(B0 +- c dB, A0 +- c dA)``, whose residual ``s c**2 dB dA``, and so the update, is the same matrix
    every round. ``size``: the update's norm as a fraction of ``||W0||``.
    """
    d_out, d_in = W0.shape
    norm_w = float(W0.norm())
    A0 = torch.randn(r, d_in, generator=g) * 0.3
    if kind == "same":
        dB, dA = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
        B0 = torch.randn(d_out, r, generator=g) * 0.3
        c = math.sqrt(size * norm_w / (s * float((dB.double() @ dA.double()).norm())))
        B = torch.stack([B0 + c * dB, B0 - c * dB]).expand(rounds, 2, d_out, r).clone()
        A = torch.stack([A0 + c * dA, A0 - c * dA]).expand(rounds, 2, r, d_in).clone()
        p = torch.full((rounds, 2), 0.5, dtype=F64)
        Bbar = torch.einsum("tk,tkor->tor", p, B.double()).float()
        Abar = torch.einsum("tk,tkri->tri", p, A.double()).float()
        return B, A, p, Bbar, Abar, B0, A0
    K = clients
    B0 = torch.zeros(d_out, r)
    m = torch.randint(2, K + 1, (rounds,), generator=g)
    live = torch.rand(rounds, K, generator=g).argsort(dim=1) < m[:, None]
    counts = torch.randint(1, 100, (rounds, K), generator=g).double() * live
    counts[::7, 0] = 0.0  # sometimes a sampled client brings nothing
    counts[counts.sum(1) == 0, 1] = 1.0
    p = counts / counts.sum(1, keepdim=True)
    xi = torch.randn(rounds, K, d_out, r, generator=g)
    eta = torch.randn(rounds, K, r, d_in, generator=g)
    B, A = torch.empty_like(xi), torch.empty_like(eta)
    Bbar, Abar = torch.empty(rounds, d_out, r), torch.empty(rounds, r, d_in)
    Bo, Ao = B0, A0
    for t in range(rounds):  # clients start from the global the model holds
        pt = p[t]
        lin = s * (torch.einsum("k,kor,ri->oi", pt, xi[t].double(), Ao.double())
                   + torch.einsum("k,or,kri->oi", pt, Bo.double(), eta[t].double()))
        sigma = size * norm_w / float(lin.norm())
        B[t], A[t] = Bo + sigma * xi[t], Ao + sigma * eta[t]
        Bo = Bbar[t] = torch.einsum("k,kor->or", pt, B[t].double()).float()
        Ao = Abar[t] = torch.einsum("k,kri->ri", pt, A[t].double()).float()
    return B, A, p, Bbar, Abar, B0, A0


def simulate(kind: str, size: float, rounds: int, mode: str, seed: int = 0, *, d_out: int = 24, d_in: int = 16,
             r: int = 2, s: float = 2.0, clients: int = 5, report_every: int = 10,
             corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RunStats:
    """One adapted layer driven by :func:`client_factors` for ``rounds`` rounds.

    ``mode``: ``fold`` (today: ``b += fl32(R)``, R from :func:`fedtalora.core.aggregation.lora_residual`'s
    float32 factors) or ``exact`` (:class:`ExactBase` with :func:`exact_residual`). ``corrupt`` alters the
    residual the model receives (fault injection). The oracle (the chain ``E*`` and the model's ``E``) is
    computed here, in float64, for all rounds at once.
    """
    g = torch_generator(seed, "exact-sim", kind, size)
    W0 = torch.randn(d_out, d_in, generator=g)
    B, A, p, Bbar, Abar, B0, A0 = client_factors(kind, size, rounds, g, W0, r=r, s=s, clients=clients)
    Bo = torch.cat([B0[None], Bbar[:-1]])  # the global the clients start from, per round
    Ao = torch.cat([A0[None], Abar[:-1]])
    # oracle: sum_k p_k dE_k, the chain E*, in float64 straight from the factors
    prod_o = Bo.double() @ Ao.double()
    update = s * (torch.einsum("tk,tkoi->toi", p, B.double() @ A.double()) - p.sum(1)[:, None, None] * prod_o)
    E0 = W0.double() + s * B0.double() @ A0.double()
    chain = E0 + torch.cumsum(update, 0)
    # the library, round by round
    exact = ExactBase({"w": W0}) if mode == "exact" else None
    base = W0.clone()
    bases = torch.empty(rounds, d_out, d_in)
    reported_round: dict[int, float] = {}
    reported_acc: dict[int, float] = {}
    res_same: torch.Tensor | None = None
    for t in range(rounds):
        Bs, As, w = list(B[t]), list(A[t]), p[t]
        if res_same is not None:
            res = res_same  # the same inputs every round: the library returns the same residual
        else:
            res = exact_residual(Bs, As, w, s, Bbar[t], Abar[t]) if exact is not None else lora_residual(Bs, As, w, s)
            res_same = res if kind == "same" else None
        if corrupt is not None:
            res = corrupt(res)
        base_old = base
        if exact is not None:
            exact.add({"w": res})
            base = exact.base("w")
        else:
            base = base + res.to(F32)
        bases[t] = base
        if t % report_every == 0 or t == rounds - 1:
            if exact is not None:
                reported_round[t] = round_error(base_old, base, (Bo[t], Ao[t]), (Bbar[t], Abar[t]), Bs, As, w,
                                                s).error_norm
                reported_acc[t] = accumulated_error(base, exact.w0["w"], exact.acc["w"], (Bbar[t], Abar[t]),
                                                    (B0, A0), s).error_norm
            else:  # what a run reports today: computed from the factors, before the fold
                rel = aggregation_errors(Bs, As, w, s, Bbar[t], Abar[t], res)[0]
                reported_round[t] = rel * float(update[t].norm())
    # oracle: the model's E_t = b_t + s Bbar_t Abar_t, against the update and the chain
    E = bases.double() + s * Bbar.double() @ Abar.double()
    E_prev = torch.cat([(W0.double() + s * B0.double() @ A0.double())[None], E[:-1]])
    norms = torch.linalg.matrix_norm
    return RunStats(oracle_round=norms(E - E_prev - update), oracle_acc=norms(E - chain),
                    reported_round=reported_round, reported_acc=reported_acc, weight=norms(chain),
                    update=norms(update), acc_update=norms(chain - E0))


def bound(stats: RunStats) -> torch.Tensor:
    """The acceptance bound per round: max(2 u ||W||, 1e-5 ||accumulated update||)."""
    return torch.maximum(2 * U * stats.weight, 1e-5 * stats.acc_update)


ROUNDS = 3000


def _agree(reported: dict[int, float], oracle: torch.Tensor, weight: torch.Tensor) -> None:
    """The reported error is the truth: within 2x of the oracle's, both ways (float64 noise aside)."""
    for t, rep in reported.items():
        ora, noise = float(oracle[t]), 1e-6 * U * float(weight[t])
        assert rep <= 2 * ora + noise and ora <= 2 * rep + noise, (t, rep, ora)


@pytest.mark.parametrize("kind", ["random", "same"])
@pytest.mark.parametrize("size", [1e-3, 1e-5], ids=["large", "tiny"])
def test_exact_base_stays_within_one_rounding_for_3000_rounds(kind: str, size: float) -> None:
    st = simulate(kind, size, ROUNDS, "exact")
    assert float(st.update.mean() / st.weight[0]) == pytest.approx(size, rel=0.5)  # the regime asked for
    worst = float((st.oracle_acc / bound(st)).max())
    assert worst <= 1.0, f"{kind}/{size}: the model left float32 resolution ({worst:.3g} x the bound)"
    # every round's change is the clients' averaged update to two float32 roundings of the weight
    assert float((st.oracle_round / (U * st.weight)).max()) <= 2.0 + 1e-6
    _agree(st.reported_round, st.oracle_round, st.weight)
    _agree(st.reported_acc, st.oracle_acc, st.weight)


@pytest.mark.parametrize("size", [1e-3, 1e-5], ids=["large", "tiny"])
def test_todays_fold_drifts_when_the_residual_points_the_same_way(size: float) -> None:
    st = simulate("same", size, ROUNDS, "fold")
    worst = float((st.oracle_acc / bound(st)).max())
    assert worst > 2, f"the fold was expected to leave float32 resolution; it stayed at {worst:.3g} x the bound"
    # it grows with the number of rounds, while a run reports next to nothing
    assert st.oracle_acc[-1] > 5 * st.oracle_acc[ROUNDS // 10]
    assert max(st.reported_round.values()) < 1e-3 * float(st.oracle_acc[-1])
    # the same rounds with the exact base stay within the bound
    assert float(simulate("same", size, ROUNDS, "exact").oracle_acc.max()) < 1e-2 * float(st.oracle_acc[-1])


@pytest.mark.parametrize("fault", [0.0, 0.5], ids=["dropped", "halved"])
def test_a_dropped_or_halved_residual_is_caught(fault: float) -> None:
    """Fault injection: the model receives ``fault * R``. Both the oracle and the reported per-round metric
    see the error at once (the metric recomputes the update from the clients' factors, not from R)."""
    st = simulate("random", 1e-3, 30, "exact", report_every=1, corrupt=lambda res: res * fault)
    ora = st.oracle_round / (U * st.weight)
    assert float(ora.max()) > 50 and float((st.oracle_acc / bound(st)).max()) > 10
    _agree(st.reported_round, st.oracle_round, st.weight)


# --- the model: FedModel with the exact base -----------------------------------------------------------


def _client_updates(model, global_state, K: int, g: torch.Generator, *, bf16: bool, steps: int = 2,
                    lr: float = 0.05) -> list[dict[str, torch.Tensor]]:
    """K clients each take ``steps`` SGD steps on random data from the global state (forward in bf16
    autocast when asked); returns their trainable states."""
    keys = list(global_state)
    out = []
    params = model.parameters_by_key()
    for _ in range(K):
        model.load_trainable(global_state)
        opt = torch.optim.SGD([params[k] for k in keys], lr=lr)
        for _ in range(steps):
            x = torch.randn(8, 3, 8, 8, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(model.trainable_state(keys))
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_fedmodel_exact_rounds_against_the_oracle(make_tiny_model, bf16: bool) -> None:
    """Real local SGD (bf16 autocast or not), partial participation, FedAvg + exact residual applied
    the way Method.apply does it; the weights stay float32 and within float32 resolution of the chain."""
    model = make_tiny_model()
    model.enable_exact_base()
    pairs = model.lora_pairs()
    keys = list(model.lora_parameters()) + ["head.weight", "head.bias"]
    g = torch_generator(0, "exact-fedmodel", bf16)
    global_state = model.trainable_state(keys)
    chain = {p.layer: model.effective_weight(p.layer) for p in pairs}  # oracle E*_0
    for t in range(6):
        K = 2 + t % 3
        updates = _client_updates(model, global_state, K, g, bf16=bf16)
        w = normalize_weights(torch.randint(1, 40, (K,), generator=g).tolist())
        for p in pairs:  # oracle: E* += sum_k p_k (s B_k A_k - s B_o A_o)
            old = global_state[p.b_key].double() @ global_state[p.a_key].double()
            chain[p.layer] = chain[p.layer] + p.scaling * sum(
                pk * (u[p.b_key].double() @ u[p.a_key].double() - old) for pk, u in zip(w.tolist(), updates, strict=True))
        base_old = {p.layer: model.base_weight(p.layer).detach().clone() for p in pairs}
        agg = aggregate_lora(updates, w, pairs, residual=True, exact=True)
        model.load_trainable(agg.state)  # Method.apply
        model.add_to_base(agg.residuals)
        reported = round_errors(pairs, base_old, {p.layer: model.base_weight(p.layer) for p in pairs}, global_state,
                                model.trainable_state(keys), updates, w)
        acc = model.accumulated_errors()
        global_state = model.trainable_state(keys)
        for p in pairs:
            E = model.effective_weight(p.layer)
            assert model.base_weight(p.layer).dtype == F32 and E.dtype == F64
            err = float((E - chain[p.layer]).norm())
            assert err <= 2 * U * float(chain[p.layer].norm()), (t, p.layer, err)
            assert acc[p.layer].error_norm <= 2 * err + 1e-6 * U * float(E.norm())
            assert err <= 2 * acc[p.layer].error_norm + 1e-6 * U * float(E.norm())
            assert reported[p.layer].in_rounding <= 2.0 + 1e-6
            torch.testing.assert_close(model.exact_weight(p.layer), chain[p.layer], rtol=0, atol=1e-12)
    for prm in model.parameters():
        assert prm.dtype == F32


def test_fedmodel_replicas_stay_bit_identical(make_tiny_model) -> None:
    """A server and three replicas built from the same seed (the Flower clients): one applies every round's
    residual from its factors, one misses rounds and catches up from the factors later, one receives the
    server's accumulator (a dense catch-up) and then continues from factors."""
    server, every, late, dense = (make_tiny_model() for _ in range(4))
    for m in (server, every, late, dense):
        m.enable_exact_base()
    pairs = server.lora_pairs()
    keys = list(server.lora_parameters())
    g = torch_generator(1, "exact-replicas")
    history = []
    for v in range(6):
        updates = [{k: t + torch.randn(t.shape, generator=g) * 0.05 for k, t in server.trainable_state(keys).items()}
                   for _ in range(3)]
        agg = aggregate_lora(updates, normalize_weights([5, 3, 2]), pairs, residual=True, exact=True)
        server.load_trainable(agg.state)
        server.add_to_base(agg.residuals)
        history.append(agg.factors)
        every.add_to_base({p.layer: agg.factors[p.layer].dense(p.scaling) for p in pairs})
        if v == 2:
            dense.exact_base.load_state_dict(server.exact_base.state_dict())
            dense.sync_base()
        elif v > 2:
            dense.add_to_base({p.layer: agg.factors[p.layer].dense(p.scaling) for p in pairs})
    for f in history:  # the late replica: all rounds at the end
        late.add_to_base({p.layer: f[p.layer].dense(p.scaling) for p in pairs})
    for p in pairs:
        for m in (every, late, dense):
            assert torch.equal(m.base_weight(p.layer), server.base_weight(p.layer)), p.layer
            assert torch.equal(m.exact_base.acc[p.layer], server.exact_base.acc[p.layer]), p.layer


def test_fedmodel_without_exact_base_keeps_todays_fold(make_tiny_model) -> None:
    model = make_tiny_model()
    layer = model.lora_pairs()[0].layer
    before = model.base_weight(layer).detach().clone()
    delta = torch.full(before.shape, 1e-3)
    model.add_to_base({layer: delta})
    assert model.exact_base is None and model.accumulated_errors() == {}
    assert torch.equal(model.base_weight(layer), before + delta)
    assert torch.equal(model.exact_weight(layer), model.effective_weight(layer))


def test_exact_base_moves_with_the_model(make_tiny_model) -> None:
    model = make_tiny_model()
    model.enable_exact_base()
    assert model.enable_exact_base() is model.exact_base  # idempotent
    clone = copy.deepcopy(model).to("meta")
    assert all(t.device.type == "meta" for t in clone.exact_base.acc.values())
    assert all(t.dtype == F64 for t in clone.exact_base.acc.values())
