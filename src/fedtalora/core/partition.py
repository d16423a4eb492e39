"""Splitting one task's training samples among federated clients.

Every function takes ``labels``, the labels of ONE task's training samples (original class ids), and
returns one sorted int64 array per client of **positions** into ``labels`` (``0 .. len(labels)-1``).
Every position is assigned to exactly one client. The kinds of split:

* ``iid``: the positions are shuffled and cut into ``N`` chunks as even as possible.
* ``quantity`` (label-quantity skew, "#C=alpha"): the task's classes are put in a random order and
  client ``i`` holds the ``alpha`` classes at cyclic positions ``i*alpha .. i*alpha + alpha - 1``, so
  every client holds exactly ``alpha`` distinct classes and each class has ``floor`` or ``ceil`` of
  ``N*alpha/c`` holders (at least one when ``N*alpha >= c``). A class's shuffled samples are split as
  evenly as possible among its holders.
* ``dirichlet`` (distribution-based label skew, NIID-Bench): for each class a proportion vector
  ``p ~ Dir(beta * 1_N)`` is drawn, clients already holding at least ``len(labels)/N`` samples get
  ``p = 0``, ``p`` is renormalised and the class's shuffled samples are cut at the cumulative
  proportions. The whole draw is repeated until every client holds at least ``min_samples`` samples.
  Smaller ``beta`` means more skew.

Label skew is measured by :func:`skew`: the mean over clients of the total-variation distance
between a client's label distribution and the task's (0 for identical distributions, approaching 1
when every client holds one class of many).

All randomness comes from an explicit :class:`numpy.random.Generator`, so the same seed gives the
same partition.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ..errors import ConfigError, PartitionError

PARTITION_KINDS = ("iid", "quantity", "dirichlet")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"task labels must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise PartitionError("the task has no training samples to partition")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PartitionError(f"task labels must be integer class ids, got dtype {arr.dtype}")
    return arr


def _check_num_clients(num_clients: int, num_samples: int) -> int:
    n = operator.index(num_clients)
    if n < 1:
        raise PartitionError(f"fed.num_clients={n} must be at least 1")
    if n > num_samples:
        raise PartitionError(f"fed.num_clients={n} exceeds the {num_samples} training samples of the task")
    return n


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the task's samples and cut them into ``num_clients`` chunks as even as possible.

    Args:
        labels: Labels of the task's training samples, shape ``(n,)``.
        num_clients: Number of clients ``N``.
        rng: Generator for the shuffle.

    Returns:
        ``N`` sorted int64 arrays of positions into ``labels``; sizes differ by at most one.

    Raises:
        PartitionError: If ``N < 1`` or ``N > n`` (some client would get no sample).
    """
    arr = _check_labels(labels)
    n = _check_num_clients(num_clients, arr.size)
    return _finish(np.array_split(rng.permutation(arr.size), n))


