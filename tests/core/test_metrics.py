"""Tests of fedtalora.metrics: seen accuracy, F_AA, AIA, forgetting on a hand-computed matrix, errors."""

from __future__ import annotations

import pytest

from fedtalora.core.metrics import (
    average_incremental_accuracy,
    final_average_accuracy,
    forgetting,
    seen_accuracies,
    summarize,
)

# acc[t][j]: accuracy after task t on task j. Task 0 *improves* after task 1 (0.90 -> 0.95), so its
# best is not on the diagonal; task 1 improves at the end (0.80 -> 0.85): negative forgetting.
ACC = [
    [0.90, None, None],
    [0.95, 0.80, None],
    [0.60, 0.85, 0.75],
]
SIZES = [100, 100, 200]
# A_0 = 0.90
# A_1 = (0.95*100 + 0.80*100) / 200 = 175 / 200 = 0.875
# A_2 = (0.60*100 + 0.85*100 + 0.75*200) / 400 = (60 + 85 + 150) / 400 = 295 / 400 = 0.7375
#       (an unweighted mean would give 0.7333...)
SEEN = [0.90, 0.875, 0.7375]
F_AA = 0.7375
AIA = (0.90 + 0.875 + 0.7375) / 3  # = 2.5125 / 3 = 0.8375
# Forgetting over j < T-1 = 2, best over t in [j, T-1):
#   j = 0: max(0.90, 0.95) - 0.60 = 0.35
#   j = 1: max(0.80)       - 0.85 = -0.05  (the final row is not part of the max)
FORGETTING = (0.35 - 0.05) / 2  # = 0.15


def test_seen_accuracies_are_size_weighted_rows() -> None:
    """A_t is row t of the matrix averaged with the test sizes of tasks 0..t."""
    # Execute
    seen = seen_accuracies(ACC, SIZES)

    # Assert
    assert seen == pytest.approx(SEEN, abs=1e-12)
    assert seen[2] != pytest.approx(sum(ACC[2]) / 3, abs=1e-3), "weighted by test sizes, not uniform"


def test_final_and_average_incremental_accuracy() -> None:
    """F_AA is the last A_t; AIA is the mean of all A_t."""
    # Prepare
    seen = seen_accuracies(ACC, SIZES)

    # Execute / Assert
    assert final_average_accuracy(seen) == pytest.approx(F_AA, abs=1e-12)
    assert average_incremental_accuracy(seen) == pytest.approx(AIA, abs=1e-12)
    assert average_incremental_accuracy(seen) == pytest.approx(0.8375, abs=1e-12)
    assert isinstance(final_average_accuracy(seen), float)


def test_forgetting_uses_best_before_last_task() -> None:
    """Forgetting is the mean drop from each earlier task's best (before the last task) to its final accuracy."""
    assert forgetting(ACC) == pytest.approx(FORGETTING, abs=1e-12)
    assert forgetting(ACC) == pytest.approx(0.15, abs=1e-12)


def test_forgetting_two_tasks() -> None:
    """With two tasks, forgetting is just acc[0][0] - acc[1][0]."""
    assert forgetting([[0.8, None], [0.5, 0.9]]) == pytest.approx(0.3, abs=1e-12)


def test_single_task() -> None:
    """A single task has no forgetting; F_AA = AIA = its accuracy."""
    # Execute
    out = summarize([[0.42]], [10])

    # Assert
    assert forgetting([[0.42]]) is None
    assert out["forgetting"] is None
    assert out["seen_accuracy"] == pytest.approx([0.42], abs=1e-12)
    assert out["final_average_accuracy"] == out["average_incremental_accuracy"] == pytest.approx(0.42)


def test_summarize_keys_and_values() -> None:
    """summarize returns F_AA, AIA, forgetting and the per-task A_t."""
    # Execute
    out = summarize(ACC, SIZES)

    # Assert
    assert set(out) == {"final_average_accuracy", "average_incremental_accuracy", "forgetting", "seen_accuracy"}
    assert out["final_average_accuracy"] == pytest.approx(F_AA, abs=1e-12)
    assert out["average_incremental_accuracy"] == pytest.approx(AIA, abs=1e-12)
    assert out["forgetting"] == pytest.approx(FORGETTING, abs=1e-12)
    assert out["seen_accuracy"] == pytest.approx(SEEN, abs=1e-12)


@pytest.mark.parametrize(
    ("acc", "match"),
    [
        ([[0.9, 0.1], [0.8, 0.7]], r"acc\[0\]\[1\] must be None"),  # number above the diagonal
        ([[None, None], [0.8, 0.7]], r"acc\[0\]\[0\] must be a number"),  # None on the diagonal
        ([[0.9, None], [None, 0.7]], r"acc\[1\]\[0\] must be a number"),  # None below the diagonal
        ([[0.9, None], [0.8]], r"row 1 has 1 entries, expected 2"),  # short row
        ([[0.9, None, None], [0.8, 0.7, None]], r"row 0 has 3 entries, expected 2"),  # too few rows
        ([], r"empty"),
    ],
)
def test_malformed_matrix_raises(acc: list[list[float | None]], match: str) -> None:
    """Every metric rejects a matrix that is not lower triangular with T rows of T entries."""
    with pytest.raises(ValueError, match=match):
        forgetting(acc)
    with pytest.raises(ValueError, match=match):
        seen_accuracies(acc, [1] * max(len(acc), 1))
    with pytest.raises(ValueError, match=match):
        summarize(acc, [1] * max(len(acc), 1))


@pytest.mark.parametrize("sizes", [[100, 100], [100, 100, 200, 50], []])
def test_wrong_number_of_test_sizes_raises(sizes: list[int]) -> None:
    """One test size per task is required."""
    with pytest.raises(ValueError, match=rf"{len(sizes)} test sizes for 3 tasks"):
        seen_accuracies(ACC, sizes)
    with pytest.raises(ValueError):
        summarize(ACC, sizes)
