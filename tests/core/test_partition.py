"""Tests of fedtalora.partition: exact-once assignment, class quotas, skew, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedtalora.core.partition import (
    class_counts,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    partition_task,
    skew,
)
from fedtalora.errors import ConfigError, DataError, PartitionError
from fedtalora.seeding import numpy_rng

KINDS = {
    "iid": {},
    "quantity": {"alpha": 3},  # 3 clients x 3 >= the at most 8 classes of random_labels
    "dirichlet": {"beta": 0.3, "min_samples": 2},
}


def random_labels(seed: int) -> np.ndarray:
    """A task of 3..8 classes (non-contiguous original ids) with 12..60 samples each, shuffled."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(3, 9))
    ids = np.sort(rng.choice(100, size=c, replace=False))
    labels = np.repeat(ids, rng.integers(12, 61, size=c))
    return rng.permutation(labels)


def assert_exact_once(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicates"
    allpos = np.concatenate(parts)
    assert allpos.size == n, "no position is dropped or duplicated across clients"
    np.testing.assert_array_equal(np.sort(allpos), np.arange(n))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("num_clients", [3, 5])
def test_every_position_assigned_exactly_once(kind: str, seed: int, num_clients: int) -> None:
    labels = random_labels(seed)
    parts = partition_task(kind, labels, num_clients, numpy_rng(seed, "part", kind), **KINDS[kind])
    assert len(parts) == num_clients
    assert_exact_once(parts, labels.size)


@pytest.mark.parametrize(
    ("num_clients", "alpha", "c"),
    [(5, 2, 10), (10, 2, 10), (4, 3, 10), (3, 1, 3), (7, 3, 5), (2, 5, 5), (10, 1, 4), (6, 4, 9)],
)
def test_quantity_gives_exactly_alpha_classes_per_client(num_clients: int, alpha: int, c: int) -> None:
    rng = np.random.default_rng(c * 100 + num_clients * 10 + alpha)
    ids = rng.choice(50, size=c, replace=False)
    labels = rng.permutation(np.repeat(ids, 30))
    parts = partition_quantity(labels, num_clients, alpha, rng)
    assert_exact_once(parts, labels.size)
    counts = class_counts(labels, parts)
    assert all(len(cc) == alpha for cc in counts)
    holders = {int(k): sum(int(k) in cc for cc in counts) for k in ids}
    lo, hi = (num_clients * alpha) // c, -(-(num_clients * alpha) // c)
    assert all(lo <= h <= hi for h in holders.values()), holders
    # each class is split as evenly as possible among its holders
    for k in ids:
        sizes = [cc[int(k)] for cc in counts if int(k) in cc]
        assert max(sizes) - min(sizes) <= 1


def test_quantity_hand_computed_example() -> None:
    # classes 3 and 7 (5 and 4 samples), 3 clients, alpha=1: cyclic assignment gives the first class of
    # the random permutation to clients 0 and 2 (client 0 takes the extra sample), the second to client 1.
    labels = np.array([3, 7, 3, 3, 7, 3, 7, 3, 7])
    options = [
        [{3: 3}, {7: 4}, {3: 2}],  # permutation (3, 7)
        [{7: 2}, {3: 5}, {7: 2}],  # permutation (7, 3)
    ]
    seen = set()
    for seed in range(20):
        counts = class_counts(labels, partition_quantity(labels, 3, 1, np.random.default_rng(seed)))
        assert counts in options
        seen.add(options.index(counts))
    assert seen == {0, 1}, "both class permutations occur over 20 seeds"


def test_quantity_all_classes_splits_every_class_evenly() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    parts = partition_quantity(labels, 2, 3, np.random.default_rng(0))
    assert class_counts(labels, parts) == [{0: 2, 1: 1, 2: 3}, {0: 2, 1: 1, 2: 3}]


def test_iid_hand_computed_sizes_and_counts() -> None:
    labels = np.array([5, 5, 5, 5, 5, 5, 5])
    parts = partition_iid(labels, 3, np.random.default_rng(1))
    assert [p.size for p in parts] == [3, 2, 2]
    assert class_counts(labels, parts) == [{5: 3}, {5: 2}, {5: 2}]


def test_class_counts_and_skew_on_fixed_parts() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 4]), np.array([3, 5])]
    assert class_counts(labels, parts) == [{0: 2}, {1: 1, 2: 1}, {1: 1, 2: 1}]
    # TV distances to (1/3, 1/3, 1/3): 2/3, 1/3, 1/3
    assert skew(labels, parts) == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert skew(labels, [np.array([0, 2, 4]), np.array([1, 3, 5])]) == pytest.approx(0.0)
    with pytest.raises(PartitionError, match="outside"):
        class_counts(labels, [np.array([0, 6])])


