"""Tests of fedtalora.aggregation: exact residual (ResWU), naive FedAvg gap, factors, sizes, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from fedtalora.core.aggregation import (
    Aggregate,
    LoraPair,
    aggregate_lora,
    aggregation_errors,
    check_updates,
    fedavg,
    lora_residual,
    normalize_weights,
    relative_aggregation_error,
    residual_factors,
    residual_nbytes,
    residual_rank,
    weighted_average,
)
from fedtalora.errors import AggregationError, FedTaLoRAError
from fedtalora.seeding import torch_generator

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread avoids thread wake-up latency on a busy machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_fro(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius distance computed in float64."""
    got, want = got.to(F64), want.to(F64)
    return float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))


def randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] drawn from ``g``."""
    return int(torch.randint(low, high + 1, (1,), generator=g).item())


def two_client_lora() -> tuple[list[dict[str, torch.Tensor]], LoraPair]:
    """Two rank-1 clients whose products are orthogonal: e1 e1^T and e2 e2^T."""
    u1 = {"l.A": torch.tensor([[1.0, 0.0]]), "l.B": torch.tensor([[1.0], [0.0]])}
    u2 = {"l.A": torch.tensor([[0.0, 1.0]]), "l.B": torch.tensor([[0.0], [1.0]])}
    return [u1, u2], LoraPair("l", "l.A", "l.B", 1.0)


# ---------------------------------------------------------------------------------------------------
# 1. Exactness of the residual over several rounds, with accumulation into the base weight
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_residual_makes_global_exact_weighted_average_over_rounds(seed: int) -> None:
    """Folding W_res into the base makes W_base + s*Bbar@Abar the weighted mean of client models, every round."""
    # Prepare: 1 or 2 adapted layers of random non-square shapes, ranks and scalings, plus a head.
    g = torch_generator(seed, "test", "exactness")
    layers = []
    for i in range(randint(g, 1, 2)):
        d_out, d_in, r = randint(g, 1, 40), randint(g, 1, 40), randint(g, 1, 8)
        s = [0.5, 1.0, 2.0, 3.7][randint(g, 0, 3)]
        pair = LoraPair(f"blk{i}.attn.qkv", f"blk{i}.lora_A", f"blk{i}.lora_B", s)
        layers.append((pair, d_out, d_in, r))
    pairs = [p for p, *_ in layers]
    base = {p.layer: randn(g, d_out, d_in, std=1.0) for p, d_out, d_in, _ in layers}
    glob: dict[str, torch.Tensor] = {"head.weight": randn(g, 5, 7)}
    for p, d_out, d_in, r in layers:
        glob[p.a_key] = randn(g, r, d_in, std=0.3)
        glob[p.b_key] = torch.zeros(d_out, r)  # LoRA init: B = 0

    for rnd in range(5):
        # Prepare: K clients start from the global factors and drift away from them.
        K = randint(g, 1, 6)
        weights = normalize_weights(torch.randint(1, 500, (K,), generator=g).tolist())
        updates = []
        for _ in range(K):
            upd = {k: v + randn(g, *v.shape, std=0.5) for k, v in glob.items()}
            updates.append(upd)
        # Reference (float64): the weighted mean of every client's effective weight.
        expected = {
            p.layer: sum(
                pk * (base[p.layer].to(F64) + p.scaling * u[p.b_key].to(F64) @ u[p.a_key].to(F64))
                for u, pk in zip(updates, weights.tolist(), strict=True)
            )
            for p in pairs
        }

        # Execute
        agg = aggregate_lora(updates, weights, pairs, residual=True)
        for p in pairs:
            base[p.layer] += agg.residuals[p.layer]
        glob = agg.state

        # Assert
        assert set(agg.residuals) == set(agg.errors) == {p.layer for p in pairs}
        for p, d_out, d_in, r in layers:
            assert agg.residuals[p.layer].shape == (d_out, d_in)
            assert agg.residuals[p.layer].dtype == torch.float32
            assert agg.residual_ranks[p.layer] == (K - 1) * r
            effective = base[p.layer].to(F64) + p.scaling * glob[p.b_key].to(F64) @ glob[p.a_key].to(F64)
            err = rel_fro(effective, expected[p.layer])
            assert err <= 1e-5, f"round {rnd}, layer {p.layer}: global model is off by {err:.2e}"
            assert 0.0 <= agg.errors[p.layer] <= 1e-5, f"round {rnd}: reported error {agg.errors[p.layer]}"
        assert agg.max_error == max(agg.errors.values())
        torch.testing.assert_close(
            glob["head.weight"], weighted_average([u["head.weight"] for u in updates], weights), rtol=0, atol=0
        )


# ---------------------------------------------------------------------------------------------------
# 2. Without the residual, naive averaging is not the average of the products
# ---------------------------------------------------------------------------------------------------


def test_naive_average_is_inexact_without_residual() -> None:
    """Averaging B and A separately loses part of the update; the error is reported and no residual given."""
    # Prepare: mean of products = I/2, product of means = ones/4, so error = |[[.25,-.25],[-.25,.25]]| / |I/2|.
    updates, pair = two_client_lora()
    weights = normalize_weights([1, 1])

    # Execute
    agg = aggregate_lora(updates, weights, [pair], residual=False)

    # Assert
    assert agg.residuals == {}
    assert agg.residual_ranks == {"l": 1}
    assert agg.errors["l"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert agg.errors["l"] > 1e-3
    naive = agg.state["l.B"] @ agg.state["l.A"]
    torch.testing.assert_close(naive, torch.full((2, 2), 0.25))
    assert not torch.allclose(naive, 0.5 * torch.eye(2), atol=1e-3), "effective weights differ"
    # The same round with the residual closes exactly that gap.
    exact = aggregate_lora(updates, weights, [pair], residual=True)
    torch.testing.assert_close(naive + exact.residuals["l"], 0.5 * torch.eye(2), rtol=0, atol=1e-7)
    assert exact.errors["l"] <= 1e-7


@pytest.mark.parametrize("seed", range(3))
def test_naive_error_on_random_clients_is_large(seed: int) -> None:
    """For generic random clients the naive FedAvg error is well above rounding, and the residual removes it."""
    # Prepare
    g = torch_generator(seed, "test", "naive")
    pair = LoraPair("l", "A", "B", 2.0)
    updates = [{"A": randn(g, 4, 17), "B": randn(g, 23, 4)} for _ in range(4)]
    weights = normalize_weights([5, 1, 3, 2])

    # Execute
    naive = aggregate_lora(updates, weights, [pair], residual=False)
    exact = aggregate_lora(updates, weights, [pair], residual=True)

    # Assert
    assert naive.errors["l"] > 1e-1
    assert exact.errors["l"] < 1e-5
    assert naive.residuals == {}
    torch.testing.assert_close(naive.state["A"], exact.state["A"], rtol=0, atol=0)
    torch.testing.assert_close(naive.state["B"], exact.state["B"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# 3. One client
# ---------------------------------------------------------------------------------------------------


def test_single_client_is_identity() -> None:
    """With one client the global state is its update, the residual vanishes and the error is zero."""
    # Prepare
    g = torch_generator(0, "test", "single")
    pair = LoraPair("l", "A", "B", 3.7)
    upd = {"A": randn(g, 6, 13), "B": randn(g, 9, 6), "head": randn(g, 3, 4)}

    # Execute
    agg = aggregate_lora([upd], normalize_weights([42]), [pair], residual=True)

    # Assert
    assert set(agg.state) == set(upd)
    for k, v in upd.items():
        assert torch.equal(agg.state[k], v), k
    assert agg.state["A"] is not upd["A"], "a new tensor, not an alias of the client's"
    assert torch.equal(agg.residuals["l"], torch.zeros(9, 13)), "one client: the residual is exactly zero"
    assert agg.factors["l"][0].shape == (9, 0) and agg.factors["l"][1].shape == (0, 13)
    assert agg.errors["l"] <= 1e-7
    assert agg.residual_ranks["l"] == 0


# ---------------------------------------------------------------------------------------------------
# 4. Hand-computed example
# ---------------------------------------------------------------------------------------------------


def test_hand_computed_two_clients() -> None:
    """counts (3, 1) -> p = (.75, .25), s = 2: Bbar, Abar and W_res match the hand computation exactly."""
    # Prepare
    B1, A1 = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 2.0]])
    B2, A2 = torch.tensor([[-2.0], [4.0]]), torch.tensor([[3.0, -2.0]])
    # Bbar = .75*[2,0] + .25*[-2,4] = [1, 1];  Abar = .75*[1,2] + .25*[3,-2] = [1.5, 1]
    Bbar = torch.tensor([[1.0], [1.0]])
    Abar = torch.tensor([[1.5, 1.0]])
    # B1A1 = [[2,4],[0,0]], B2A2 = [[-6,4],[12,-8]] -> mean = .75*B1A1 + .25*B2A2 = [[0,4],[3,-2]]
    # Bbar Abar = [[1.5,1],[1.5,1]] -> W_res = 2 * ([[0,4],[3,-2]] - [[1.5,1],[1.5,1]]) = [[-3,6],[3,-6]]
    W_res = torch.tensor([[-3.0, 6.0], [3.0, -6.0]])
    weights = normalize_weights([3, 1])
    pair = LoraPair("fc", "fc.A", "fc.B", 2.0)
    updates = [{"fc.A": A1, "fc.B": B1}, {"fc.A": A2, "fc.B": B2}]

    # Execute
    res = lora_residual([B1, B2], [A1, A2], weights, 2.0)
    agg = aggregate_lora(updates, weights, [pair], residual=True)

    # Assert
    assert weights.dtype == F64 and weights.tolist() == [0.75, 0.25]
    assert torch.equal(res, W_res)
    assert torch.equal(agg.state["fc.B"], Bbar)
    assert torch.equal(agg.state["fc.A"], Abar)
    assert torch.equal(agg.residuals["fc"], W_res)
    assert agg.residual_ranks["fc"] == 1
    # One factor pair, reference client 1 (p = .75): L = .25 (B2 - B1) = [[-1], [1]], R = A2 - Abar = [[1.5, -3]].
    L, R = agg.factors["fc"]
    assert torch.equal(L, torch.tensor([[-1.0], [1.0]])) and torch.equal(R, torch.tensor([[1.5, -3.0]]))
    assert torch.equal(2.0 * L @ R, W_res)
    assert agg.errors["fc"] == 0.0
    # Global update 2*Bbar@Abar + W_res = 2*[[0,4],[3,-2]] = the weighted mean of the client updates.
    assert torch.equal(2.0 * Bbar @ Abar + W_res, torch.tensor([[0.0, 8.0], [6.0, -4.0]]))


# ---------------------------------------------------------------------------------------------------
# 5. Errors
# ---------------------------------------------------------------------------------------------------


def test_mismatched_keys_raise_naming_the_key() -> None:
    """An update that lacks or adds a key is rejected, and the message names that key."""
    # Prepare
    a = {"l.A": torch.zeros(1, 2), "l.B": torch.zeros(2, 1), "head": torch.zeros(3)}
    missing = {"l.A": torch.zeros(1, 2), "l.B": torch.zeros(2, 1)}
    extra = {**a, "bonus": torch.zeros(1)}
    w = normalize_weights([1, 1])

    # Execute / Assert
    with pytest.raises(AggregationError, match="head"):
        fedavg([a, missing], w)
    with pytest.raises(AggregationError, match="bonus"):
        aggregate_lora([a, extra], w, [], residual=True)
    with pytest.raises(AggregationError, match="update 1"):
        check_updates([a, missing])


def test_mismatched_shape_and_dtype_raise_naming_the_key() -> None:
    """Different shapes or dtypes for the same key are rejected with the key in the message."""
    # Prepare
    a = {"l.A": torch.zeros(2, 5), "l.B": torch.zeros(4, 2)}
    bad_shape = {"l.A": torch.zeros(2, 6), "l.B": torch.zeros(4, 2)}
    bad_dtype = {"l.A": torch.zeros(2, 5), "l.B": torch.zeros(4, 2, dtype=torch.float64)}
    w = normalize_weights([1, 1])
    pair = LoraPair("l", "l.A", "l.B", 1.0)

    # Execute / Assert
    with pytest.raises(AggregationError, match=r"l\.A.*\(2, 6\).*\(2, 5\)"):
        aggregate_lora([a, bad_shape], w, [pair], residual=True)
    with pytest.raises(AggregationError, match=r"l\.B.*float64.*float32"):
        aggregate_lora([a, bad_dtype], w, [pair], residual=True)


def test_zero_updates_raise() -> None:
    """Aggregating nothing is an AggregationError, not an IndexError."""
    with pytest.raises(AggregationError, match="zero client updates"):
        fedavg([], torch.ones(0, dtype=F64))
    with pytest.raises(AggregationError, match="zero client updates"):
        aggregate_lora([], torch.ones(0, dtype=F64), [], residual=True)
    with pytest.raises(AggregationError, match="zero client updates"):
        check_updates([])


def test_weights_of_wrong_length_raise() -> None:
    """As many weights as updates are required."""
    # Prepare
    upd = {"l.A": torch.ones(1, 2), "l.B": torch.ones(2, 1)}
    pair = LoraPair("l", "l.A", "l.B", 1.0)

    # Execute / Assert
    with pytest.raises(AggregationError, match="2 updates but 3 weights"):
        aggregate_lora([upd, upd], normalize_weights([1, 1, 1]), [pair], residual=True)
    with pytest.raises(AggregationError, match="2 tensors but 1 weights"):
        weighted_average([upd["l.A"], upd["l.A"]], normalize_weights([1]))


@pytest.mark.parametrize(
    "counts", [[1, -1], [3, float("nan")], [float("inf"), 1], [0, 0], [0.0], [], [-2, -3]],
)
def test_normalize_weights_rejects_invalid_counts(counts: list[float]) -> None:
    """Negative, non-finite, all-zero or empty counts cannot make aggregation weights."""
    with pytest.raises(AggregationError):
        normalize_weights(counts)


def test_aggregation_error_is_a_user_facing_value_error() -> None:
    """AggregationError is caught by both `except ValueError` and the library's base error."""
    with pytest.raises(ValueError):
        normalize_weights([0, 0])
    assert issubclass(AggregationError, FedTaLoRAError)


