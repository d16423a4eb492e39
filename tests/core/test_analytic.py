"""core.analytic: exact federated ridge sums, packing, the wire format, the solve and ridge=auto."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtalora.core.analytic import (
    RidgeStatistics,
    decode_statistics,
    encode_statistics,
    gcv_curve,
    pack_symmetric,
    project,
    random_projection,
    ridge_scores,
    ridge_statistics,
    select_ridge,
    solve_ridge,
    statistics_nbytes,
    sum_statistics,
    unpack_symmetric,
)
from fedtalora.core.partition import partition_task
from fedtalora.errors import AggregationError, ConfigError


def _ridge_numpy(x: np.ndarray, y: np.ndarray, num_classes: int, lam: float) -> np.ndarray:
    """The centralized reference, written independently: W = (X^T X + lam I)^-1 X^T Y with numpy."""
    onehot = np.eye(num_classes)[y]
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ onehot)


# --- hand-computed examples -----------------------------------------------------------------------


def test_hand_computed_example() -> None:
    # phi = (1,0) class 0, (0,1) class 1, (1,1) class 1; lam = 1
    # G = [[2,1],[1,2]], C = [[1,1],[0,2]], (G + I)^-1 = [[3,-1],[-1,3]] / 8, W = [[3,1],[-1,5]] / 8
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    a = ridge_statistics(phi[[0, 2]], y[[0, 2]], 2)  # client 0
    b = ridge_statistics(phi[[1]], y[[1]], 2)  # client 1
    s = sum_statistics([a, b])
    assert s.gram.tolist() == [[2.0, 1.0], [1.0, 2.0]]
    assert s.corr.tolist() == [[1.0, 1.0], [0.0, 2.0]]
    assert s.counts.tolist() == [1, 2]
    w = solve_ridge(s.gram, s.corr, 1.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0], [-1.0, 5.0]], dtype=torch.float64) / 8)
    scores = ridge_scores(phi, w, s.counts > 0)
    assert scores.argmax(1).tolist() == [0, 1, 1]


def test_statistics_of_a_range_of_head_positions_leave_other_labels_out() -> None:
    phi = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    s = ridge_statistics(phi, torch.tensor([7, 4, 8]), 2, offset=7)  # positions 7, 8; label 4 is left out
    assert s.counts.tolist() == [1, 1]
    assert s.gram.tolist() == [[26.0, 32.0], [32.0, 40.0]]  # (1,2)(1,2)^T + (5,6)(5,6)^T
    assert s.corr.tolist() == [[1.0, 5.0], [2.0, 6.0]]


def test_packing_hand_example_and_round_trip() -> None:
    g = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]], dtype=torch.float64)
    assert pack_symmetric(g).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(unpack_symmetric(pack_symmetric(g), 3), g)
    rng = np.random.default_rng(0)
    for m in (1, 2, 17):
        x = torch.tensor(rng.normal(size=(30, m)))
        gram = x.T @ x
        packed = pack_symmetric(gram)
        assert packed.numel() == m * (m + 1) // 2
        assert torch.equal(unpack_symmetric(packed, m), gram)
    with pytest.raises(ValueError):
        unpack_symmetric(torch.zeros(5), 3)
    with pytest.raises(ValueError):
        pack_symmetric(torch.zeros(2, 3))


def test_uplink_bytes() -> None:
    # upper triangle of a 3 x 3 G (6) + C columns of 2 classes (6), float64, + two int64 counts and indices
    assert statistics_nbytes(3, 2) == (6 + 6) * 8 + 2 * 2 * 8
    assert statistics_nbytes(2000, 11) == (2000 * 2001 // 2 + 2000 * 11) * 8 + 11 * 2 * 8


def test_wire_format_hand_example_round_trip_and_size() -> None:
    # classes 0..3 of a task; the client holds classes 1 and 3 only
    phi = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    s = ridge_statistics(phi, torch.tensor([11, 13, 13]), 4, offset=10)
    msg = encode_statistics(s)
    assert msg["gram"].tolist() == [35.0, 44.0, 56.0]  # G = [[35, 44], [44, 56]]
    assert msg["classes"].tolist() == [1, 3] and msg["counts"].tolist() == [1, 2]
    assert msg["corr"].tolist() == [[1.0, 8.0], [2.0, 10.0]]
    assert sum(t.numel() * t.element_size() for t in msg.values()) == statistics_nbytes(2, 2)
    back = decode_statistics(msg, 4)
    assert torch.equal(back.gram, s.gram) and torch.equal(back.corr, s.corr) and torch.equal(back.counts, s.counts)


@pytest.mark.parametrize("bad", [
    {"gram": torch.zeros(3, dtype=torch.float64)},  # keys missing
    {"gram": torch.zeros(4, dtype=torch.float64), "corr": torch.zeros(2, 1, dtype=torch.float64),
     "counts": torch.ones(1, dtype=torch.int64), "classes": torch.zeros(1, dtype=torch.int64)},  # packed size
    {"gram": torch.zeros(3, dtype=torch.float64), "corr": torch.zeros(2, 1, dtype=torch.float64),
     "counts": torch.ones(1, dtype=torch.int64), "classes": torch.tensor([4])},  # class out of range
    {"gram": torch.zeros(3, dtype=torch.float64), "corr": torch.zeros(2, 2, dtype=torch.float64),
     "counts": torch.ones(2, dtype=torch.int64), "classes": torch.tensor([1, 1])},  # repeated class
    {"gram": torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), "corr": torch.zeros(2, 1, dtype=torch.float64),
     "counts": torch.ones(1, dtype=torch.int64), "classes": torch.zeros(1, dtype=torch.int64)},  # NaN
    {"gram": torch.zeros(3, dtype=torch.float64), "corr": torch.zeros(2, 1, dtype=torch.float64),
     "counts": -torch.ones(1, dtype=torch.int64), "classes": torch.zeros(1, dtype=torch.int64)},  # negative count
    {"gram": torch.zeros(3, dtype=torch.float64), "corr": torch.zeros(2, 1, dtype=torch.float64),
     "counts": torch.ones(1), "classes": torch.zeros(1, dtype=torch.int64)},  # float counts
])
def test_malformed_wire_statistics_are_refused(bad: dict) -> None:
    with pytest.raises(AggregationError):
        decode_statistics(bad, 4)


# --- the projection -------------------------------------------------------------------------------


def test_projection_is_derived_from_the_seed_alone() -> None:
    a, b = random_projection(8, 16, seed=3), random_projection(8, 16, seed=3)
    assert a is not None and b is not None and a.shape == (8, 16) and a.dtype == torch.float64
    assert torch.equal(a, b)
    c = random_projection(8, 16, seed=4)
    assert c is not None and not torch.equal(a, c)
    assert random_projection(8, 0, seed=3) is None
    x = torch.randn(5, 8)
    torch.testing.assert_close(project(x, a), torch.relu(x.double() @ a))
    assert torch.equal(project(x, None), x.double())
    with pytest.raises(ConfigError):
        random_projection(8, -1, seed=0)


# --- exactness over partitions --------------------------------------------------------------------


@pytest.mark.parametrize("projection_dim", [0, 48])
@pytest.mark.parametrize(("kind", "clients", "options"), [
    ("iid", 1, {}), ("iid", 10, {}), ("dirichlet", 10, {"beta": 0.05}), ("quantity", 10, {"alpha": 2}),
])
def test_federated_class_incremental_sums_equal_the_centralized_ridge(kind: str, clients: int, options: dict,
                                                                        projection_dim: int) -> None:
    """Clients x tasks statistics, summed, solve to the joint centralized ridge (numpy) and predict alike."""
    rng = np.random.default_rng(11)
    num_classes, tasks, d, lam = 12, 3, 6, 0.5
    y = np.repeat(np.arange(num_classes), 40)
    centers = rng.normal(size=(num_classes, d)) * 2
    x = (centers[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    proj = random_projection(d, projection_dim, seed=5)
    total: RidgeStatistics | None = None
    per_task = num_classes // tasks
    for t in range(tasks):
        idx = np.flatnonzero(y // per_task == t)
        parts = partition_task(kind, y[idx], clients, np.random.default_rng(t), min_samples=2, **options)
        assert sum(len(p) for p in parts) == len(idx)
        for part in parts:  # each client: its statistics of its data of the task, for the task's positions
            mine = idx[part]
            s = ridge_statistics(project(torch.tensor(x[mine]), proj), torch.tensor(y[mine]), per_task,
                                 offset=t * per_task)
            full = RidgeStatistics(gram=s.gram, corr=torch.zeros(s.dim, num_classes, dtype=torch.float64),
                                   counts=torch.zeros(num_classes, dtype=torch.int64))
            full.corr[:, t * per_task:(t + 1) * per_task] = s.corr
            full.counts[t * per_task:(t + 1) * per_task] = s.counts
            total = full if total is None else sum_statistics([total, full])
    assert total is not None and total.num_samples == len(y)
    w = solve_ridge(total.gram, total.corr, lam).numpy()
    phi = x.astype(np.float64) if proj is None else np.maximum(x.astype(np.float64) @ proj.numpy(), 0)
    ref = _ridge_numpy(phi, y, num_classes, lam)
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-6)
    pred = ridge_scores(torch.tensor(phi), torch.tensor(w), total.counts > 0).argmax(1).numpy()
    assert np.array_equal(pred, (phi @ ref).argmax(1))


@pytest.mark.parametrize("seed", range(3))
def test_sums_are_independent_of_the_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = torch.tensor(rng.normal(size=(100, 5))), torch.tensor(rng.integers(0, 4, size=100))
    owner = rng.integers(0, int(rng.integers(1, 8)), size=100)
    parts = [ridge_statistics(x[owner == k], y[owner == k], 4) for k in np.unique(owner)]
    s, ref = sum_statistics(parts), ridge_statistics(x, y, 4)
    torch.testing.assert_close(s.gram, ref.gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.corr, ref.corr, rtol=1e-12, atol=1e-12)
    assert torch.equal(s.counts, ref.counts)
    sel_a, sel_b = select_ridge(s), select_ridge(ref)
    assert sel_a.lam == pytest.approx(sel_b.lam, rel=1e-9)  # ridge=auto picks the same lambda for any split


def test_bad_client_statistics_are_rejected() -> None:
    a = ridge_statistics(torch.ones(3, 4), torch.tensor([0, 1, 1]), 2)
    b = ridge_statistics(torch.ones(3, 3), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(AggregationError, match="do not match"):
        sum_statistics([a, b])
    bad = RidgeStatistics(gram=a.gram.clone(), corr=a.corr, counts=a.counts)
    bad.gram[0, 0] = float("inf")
    with pytest.raises(AggregationError, match="non-finite"):
        sum_statistics([a, bad])
    with pytest.raises(AggregationError):
        sum_statistics([])


# --- the solve --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lambda_is_a_config_error(lam: float) -> None:
    with pytest.raises(ConfigError, match="classifier.ridge"):
        solve_ridge(torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64), lam)


def test_lambda_too_small_for_the_statistics_is_a_clear_error() -> None:
    # rank 1, eigenvalue 2e12: lam = 1e-9 is 0 next to it in float64 (and G + lam I is singular there)
    v = torch.tensor([[1.0], [1.0]], dtype=torch.float64) * 1e6
    gram = v @ v.T
    with pytest.raises(ConfigError, match="too small for these statistics"):
        solve_ridge(gram, torch.ones(2, 1, dtype=torch.float64), 1e-9)


def test_rounding_negative_eigenvalue_falls_back_to_the_clipped_solution(caplog) -> None:
    # a "Gram" matrix with a tiny negative eigenvalue (what rounding can leave): lam smaller than it
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 3.0]], dtype=torch.float64))
    e = torch.tensor([-1e-3, 1.0, 4.0], dtype=torch.float64)
    gram = q @ torch.diag(e) @ q.T
    corr = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    with caplog.at_level("WARNING", logger="fedtalora.analytic"):
        w = solve_ridge(gram, corr, 1e-4)
    expected = q @ torch.diag(1 / (e.clamp_min(0) + 1e-4)) @ q.T @ corr
    torch.testing.assert_close(w, expected)
    assert "clipped" in caplog.text


def test_solution_satisfies_the_normal_equations() -> None:
    rng = np.random.default_rng(1)
    x, y = torch.tensor(rng.normal(size=(50, 8))), torch.tensor(rng.integers(0, 3, size=50))
    s = ridge_statistics(x, y, 3)
    w = solve_ridge(s.gram, s.corr, 0.3)
    torch.testing.assert_close((s.gram + 0.3 * torch.eye(8, dtype=torch.float64)) @ w, s.corr)


# --- ridge=auto -------------------------------------------------------------------------------------


def test_gcv_equals_its_definition_through_the_hat_matrix() -> None:
    rng = np.random.default_rng(2)
    n, d, c = 40, 6, 3
    x, y = rng.normal(size=(n, d)), rng.integers(0, c, size=n)
    s = ridge_statistics(torch.tensor(x), torch.tensor(y), c)
    lams = [0.01, 0.3, 5.0]
    rss, df, gcv = gcv_curve(s.gram, s.corr, n, lams)
    onehot = np.eye(c)[y]
    for i, lam in enumerate(lams):
        hat = x @ np.linalg.solve(x.T @ x + lam * np.eye(d), x.T)
        r = float(((onehot - hat @ onehot) ** 2).sum())
        t = float(np.trace(hat))
        assert rss[i].item() == pytest.approx(r, rel=1e-9)
        assert df[i].item() == pytest.approx(t, rel=1e-9)
        assert gcv[i].item() == pytest.approx(n * r / (n - t) ** 2, rel=1e-9)


def test_auto_picks_a_smaller_lambda_with_more_signal() -> None:
    """GCV's lambda follows the noise: clean, separable classes get less shrinkage than noisy ones."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 50)
    centers = rng.normal(size=(4, 10)) * 3
    clean = centers[y] + 0.1 * rng.normal(size=(200, 10))
    noisy = centers[y] + 10.0 * rng.normal(size=(200, 10))
    a = select_ridge(ridge_statistics(torch.tensor(clean), torch.tensor(y), 4))
    b = select_ridge(ridge_statistics(torch.tensor(noisy), torch.tensor(y), 4))
    assert a.relative < b.relative
    assert len(a.gcv) == 17 and all(math.isfinite(v) for v in a.gcv)


def test_scores_of_classes_without_samples_are_minus_infinity() -> None:
    scores = ridge_scores(torch.tensor([[1.0, 2.0]]), torch.ones(2, 3, dtype=torch.float64),
                          torch.tensor([True, False, True]))
    assert scores[0, 1] == float("-inf") and scores[0, 0] == 3.0