def test_smaller_beta_is_more_skewed() -> None:
    labels = np.repeat(np.arange(10), 50)

    def mean_skew(beta: float) -> float:
        return float(
            np.mean(
                [
                    skew(
                        labels,
                        partition_dirichlet(labels, 10, beta, numpy_rng(seed, "beta", beta), min_samples=5),
                    )
                    for seed in range(20)
                ]
            )
        )

    low, mid, high = mean_skew(0.05), mean_skew(0.5), mean_skew(10.0)
    assert low > mid > high
    assert low > high + 0.4
    iid = np.mean([skew(labels, partition_iid(labels, 10, numpy_rng(s, "iid"))) for s in range(20)])
    assert low > iid + 0.4


def test_dirichlet_respects_min_samples() -> None:
    labels = np.repeat(np.arange(5), 40)
    for seed in range(5):
        parts = partition_dirichlet(labels, 8, 0.1, np.random.default_rng(seed), min_samples=10)
        assert min(p.size for p in parts) >= 10
        assert_exact_once(parts, labels.size)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_seed_same_partition_different_seed_different(kind: str) -> None:
    labels = random_labels(123)

    def run(seed: int) -> list[np.ndarray]:
        return partition_task(kind, labels, 4, numpy_rng(seed, "partition"), **KINDS[kind])

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_too_many_clients() -> None:
    with pytest.raises(PartitionError, match=r"fed\.num_clients=6 exceeds the 5"):
        partition_iid(np.zeros(5, dtype=np.int64), 6, np.random.default_rng(0))
    with pytest.raises(PartitionError, match=r"fed\.num_clients=0"):
        partition_iid(np.zeros(5, dtype=np.int64), 0, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("labels", "num_clients", "alpha", "match"),
    [
        (np.repeat([0, 1], 10), 3, 5, r"partition\.alpha=5 exceeds the 2 classes of a task"),
        (np.repeat([0, 1], 10), 3, 0, r"partition\.alpha=0 must be at least 1"),
        (
            np.repeat([0, 1, 2], 10),
            2,
            1,
            r"fed\.num_clients=2 x partition\.alpha=1 = 2 is below the 3 classes",
        ),
        (np.array([0] * 10 + [1]), 4, 2, r"class 1 has 1 samples .* 4 holders"),
    ],
)
def test_quantity_impossible_requests(labels: np.ndarray, num_clients: int, alpha: int, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        partition_quantity(labels, num_clients, alpha, np.random.default_rng(0))


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_bad_beta(beta: float) -> None:
    with pytest.raises(PartitionError, match=r"partition\.beta"):
        partition_dirichlet(np.repeat([0, 1], 20), 2, beta, np.random.default_rng(0))


def test_dirichlet_obviously_impossible_min_samples_fails_without_drawing() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(
        PartitionError, match=r"partition\.min_samples=10 x fed\.num_clients=5 = 50 exceeds the 40"
    ):
        partition_dirichlet(np.repeat([0, 1], 20), 5, 1.0, rng, min_samples=10)
    assert rng.bit_generator.state == state, "no draw was made"


def test_dirichlet_unreachable_min_samples_gives_up_after_max_redraws() -> None:
    # 100 samples, 10 clients, min 5 each is arithmetically possible, but with 2 classes and a tiny
    # beta each class lands (almost) entirely on one client, so no draw can succeed.
    labels = np.repeat([0, 1], 50)
    with pytest.raises(
        PartitionError, match=r"partition\.max_redraws=20 .*partition\.min_samples.*partition\.beta"
    ):
        partition_dirichlet(labels, 10, 0.001, np.random.default_rng(0), min_samples=5, max_redraws=20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"min_samples": -1}, r"partition\.min_samples=-1"), ({"max_redraws": 0}, r"partition\.max_redraws=0")],
)
def test_dirichlet_bad_limits(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        partition_dirichlet(np.repeat([0, 1], 20), 2, 1.0, np.random.default_rng(0), **kwargs)


def test_dirichlet_tiny_beta_still_assigns_everything() -> None:
    labels = np.repeat(np.arange(6), 30)
    parts = partition_dirichlet(labels, 12, 1e-4, np.random.default_rng(3), min_samples=0)
    assert_exact_once(parts, labels.size)


def test_partition_task_dispatch_and_errors() -> None:
    labels = random_labels(5)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    via_task = partition_task("quantity", labels, 3, rng_a, alpha=3)
    direct = partition_quantity(labels, 3, 3, rng_b)
    assert all(np.array_equal(x, y) for x, y in zip(via_task, direct, strict=True))
    with pytest.raises(ConfigError, match=r"unknown partition\.kind='shards'"):
        partition_task("shards", labels, 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        partition_task("quantity", labels, 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"partition\.beta"):
        partition_task("dirichlet", labels, 3, np.random.default_rng(0))


def test_bad_labels() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(PartitionError, match="no training samples"):
        partition_iid(np.array([], dtype=np.int64), 2, rng)
    with pytest.raises(PartitionError, match="integer"):
        partition_iid(np.array([0.5, 1.0]), 1, rng)
    assert issubclass(PartitionError, DataError)