def test_missing_lora_key_raises_naming_key_and_layer() -> None:
    """A LoraPair whose A or B key is not in the updates is rejected with the key and layer named."""
    # Prepare
    upd = {"l.A": torch.ones(1, 2), "l.B": torch.ones(2, 1)}
    w = normalize_weights([1, 2])

    # Execute / Assert
    with pytest.raises(AggregationError, match=r"'l\.lora_B'.*'attn'"):
        aggregate_lora([upd, upd], w, [LoraPair("attn", "l.A", "l.lora_B", 1.0)], residual=True)
    with pytest.raises(AggregationError, match=r"'x\.A'.*'mlp'"):
        aggregate_lora([upd, upd], w, [LoraPair("mlp", "x.A", "l.B", 1.0)], residual=False)


# ---------------------------------------------------------------------------------------------------
# 6. weighted_average / fedavg / normalize_weights
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_average_of_identical_tensors_is_that_tensor(dtype: torch.dtype) -> None:
    """The average of K copies of t is exactly t, in t's dtype, whatever the (normalised) weights."""
    # Prepare
    g = torch_generator(1, "test", "identical")
    t = randn(g, 7, 3, std=10.0).to(dtype)
    weights = normalize_weights(torch.randint(1, 1000, (5,), generator=g).tolist())

    # Execute
    out = weighted_average([t.clone() for _ in range(5)], weights)

    # Assert
    assert out.dtype == dtype
    if dtype == F64:  # sum_k p_k is 1 only up to float64 rounding
        torch.testing.assert_close(out, t, rtol=1e-14, atol=0)
    else:  # the float64 accumulation error is far below one ulp of the narrower dtype
        assert torch.equal(out, t)