def partition_quantity(
    labels: np.ndarray, num_clients: int, alpha: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give every client exactly ``alpha`` distinct classes of the task (label-quantity skew).

    The task's classes are randomly permuted; client ``i`` holds the ``alpha`` classes at cyclic
    positions ``i*alpha, ..., i*alpha + alpha - 1`` of that permutation. Each class's samples are
    shuffled and split as evenly as possible among its holders (in client order).

    Args:
        labels: Labels of the task's training samples, shape ``(n,)``.
        num_clients: Number of clients ``N``.
        alpha: Number of classes per client.
        rng: Generator for the class permutation and the shuffles.

    Returns:
        ``N`` sorted int64 arrays of positions into ``labels``.

    Raises:
        PartitionError: If ``alpha < 1``, ``alpha`` exceeds the task's classes, ``N * alpha`` is below
            them (a class would have no holder), or a class has fewer samples than holders.
    """
    arr = _check_labels(labels)
    n = _check_num_clients(num_clients, arr.size)
    a = operator.index(alpha)
    classes, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(-1)
    c = classes.size
    if a < 1:
        raise PartitionError(f"partition.alpha={a} must be at least 1")
    if a > c:
        raise PartitionError(f"partition.alpha={a} exceeds the {c} classes of a task")
    if n * a < c:
        raise PartitionError(
            f"fed.num_clients={n} x partition.alpha={a} = {n * a} is below the {c} classes of the task, "
            "so some class would be held by no client"
        )
    # holders[k] lists the clients of the k-th class of the permutation, in client order.
    perm = rng.permutation(c)
    holders: list[list[int]] = [[] for _ in range(c)]
    for i in range(n):
        for j in range(a):
            holders[(i * a + j) % c].append(i)
    counts = np.bincount(inverse, minlength=c)
    for k in range(c):
        cls = perm[k]
        if counts[cls] < len(holders[k]):
            raise PartitionError(
                f"class {classes[cls]} has {counts[cls]} samples but partition.alpha={a} with "
                f"fed.num_clients={n} gives it {len(holders[k])} holders; "
                "lower partition.alpha or fed.num_clients"
            )
    order = np.argsort(inverse, kind="stable")
    by_class = np.split(order, np.cumsum(counts)[:-1])
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for k in range(c):
        idx = rng.permutation(by_class[perm[k]])
        for client, chunk in zip(holders[k], np.array_split(idx, len(holders[k])), strict=True):
            parts[client].append(chunk)
    return _finish([np.concatenate(p) for p in parts])


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    rng: np.random.Generator,
    min_samples: int = 10,
    max_redraws: int = 1000,
) -> list[np.ndarray]:
    """Split each class among clients by Dirichlet proportions (NIID-Bench label skew).

    For each class (in increasing id order) the class's positions are shuffled, ``p ~ Dir(beta * 1_N)``
    is drawn, ``p`` is zeroed for clients already holding ``>= n / N`` samples and renormalised, and
    the positions are cut at ``cumsum(p) * count``. Should every remaining ``p`` underflow to zero (tiny
    ``beta``), the whole class goes to one of the eligible clients chosen uniformly, the limit of the
    renormalisation. The whole draw is repeated until every client holds ``>= min_samples`` samples.

    Args:
        labels: Labels of the task's training samples, shape ``(n,)``.
        num_clients: Number of clients ``N``.
        beta: Dirichlet concentration, ``> 0``; smaller is more skewed.
        rng: Generator for the shuffles and the proportions.
        min_samples: Fewest samples every client must hold, ``>= 0``.
        max_redraws: Most draws of the whole partition before giving up, ``>= 1``.

    Returns:
        ``N`` sorted int64 arrays of positions into ``labels``.

    Raises:
        PartitionError: If ``beta <= 0``, ``min_samples < 0``, ``max_redraws < 1``, ``N < 1``,
            ``min_samples * N > n`` (impossible), or no draw within ``max_redraws`` satisfies
            ``min_samples``.
    """
    arr = _check_labels(labels)
    num = arr.size
    b = float(beta)
    m = operator.index(min_samples)
    r = operator.index(max_redraws)
    if not (b > 0 and math.isfinite(b)):
        raise PartitionError(f"partition.beta={beta} must be a finite number above 0")
    if m < 0:
        raise PartitionError(f"partition.min_samples={m} must be at least 0")
    if r < 1:
        raise PartitionError(f"partition.max_redraws={r} must be at least 1")
    n = operator.index(num_clients)
    if n < 1:
        raise PartitionError(f"fed.num_clients={n} must be at least 1")
    if m * n > num:
        raise PartitionError(
            f"partition.min_samples={m} x fed.num_clients={n} = {m * n} exceeds the {num} training samples "
            "of the task; lower partition.min_samples or fed.num_clients"
        )
    _, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    quota = num / n
    concentration = np.full(n, b)
    best = -1
    for _ in range(r):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        sizes = np.zeros(n, dtype=np.int64)
        for positions in by_class:
            idx = rng.permutation(positions)
            p = rng.dirichlet(concentration)
            eligible = sizes < quota
            p = np.where(eligible, p, 0.0)
            total = p.sum()
            if total > 0:
                cuts = (np.cumsum(p / total) * idx.size).astype(np.int64)[:-1]
            else:
                cuts = np.zeros(n - 1, dtype=np.int64)
                winner = int(rng.choice(np.flatnonzero(eligible)))
                cuts[winner:] = idx.size
            for client, chunk in enumerate(np.split(idx, np.minimum(cuts, idx.size))):
                parts[client].append(chunk)
                sizes[client] += chunk.size
        smallest = int(sizes.min())
        if smallest >= m:
            return _finish([np.concatenate(p) for p in parts])
        best = max(best, smallest)
    raise PartitionError(
        f"no partition.beta={b:g} Dirichlet draw gave all fed.num_clients={n} clients "
        f"partition.min_samples={m} samples in partition.max_redraws={r} draws (best: {best}); "
        "lower partition.min_samples or raise partition.beta"
    )


def partition_task(
    kind: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: int | None = None,
    beta: float | None = None,
    min_samples: int = 10,
    max_redraws: int = 1000,
) -> list[np.ndarray]:
    """Partition one task's samples with the named kind of split.

    Args:
        kind: ``"iid"``, ``"quantity"`` or ``"dirichlet"``.
        labels: Labels of the task's training samples, shape ``(n,)``.
        num_clients: Number of clients ``N``.
        rng: Generator for the split.
        alpha: Classes per client; required for ``"quantity"``, ignored otherwise.
        beta: Dirichlet concentration; required for ``"dirichlet"``, ignored otherwise.
        min_samples: Fewest samples per client for ``"dirichlet"``.
        max_redraws: Most draws for ``"dirichlet"``.

    Returns:
        ``N`` sorted int64 arrays of positions into ``labels``.

    Raises:
        ConfigError: If ``kind`` is unknown or its parameter (``alpha`` / ``beta``) is missing.
        PartitionError: As raised by the chosen split.
    """
    if kind == "iid":
        return partition_iid(labels, num_clients, rng)
    if kind == "quantity":
        if alpha is None:
            raise ConfigError("partition.kind='quantity' needs partition.alpha")
        return partition_quantity(labels, num_clients, alpha, rng)
    if kind == "dirichlet":
        if beta is None:
            raise ConfigError("partition.kind='dirichlet' needs partition.beta")
        return partition_dirichlet(
            labels, num_clients, beta, rng, min_samples=min_samples, max_redraws=max_redraws
        )
    raise ConfigError(f"unknown partition.kind={kind!r}; choose one of: {', '.join(PARTITION_KINDS)}")


def _client_class_matrix(
    labels: np.ndarray, parts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes of ``labels``, their global counts, and the ``(clients, classes)`` count matrix."""
    arr = _check_labels(labels)
    classes, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(-1)
    rows = []
    for i, part in enumerate(parts):
        pos = np.asarray(part).reshape(-1)
        if pos.size and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0 or pos.max() >= arr.size):
            raise PartitionError(f"client {i} holds positions outside 0..{arr.size - 1} of the task's labels")
        rows.append(np.bincount(inverse[pos.astype(np.int64)], minlength=classes.size))
    matrix = np.stack(rows) if rows else np.zeros((0, classes.size), dtype=np.int64)
    return classes, np.bincount(inverse, minlength=classes.size), matrix


