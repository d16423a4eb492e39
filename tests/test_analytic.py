"""The analytic (ridge) classifier: exact federated sums, packing, the solve, ridge=auto, and runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedtalora.analytic import (
    RidgeStatistics,
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
from fedtalora.errors import AggregationError, ConfigError
from fedtalora.partition import partition_task


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
    # upper triangle of a 3 x 3 G (6) + C columns of 2 classes (6), float64, + two int64 counts
    assert statistics_nbytes(3, 2) == (6 + 6) * 8 + 2 * 8
    assert statistics_nbytes(2000, 11) == (2000 * 2001 // 2 + 2000 * 11) * 8 + 11 * 8


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


# --- runs -------------------------------------------------------------------------------------------


def _frozen_run(tmp_path, tiny_overrides, name: str, extra: list[str]):
    from fedtalora.config import resolve
    from fedtalora.engine import prepare, run

    cfg = resolve("demo", [*tiny_overrides, "method=head-only", "fed.rounds_per_task=1", "classifier.kind=analytic",
                           "classifier.ridge=0.5", "classifier.projection_dim=40", "partition.min_samples=2", *extra])
    setup = prepare(cfg)
    result = run(setup, tmp_path / name)
    return setup, result


def test_analytic_run_is_the_centralized_ridge_for_any_partition(tmp_path, tiny_overrides) -> None:
    """End to end with a frozen backbone and a fixed lambda: the same W (1e-6) and predictions for IID,
    Dirichlet 0.05 and quantity 2 with 1 or 10 clients, equal to the centralized ridge of the features."""
    from fedtalora.client import extract_features, predict

    partitions = {
        "iid1": ["partition.kind=iid", "fed.num_clients=1", "fed.clients_per_round=1"],
        "iid10": ["partition.kind=iid", "fed.num_clients=10", "fed.clients_per_round=10"],
        "dir005": ["partition.kind=dirichlet", "partition.beta=0.05", "fed.num_clients=10", "fed.clients_per_round=10"],
        "q2": ["partition.kind=quantity", "partition.alpha=2", "fed.num_clients=10", "fed.clients_per_round=10"],
    }
    weights, preds = {}, {}
    for name, extra in partitions.items():
        setup, result = _frozen_run(tmp_path, tiny_overrides, name, extra)
        method, exp = setup.method, setup.exp
        assert result.metrics["complete"]
        weights[name] = method.weights
        test_idx = np.arange(len(exp.test_targets))
        feats = extract_features(result.model, exp.dataset.test, test_idx, transform=setup.transform, batch_size=256,
                                 device=setup.device)
        preds[name] = predict(result.model, exp.dataset.test, test_idx, num_seen=exp.scenario.num_classes,
                              transform=setup.transform, batch_size=256, device=setup.device, method=method)
        # the analytic uplink is counted in each task's last round
        up = [r["uplink_bytes"] for r in result.metrics["rounds"]]
        assert all(u > 0 for u in up)
    # the centralized reference: all training features at once, numpy closed form
    train_idx = np.arange(len(exp.train_targets))
    x = extract_features(result.model, exp.dataset.train, train_idx, transform=setup.transform, batch_size=256,
                         device=setup.device).double().numpy()
    proj = method.projection(x.shape[1])
    phi = np.maximum(x @ proj.numpy(), 0)
    ref = _ridge_numpy(phi, exp.train_targets, exp.scenario.num_classes, 0.5)
    phi_test = np.maximum(feats.double().numpy() @ proj.numpy(), 0)
    for name in partitions:
        np.testing.assert_allclose(weights[name].numpy(), ref, rtol=1e-6, atol=1e-6, err_msg=name)
        assert np.array_equal(preds[name], (phi_test @ ref).argmax(1)), name


def test_analytic_checkpoint_round_trip(tmp_path, tiny_overrides) -> None:
    from fedtalora.classifier import AnalyticClassifier
    from fedtalora.methods import METHODS

    setup, _ = _frozen_run(tmp_path, tiny_overrides, "ckpt", ["classifier.ridge=auto"])
    method = setup.method
    state = method.checkpoint_state()
    assert state["classifier.gram"].ndim == 1  # the upper triangle only
    fresh = AnalyticClassifier(METHODS.get("head-only")(setup.cfg), projection_dim=40, ridge="auto", seed=setup.cfg.seed)
    fresh.load_checkpoint_state(state)
    torch.testing.assert_close(fresh.stats.gram, method.stats.gram, rtol=0, atol=0)
    torch.testing.assert_close(fresh.weights, method.weights, rtol=0, atol=0)
    assert fresh.lam == method.lam
    from fedtalora.errors import CheckpointError

    other = AnalyticClassifier(METHODS.get("head-only")(setup.cfg), projection_dim=41, ridge="auto")
    with pytest.raises(CheckpointError):
        other.load_checkpoint_state(state)


def test_cli_run_with_the_analytic_classifier(run_cli, tiny_overrides, tmp_path) -> None:
    rc, out, err = run_cli(["run", "demo", *tiny_overrides, "classifier.kind=analytic", "classifier.projection_dim=32",
                            "output.dir=runs", "output.name=a"], cwd=tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "runs" / "a" / "metrics.json").read_text())
    assert m["complete"] and m["final_average_accuracy"] > 0.2  # 10 digit classes: chance is 0.1
    last = [r for r in m["rounds"] if r["round"] == 1]
    first = [r for r in m["rounds"] if r["round"] == 0]
    assert all(a["uplink_bytes"] > b["uplink_bytes"] for a, b in zip(last, first, strict=True))


@pytest.mark.parametrize("bad", ["classifier.ridge=0", "classifier.ridge=-2", "classifier.ridge=often",
                                 "classifier.projection_dim=-1", "classifier.projection_dim=2.5"])
def test_cli_rejects_bad_values_in_one_line(run_cli, tmp_path, bad: str) -> None:
    rc, out, err = run_cli(["run", "demo", "classifier.kind=analytic", bad], cwd=tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert bad.split("=")[0] in lines[0]