def test_weighted_average_matches_float64_reference() -> None:
    """weighted_average is sum_k p_k t_k (not an unweighted mean)."""
    # Prepare
    ts = [torch.full((2,), 1.0), torch.full((2,), 5.0)]
    weights = normalize_weights([3, 1])

    # Execute / Assert
    assert torch.equal(weighted_average(ts, weights), torch.full((2,), 2.0))  # .75*1 + .25*5


@pytest.mark.parametrize("seed", range(5))
def test_fedavg_is_permutation_invariant(seed: int) -> None:
    """Permuting clients together with their weights does not change the average."""
    # Prepare
    g = torch_generator(seed, "test", "perm")
    K = 6
    updates = [{"a": randn(g, 8, 3), "b": randn(g, 11)} for _ in range(K)]
    weights = normalize_weights(torch.randint(1, 100, (K,), generator=g).tolist())
    perm = torch.randperm(K, generator=g).tolist()

    # Execute
    ref = fedavg(updates, weights)
    out = fedavg([updates[i] for i in perm], weights[perm])

    # Assert
    assert perm != list(range(K))
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-6)


def test_weights_are_invariant_to_scaling_of_counts() -> None:
    """p_k = n_k / sum(n): multiplying every count by a constant changes nothing."""
    # Prepare
    g = torch_generator(2, "test", "scale")
    counts = [3.0, 10.0, 1.0, 6.0]
    updates = [{"a": randn(g, 4, 4)} for _ in counts]

    # Execute
    w1 = normalize_weights(counts)
    w2 = normalize_weights([c * 7.5 for c in counts])
    w3 = normalize_weights(torch.tensor(counts, dtype=torch.float32) / 1000)

    # Assert
    torch.testing.assert_close(w1, torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-15)
    torch.testing.assert_close(w3, w1, rtol=0, atol=1e-7)
    assert float(w1.sum()) == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(fedavg(updates, w2)["a"], fedavg(updates, w1)["a"], rtol=0, atol=1e-6)


