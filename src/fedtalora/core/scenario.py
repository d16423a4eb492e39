"""Class-incremental scenarios: a class order cut into tasks.

Definitions used throughout the library:

* A dataset has ``C`` classes with *original* ids ``0 .. C-1``.
* The **class order** is a permutation of ``range(C)``. Position ``i`` of the order is the index of
  the classifier head's output for class ``class_order[i]``; :meth:`Scenario.remap` maps original ids
  to these positions, and every label the model sees or predicts is a position.
* The order is cut into ``T`` **tasks**: contiguous chunks of sizes as even as possible (as
  :func:`numpy.array_split` cuts them, so earlier tasks get the extra class). Task ``t`` holds the
  original classes ``class_order[label_offset : label_offset + len(classes)]``, and its head
  outputs are exactly those positions.
* After task ``t`` the model has seen ``seen_classes(t)`` classes: the head outputs
  ``0 .. seen_classes(t) - 1``, a prefix of the order.

Everything here is pure: no data is loaded, and the only randomness is the class order, drawn from an
explicit :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError

CLASS_ORDERS = ("random", "natural")


@dataclass(frozen=True)
class Task:
    """One task of a scenario.

    Attributes:
        index: 0-based position of the task in the scenario.
        classes: Original dataset class ids of the task, in class order.
        label_offset: Position of the task's first class in the class order (its first head output).
    """

    index: int
    classes: tuple[int, ...]
    label_offset: int

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return len(self.classes)

    @property
    def positions(self) -> range:
        """The task's head outputs: ``label_offset .. label_offset + num_classes - 1``."""
        return range(self.label_offset, self.label_offset + len(self.classes))


@dataclass(frozen=True)
class Scenario:
    """A class order and its cut into tasks.

    Attributes:
        class_order: Permutation of ``range(num_classes)``; head output ``i`` is class ``class_order[i]``.
        tasks: The tasks, in training order; their classes concatenated are ``class_order``.
    """

    class_order: tuple[int, ...]
    tasks: tuple[Task, ...]
    _position: np.ndarray = field(init=False, repr=False, compare=False)
    _task_starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        order = tuple(int(c) for c in self.class_order)
        tasks = tuple(self.tasks)
        object.__setattr__(self, "class_order", order)
        object.__setattr__(self, "tasks", tasks)
        n = len(order)
        if n == 0 or sorted(order) != list(range(n)):
            raise ConfigError(f"scenario class_order is not a permutation of range({n}): {order}")
        if not tasks:
            raise ConfigError("scenario has no tasks (scenario.num_tasks must be >= 1)")
        offset = 0
        for t, task in enumerate(tasks):
            if task.index != t or task.label_offset != offset or not task.classes:
                raise ConfigError(f"scenario task {t} is inconsistent with the class order: {task}")
            if tuple(task.classes) != order[offset : offset + len(task.classes)]:
                raise ConfigError(
                    f"scenario task {t} classes {task.classes} are not its chunk of the class order"
                )
            offset += len(task.classes)
        if offset != n:
            raise ConfigError(f"scenario tasks cover {offset} of the {n} classes of the class order")
        position = np.empty(n, dtype=np.int64)
        position[np.asarray(order, dtype=np.int64)] = np.arange(n, dtype=np.int64)
        position.setflags(write=False)
        starts = np.asarray([task.label_offset for task in tasks], dtype=np.int64)
        starts.setflags(write=False)
        object.__setattr__(self, "_position", position)
        object.__setattr__(self, "_task_starts", starts)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Number of classes over all tasks (the width of the full head)."""
        return len(self.class_order)

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """Map original class ids to positions in the class order (head output indices).

        Args:
            labels: Integer array of original class ids, any shape.

        Returns:
            An int64 array of the same shape with ``class_order[result] == labels``.

        Raises:
            DataError: If ``labels`` is not integer or holds an id outside ``0 .. num_classes - 1``.
        """
        arr = np.asarray(labels)
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"labels must be integer class ids, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(f"label {bad} is not one of the {self.num_classes} classes of the scenario")
        return self._position[arr.astype(np.int64, copy=False)]

    def _check_task(self, task_index: int) -> int:
        t = operator.index(task_index)
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task index {t} is out of range for a scenario of {self.num_tasks} tasks")
        return t

    def seen_classes(self, task_index: int) -> int:
        """Number of head outputs seen after training task ``task_index`` (a prefix of the order).

        Args:
            task_index: 0-based task index.

        Returns:
            ``label_offset + len(classes)`` of that task.

        Raises:
            IndexError: If ``task_index`` is not a task of the scenario.
        """
        task = self.tasks[self._check_task(task_index)]
        return task.label_offset + len(task.classes)

    def seen_class_ids(self, task_index: int) -> tuple[int, ...]:
        """Original class ids seen after training task ``task_index``, in class order."""
        return self.class_order[: self.seen_classes(task_index)]

    def task_of_position(self, positions: np.ndarray) -> np.ndarray:
        """Task index of each head output position (vectorised).

        Args:
            positions: Integer array of positions in ``0 .. num_classes - 1``, any shape.

        Returns:
            An int64 array of the same shape holding the index of the task each position belongs to.

        Raises:
            DataError: If a position is outside ``0 .. num_classes - 1``.
        """
        arr = np.asarray(positions)
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"positions must be integer head outputs, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"position {bad} is not one of the {self.num_classes} head outputs of the scenario"
            )
        return (np.searchsorted(self._task_starts, arr, side="right") - 1).astype(np.int64)

    def task_of_class(self, labels: np.ndarray) -> np.ndarray:
        """Task index of each original class id (vectorised); see :meth:`remap` for the errors."""
        return self.task_of_position(self.remap(labels))


def make_scenario(
    num_classes: int, num_tasks: int, rng: np.random.Generator | None, order: str = "random"
) -> Scenario:
    """Draw a class order and cut it into tasks.

    Args:
        num_classes: Number of classes ``C`` of the dataset.
        num_tasks: Number of tasks ``T``, ``1 <= T <= C``.
        rng: Generator for the class order; required for ``order="random"``, unused for ``"natural"``.
        order: ``"random"`` (``rng.permutation(C)``) or ``"natural"`` (``0 .. C-1``).

    Returns:
        The scenario; task sizes follow :func:`numpy.array_split` (earlier tasks get the extra class).

    Raises:
        DataError: If ``num_classes < 1``.
        ConfigError: If ``num_tasks`` is outside ``1 .. num_classes`` or ``order`` is unknown.
        ValueError: If ``order="random"`` and ``rng`` is None.
    """
    c = operator.index(num_classes)
    t = operator.index(num_tasks)
    if c < 1:
        raise DataError(f"a scenario needs at least one class, the dataset has {c}")
    if not 1 <= t <= c:
        raise ConfigError(f"scenario.num_tasks={t} must be between 1 and the {c} classes of the dataset")
    if order == "random":
        if rng is None:
            raise ValueError("make_scenario(order='random') needs a numpy Generator, got rng=None")
        class_order = tuple(int(x) for x in rng.permutation(c))
    elif order == "natural":
        class_order = tuple(range(c))
    else:
        raise ConfigError(f"unknown scenario.order={order!r}; choose one of: {', '.join(CLASS_ORDERS)}")
    tasks = []
    offset = 0
    for i, chunk in enumerate(np.array_split(np.asarray(class_order, dtype=np.int64), t)):
        tasks.append(Task(index=i, classes=tuple(int(x) for x in chunk), label_offset=offset))
        offset += len(chunk)
    return Scenario(class_order=class_order, tasks=tuple(tasks))
