"""Tests of fedtalora.scenario: class order, task cut, remap, errors, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fedtalora.core.scenario import Scenario, Task, make_scenario
from fedtalora.errors import ConfigError, DataError
from fedtalora.seeding import numpy_rng


@pytest.mark.parametrize(("num_classes", "num_tasks"), [(10, 3), (100, 10), (7, 7), (5, 1), (200, 20)])
def test_order_is_permutation_and_tasks_partition_it(num_classes: int, num_tasks: int) -> None:
    sc = make_scenario(num_classes, num_tasks, numpy_rng(0, "order"))
    assert sorted(sc.class_order) == list(range(num_classes))
    assert sc.num_classes == num_classes and sc.num_tasks == num_tasks
    flat = [c for t in sc.tasks for c in t.classes]
    assert flat == list(sc.class_order), "tasks are contiguous chunks of the order, in order"
    assert len(set(flat)) == num_classes
    offset = 0
    for i, t in enumerate(sc.tasks):
        assert t.index == i and t.label_offset == offset and t.classes
        assert list(t.positions) == list(range(offset, offset + len(t.classes)))
        offset += len(t.classes)
        assert sc.seen_classes(i) == offset
        assert sc.seen_class_ids(i) == sc.class_order[:offset]


def test_uneven_split_sizes() -> None:
    sc = make_scenario(10, 3, np.random.default_rng(0))
    assert [len(t.classes) for t in sc.tasks] == [4, 3, 3]
    assert [t.label_offset for t in sc.tasks] == [0, 4, 7]
    assert [sc.seen_classes(t) for t in range(3)] == [4, 7, 10]
    sc = make_scenario(11, 4, np.random.default_rng(0))
    assert [len(t.classes) for t in sc.tasks] == [3, 3, 3, 2]


def test_random_order_is_not_natural_and_shuffles() -> None:
    sc = make_scenario(50, 5, np.random.default_rng(1))
    assert sc.class_order != tuple(range(50))


def test_remap_maps_original_ids_to_head_positions() -> None:
    sc = make_scenario(10, 3, np.random.default_rng(4))
    order = np.asarray(sc.class_order)
    labels = np.random.default_rng(5).integers(0, 10, size=(4, 25))
    pos = sc.remap(labels)
    assert pos.shape == labels.shape and pos.dtype == np.int64
    np.testing.assert_array_equal(order[pos], labels)
    np.testing.assert_array_equal(sc.remap(order), np.arange(10))
    # each task's classes map exactly onto that task's head outputs
    for t in sc.tasks:
        assert list(sc.remap(np.asarray(t.classes))) == list(t.positions)
        np.testing.assert_array_equal(sc.task_of_class(np.asarray(t.classes)), t.index)
    assert sc.remap(np.array([], dtype=np.int64)).shape == (0,)


def test_remap_hand_example() -> None:
    sc = Scenario(class_order=(2, 0, 3, 1), tasks=(Task(0, (2, 0), 0), Task(1, (3, 1), 2)))
    np.testing.assert_array_equal(sc.remap(np.array([0, 1, 2, 3, 2])), [1, 3, 0, 2, 0])
    np.testing.assert_array_equal(sc.task_of_position(np.array([0, 1, 2, 3])), [0, 0, 1, 1])
    np.testing.assert_array_equal(sc.task_of_class(np.array([1, 2])), [1, 0])


def test_remap_rejects_unknown_labels() -> None:
    sc = make_scenario(5, 2, None, order="natural")
    with pytest.raises(DataError, match="label 5 is not one of the 5 classes"):
        sc.remap(np.array([0, 5]))
    with pytest.raises(DataError, match="label -1"):
        sc.remap(np.array([-1, 2]))
    with pytest.raises(DataError, match="integer"):
        sc.remap(np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="position 5"):
        sc.task_of_position(np.array([5]))


def test_natural_order_ignores_rng() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    sc = make_scenario(10, 5, rng, order="natural")
    assert rng.bit_generator.state == state
    assert sc.class_order == tuple(range(10))
    assert [t.classes for t in sc.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    np.testing.assert_array_equal(sc.remap(np.arange(10)), np.arange(10))
    assert make_scenario(10, 5, None, order="natural") == sc


@pytest.mark.parametrize("num_tasks", [0, -1, 11])
def test_bad_num_tasks(num_tasks: int) -> None:
    with pytest.raises(ConfigError, match=rf"scenario\.num_tasks={num_tasks} .* 10 classes"):
        make_scenario(10, num_tasks, np.random.default_rng(0))


def test_other_errors() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.order='sorted'"):
        make_scenario(10, 2, np.random.default_rng(0), order="sorted")
    with pytest.raises(ValueError, match="rng"):
        make_scenario(10, 2, None)
    with pytest.raises(DataError, match="at least one class"):
        make_scenario(0, 1, np.random.default_rng(0))
    sc = make_scenario(10, 2, np.random.default_rng(0))
    with pytest.raises(IndexError):
        sc.seen_classes(2)
    with pytest.raises(ConfigError, match="permutation"):
        Scenario(class_order=(0, 0, 1), tasks=(Task(0, (0, 0, 1), 0),))
    with pytest.raises(ConfigError, match="cover"):
        Scenario(class_order=(0, 1, 2), tasks=(Task(0, (0, 1), 0),))
    with pytest.raises(ConfigError, match="inconsistent"):
        Scenario(class_order=(0, 1, 2), tasks=(Task(0, (0,), 0), Task(1, (1, 2), 0)))


def test_determinism() -> None:
    a = make_scenario(100, 10, numpy_rng(42, "class_order"))
    b = make_scenario(100, 10, numpy_rng(42, "class_order"))
    c = make_scenario(100, 10, numpy_rng(43, "class_order"))
    assert a == b and hash(a) == hash(b)
    assert a.class_order != c.class_order


def test_scenario_is_immutable() -> None:
    sc = make_scenario(10, 2, np.random.default_rng(0))
    with pytest.raises(AttributeError):
        sc.class_order = (0,)  # type: ignore[misc]
    with pytest.raises(ValueError):
        sc._position[0] = 3