def test_normalize_weights_accepts_zero_counts_among_positive() -> None:
    """A client with zero samples gets weight zero and does not contribute."""
    # Prepare
    updates = [{"a": torch.ones(3)}, {"a": torch.full((3,), 100.0)}]

    # Execute
    w = normalize_weights([4, 0])

    # Assert
    assert w.tolist() == [1.0, 0.0]
    assert torch.equal(fedavg(updates, w)["a"], torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# 7. Residual factors and sizes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "d_out", "d_in", "r"), [(1, 5, 9, 2), (3, 17, 4, 3), (5, 1, 30, 8), (6, 12, 12, 1)])
def test_residual_factors_shapes_and_product(K: int, d_out: int, d_in: int, r: int) -> None:
    """L @ R = sum_k p_k B_k A_k - Bbar Abar, with L (d_out, (K-1) r) and R ((K-1) r, d_in)."""
    # Prepare
    g = torch_generator(K, "test", "factors")
    Bs = [randn(g, d_out, r) for _ in range(K)]
    As = [randn(g, r, d_in) for _ in range(K)]
    weights = normalize_weights(torch.randint(1, 50, (K,), generator=g).tolist())
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)
    want = sum(p * B.to(F64) @ A.to(F64) for B, A, p in zip(Bs, As, weights.tolist(), strict=True))
    want = want - Bbar.to(F64) @ Abar.to(F64)

    # Execute
    L, R = residual_factors(Bs, As, weights, Bbar, Abar)

    # Assert
    assert L.shape == (d_out, (K - 1) * r)
    assert R.shape == ((K - 1) * r, d_in)
    assert L.dtype == R.dtype == torch.float32
    assert residual_rank(weights, r) == (K - 1) * r
    scale = max(float(B.abs().max()) * float(A.abs().max()) for B, A in zip(Bs, As, strict=True)) * r
    torch.testing.assert_close((L @ R).to(F64), want, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(lora_residual(Bs, As, weights, 2.5).to(F64), 2.5 * want, rtol=0, atol=3e-5 * scale)


@pytest.mark.parametrize("seed", range(8))
def test_compact_factors_are_as_exact_as_the_k_plus_1_form(seed: int) -> None:
    """The (K-1) r factors lose no more than rounding: the aggregation error stays ~1e-7, like the
    (K+1) r form [p_k B_k, -Bbar] [A_k; Abar] built from the same rounded averages."""
    # Prepare: ViT-like scales (A ~ kaiming-ish, B small and drifting), up to 12 clients of rank <= 8.
    g = torch_generator(seed, "test", "compact")
    K, r = randint(g, 2, 12), randint(g, 1, 8)
    d_out, d_in = randint(g, 16, 96), randint(g, 16, 96)
    Bs = [randn(g, d_out, r, std=0.02) for _ in range(K)]
    As = [randn(g, r, d_in, std=d_in ** -0.5) for _ in range(K)]
    weights = normalize_weights(torch.randint(1, 500, (K,), generator=g).tolist())
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)
    p = weights.tolist()
    wide_L = torch.cat([B * float(pk) for B, pk in zip(Bs, p, strict=True)] + [-Bbar], dim=1)
    wide_R = torch.cat([*As, Abar], dim=0)

    # Execute
    L, R = residual_factors(Bs, As, weights, Bbar, Abar)
    compact = relative_aggregation_error(Bs, As, weights, 1.0, Bbar, Abar, L @ R)
    wide = relative_aggregation_error(Bs, As, weights, 1.0, Bbar, Abar, wide_L @ wide_R)

    # Assert
    assert L.shape[1] == (K - 1) * r < wide_L.shape[1] == (K + 1) * r
    assert compact <= 1e-6, compact
    assert compact <= 10 * max(wide, 1e-8), (compact, wide)


