"""Class-incremental metrics as pure functions of the accuracy matrix.

``acc[t][j]`` is the top-1 accuracy of the global model after the last round of task ``t`` on the
test data of task ``j`` (``j <= t``; entries above the diagonal are ``None``). Prediction is
single-head over all classes seen up to task ``t``, without task id.

- ``A_t``: accuracy after task ``t`` on the test data of *all* classes seen so far. With per-task test
  sizes ``n_j`` it is the size-weighted mean of row ``t`` (:func:`seen_accuracies`).
- F_AA (final average accuracy) ``= A_T``.
- AIA (average incremental accuracy) ``= (1/T) sum_t A_t``.
- Forgetting ``= mean_{j < T} (max_{t in [j, T-1)} acc[t][j] - acc[T-1][j])`` (Chaudhry et al., 2018):
  how much each earlier task lost from its best accuracy by the end; ``None`` for a single task.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check_lower_triangular(acc: Matrix) -> int:
    T = len(acc)
    if T == 0:
        raise ValueError("empty accuracy matrix")
    for t, row in enumerate(acc):
        if len(row) != T:
            raise ValueError(f"row {t} has {len(row)} entries, expected {T}")
        for j, v in enumerate(row):
            if (j <= t) != (v is not None):
                raise ValueError(f"acc[{t}][{j}] must be {'a number' if j <= t else 'None'}")
    return T


def seen_accuracies(acc: Matrix, test_sizes: Sequence[int]) -> list[float]:
    """``A_t`` for every task: row ``t`` averaged with weights ``n_0..n_t`` (test samples per task)."""
    T = _check_lower_triangular(acc)
    if len(test_sizes) != T:
        raise ValueError(f"{len(test_sizes)} test sizes for {T} tasks")
    if any(n < 0 for n in test_sizes) or test_sizes[0] <= 0:
        raise ValueError(f"test sizes must be >= 0 with a non-empty first task, got {list(test_sizes)}")
    out = []
    for t in range(T):
        n = sum(test_sizes[: t + 1])
        out.append(sum(float(acc[t][j]) * test_sizes[j] for j in range(t + 1)) / n)  # type: ignore[arg-type]
    return out


def final_average_accuracy(seen: Sequence[float]) -> float:
    """F_AA: the accuracy over all classes after the last task."""
    return float(seen[-1])


def average_incremental_accuracy(seen: Sequence[float]) -> float:
    """AIA: the mean over tasks of the accuracy after each task."""
    return float(sum(seen) / len(seen))


def forgetting(acc: Matrix) -> float | None:
    """Average forgetting of the tasks before the last one; ``None`` with a single task."""
    T = _check_lower_triangular(acc)
    if T < 2:
        return None
    drops = []
    for j in range(T - 1):
        best = max(float(acc[t][j]) for t in range(j, T - 1))  # type: ignore[arg-type]
        drops.append(best - float(acc[T - 1][j]))  # type: ignore[arg-type]
    return sum(drops) / len(drops)


def summarize(acc: Matrix, test_sizes: Sequence[int]) -> dict[str, float | None | list[float]]:
    """F_AA, AIA, forgetting and the per-task ``A_t`` of a (possibly partial) run."""
    seen = seen_accuracies(acc, test_sizes)
    return {
        "final_average_accuracy": final_average_accuracy(seen),
        "average_incremental_accuracy": average_incremental_accuracy(seen),
        "forgetting": forgetting(acc),
        "seen_accuracy": seen,
    }