def class_counts(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict[int, int]]:
    """Per client, how many samples of each class it holds.

    Args:
        labels: Labels of the task's training samples, shape ``(n,)``.
        parts: Per client, positions into ``labels``.

    Returns:
        Per client a dict ``{class id: count}`` over the classes it holds (count > 0), keys ascending.

    Raises:
        PartitionError: If a part holds a position outside ``0 .. n-1``.
    """
    classes, _, matrix = _client_class_matrix(labels, parts)
    return [{int(classes[k]): int(row[k]) for k in np.flatnonzero(row)} for row in matrix]


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Label skew of a partition: mean total-variation distance to the task's label distribution.

    For each client with at least one sample, ``0.5 * sum_k |q_k - p_k|`` where ``q`` is the client's
    label distribution and ``p`` the distribution of ``labels``; clients without samples are skipped.
    0 means every client looks like the task; a client holding one class of ``c`` equally frequent
    classes scores ``1 - 1/c``.

    Args:
        labels: Labels of the task's training samples, shape ``(n,)``.
        parts: Per client, positions into ``labels``.

    Returns:
        The mean distance, in ``[0, 1)``; 0.0 if no client holds a sample.

    Raises:
        PartitionError: If a part holds a position outside ``0 .. n-1``.
    """
    _, glob, matrix = _client_class_matrix(labels, parts)
    held = matrix[matrix.sum(axis=1) > 0]
    if held.shape[0] == 0:
        return 0.0
    q = held / held.sum(axis=1, keepdims=True)
    p = glob / glob.sum()
    return float(np.mean(0.5 * np.abs(q - p).sum(axis=1)))