def test_zero_weight_clients_drop_out_of_the_factors() -> None:
    """Clients of weight 0 add no columns; the reference is the heaviest client; the product is unchanged."""
    # Prepare: 4 clients, two of weight 0 (their factors are huge, so any leak would show).
    g = torch_generator(0, "test", "zero-weight")
    Bs = [randn(g, 7, 2) for _ in range(4)]
    As = [randn(g, 2, 5) for _ in range(4)]
    Bs[1], As[1] = Bs[1] * 1e6, As[1] * 1e6
    weights = normalize_weights([3, 0, 1, 0])
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)
    want = 0.75 * Bs[0].to(F64) @ As[0].to(F64) + 0.25 * Bs[2].to(F64) @ As[2].to(F64) \
        - Bbar.to(F64) @ Abar.to(F64)

    # Execute
    L, R = residual_factors(Bs, As, weights, Bbar, Abar)

    # Assert: one pair of rank-2 factors: L = .25 (B_2 - B_0), R = A_2 - Abar
    assert L.shape == (7, 2) and R.shape == (2, 5)
    assert residual_rank(weights, 2) == 2
    torch.testing.assert_close(L, 0.25 * (Bs[2] - Bs[0]))
    torch.testing.assert_close(R, As[2] - Abar)
    torch.testing.assert_close((L @ R).to(F64), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_factors_product_is_invariant_to_client_order(seed: int) -> None:
    """Permuting the clients (and so, on ties, the reference) changes L @ R only by rounding."""
    # Prepare
    g = torch_generator(seed, "test", "order")
    K = randint(g, 2, 7)
    Bs = [randn(g, 11, 3) for _ in range(K)]
    As = [randn(g, 3, 13) for _ in range(K)]
    counts = torch.randint(1, 4, (K,), generator=g).tolist()  # ties likely
    perm = torch.randperm(K, generator=g).tolist()

    def product(order: list[int]) -> torch.Tensor:
        w = normalize_weights([counts[i] for i in order])
        b, a = [Bs[i] for i in order], [As[i] for i in order]
        L, R = residual_factors(b, a, w, weighted_average(b, w), weighted_average(a, w))
        return (L @ R).to(F64)

    # Execute / Assert
    torch.testing.assert_close(product(perm), product(list(range(K))), rtol=0, atol=1e-5)


def test_residual_factors_reject_mismatched_lengths() -> None:
    with pytest.raises(AggregationError, match="weights"):
        residual_factors([torch.zeros(2, 1)] * 2, [torch.zeros(1, 3)] * 2, normalize_weights([1, 1, 1]),
                         torch.zeros(2, 1), torch.zeros(1, 3))


def test_residual_nbytes_known_case() -> None:
    """ViT-B MLP fc1 (768 x 3072), inner 88: dense vs factored bytes in float32 and bfloat16."""
    assert residual_nbytes(768, 3072, 88) == (768 * 3072 * 4, (768 + 3072) * 88 * 4)
    assert residual_nbytes(768, 3072, 88) == (9_437_184, 1_351_680)
    assert residual_nbytes(768, 3072, 88, element_size=2) == (4_718_592, 675_840)
    assert residual_nbytes(10, 20, 0) == (800, 0)


# ---------------------------------------------------------------------------------------------------
# 8. relative_aggregation_error
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_relative_error_without_residual_matches_float64_dense(seed: int) -> None:
    """For residual=None the error is |s Bbar Abar - s sum p B A| / |s sum p B A| computed in float64."""
    # Prepare
    g = torch_generator(seed, "test", "relerr")
    K, d_out, d_in, r, s = 3, 14, 9, 4, 3.7
    Bs = [randn(g, d_out, r) for _ in range(K)]
    As = [randn(g, r, d_in) for _ in range(K)]
    weights = normalize_weights([2, 5, 3])
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)
    target = s * sum(p * B.double() @ A.double() for B, A, p in zip(Bs, As, weights.tolist(), strict=True))
    got = s * Bbar.double() @ Abar.double()
    want = float(torch.linalg.matrix_norm(got - target) / torch.linalg.matrix_norm(target))

    # Execute
    err = relative_aggregation_error(Bs, As, weights, s, Bbar, Abar, None)
    err_exact = relative_aggregation_error(Bs, As, weights, s, Bbar, Abar, lora_residual(Bs, As, weights, s))

    # Assert
    assert err == pytest.approx(want, rel=1e-10)
    assert err > 1e-2
    assert err_exact < 1e-6


def test_relative_error_zero_over_zero_is_zero() -> None:
    """When every client's update is zero (B = 0, the LoRA init), the error is 0.0, not NaN."""
    # Prepare
    Bs = [torch.zeros(3, 2), torch.zeros(3, 2)]
    As = [torch.ones(2, 4), -torch.ones(2, 4)]
    weights = normalize_weights([1, 3])
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)

    # Execute
    err = relative_aggregation_error(Bs, As, weights, 2.0, Bbar, Abar, None)
    agg = aggregate_lora(
        [{"A": a, "B": b} for a, b in zip(As, Bs, strict=True)], weights, [LoraPair("l", "A", "B", 2.0)],
        residual=True,
    )

    # Assert
    assert err == 0.0
    assert agg.errors["l"] == 0.0
    assert isinstance(agg, Aggregate) and agg.max_error == 0.0


def test_relative_error_zero_target_nonzero_gap_is_inf() -> None:
    """Clients whose updates cancel (sum p B A = 0) but whose naive product does not: error is inf."""
    # Prepare: p = (.5, .5); B1A1 = 1, B2A2 = -1 -> target 0; Bbar Abar = 1.5 * 0.25 = 0.375.
    Bs = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    As = [torch.tensor([[1.0]]), torch.tensor([[-0.5]])]
    weights = normalize_weights([1, 1])
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)

    # Execute
    err = relative_aggregation_error(Bs, As, weights, 1.0, Bbar, Abar, None)

    # Assert
    assert float(Bbar) == 1.5 and float(Abar) == 0.25
    assert err == float("inf")


def test_naive_loss_hand_example() -> None:
    """p = (.5, .5), B1 A1 = 2 * 1, B2 A2 = 0 * 3: target 1; Bbar Abar = 1 * 2 = 2 -> naive loses |2 - 1| / 1."""
    # Prepare
    Bs = [torch.tensor([[2.0]]), torch.tensor([[0.0]])]
    As = [torch.tensor([[1.0]]), torch.tensor([[3.0]])]
    weights = normalize_weights([1, 1])
    Bbar, Abar = weighted_average(Bs, weights), weighted_average(As, weights)
    res = lora_residual(Bs, As, weights, 1.0)

    # Execute
    err, naive = aggregation_errors(Bs, As, weights, 1.0, Bbar, Abar, res)
    plain = aggregation_errors(Bs, As, weights, 1.0, Bbar, Abar, None)

    # Assert
    assert float(res) == -1.0
    assert naive == 1.0 and plain == (1.0, 1.0)
    assert err == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_aggregate_reports_the_naive_loss_with_and_without_the_residual(seed: int) -> None:
    """Aggregate.naive_errors is what averaging the factors alone loses, whether or not the residual is on."""
    # Prepare
    g = torch_generator(seed, "test", "naive")
    updates = [{"A": randn(g, 4, 7), "B": randn(g, 5, 4)} for _ in range(3)]
    weights = normalize_weights([1, 2, 4])
    pairs = [LoraPair("l", "A", "B", 0.5)]

    # Execute
    with_res = aggregate_lora(updates, weights, pairs, residual=True)
    without = aggregate_lora(updates, weights, pairs, residual=False)

    # Assert
    want = relative_aggregation_error([u["B"] for u in updates], [u["A"] for u in updates], weights, 0.5,
                                      without.state["B"], without.state["A"], None)
    assert with_res.naive_errors["l"] == pytest.approx(want, rel=1e-12)
    assert without.naive_errors["l"] == without.errors["l"] == pytest.approx(want, rel=1e-12)
    assert with_res.errors["l"] < 1e-6 < 1e-2 < want
    assert with_res.max_naive_error == with_res.naive_errors["l"]


def test_aggregation_state_does_not_alias_or_mutate_inputs() -> None:
    """aggregate_lora is pure: the client updates are unchanged afterwards."""
    # Prepare
    g = torch_generator(3, "test", "pure")
    updates = [{"A": randn(g, 2, 5), "B": randn(g, 4, 2)} for _ in range(3)]
    before = [{k: v.clone() for k, v in u.items()} for u in updates]

    # Execute
    agg = aggregate_lora(updates, normalize_weights([1, 2, 3]), [LoraPair("l", "A", "B", 1.0)], residual=True)
    agg.state["A"].add_(1.0)

    # Assert
    for u, b in zip(updates, before, strict=True):
        for k in u:
            assert torch.equal(u[k], b[k])
