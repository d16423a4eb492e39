"""Prototype maths: exact federated class means and nearest-prototype prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtalora.core.prototypes import aggregate_class_sums, class_sums, nearest_prototype, prototype_nbytes
from fedtalora.errors import AggregationError


def test_hand_computed_example() -> None:
    # client 0 holds class 0: (1, 0), (3, 0); client 1 holds class 0: (2, 6) and class 2: (0, 1)
    s0, n0 = class_sums(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]), 3)
    s1, n1 = class_sums(torch.tensor([[2.0, 6.0], [0.0, 1.0]]), torch.tensor([0, 2]), 3)
    means, n = aggregate_class_sums([s0, s1], [n0, n1])
    assert n.tolist() == [3, 0, 1]
    torch.testing.assert_close(means[0], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.isnan(means[1]).all()
    torch.testing.assert_close(means[2], torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_federated_means_equal_pooled_means_for_any_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    N, D, C, K = 200, 7, 6, int(rng.integers(1, 6))
    x = torch.tensor(rng.normal(size=(N, D)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, C, size=N))
    owner = rng.integers(0, K, size=N)
    parts = [class_sums(x[owner == k], y[owner == k], C) for k in range(K)]
    means, n = aggregate_class_sums([p[0] for p in parts], [p[1] for p in parts])
    for c in range(C):
        sel = y == c
        assert n[c] == int(sel.sum())
        if sel.any():
            torch.testing.assert_close(means[c], x[sel].double().mean(0), rtol=1e-12, atol=1e-12)


def test_nearest_prototype_cosine_and_euclidean() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    x = torch.tensor([[2.0, 0.1], [0.1, 0.5], [9.0, 9.0]])
    assert nearest_prototype(x, protos, "euclidean").tolist() == [0, 1, 2]
    # cosine ignores the norm: (9, 9) points along (1, 1) and (0.1, 0.5) is closest in angle to (0, 1)
    assert nearest_prototype(x, protos, "cosine").tolist() == [0, 1, 2]
    assert nearest_prototype(torch.tensor([[1.0, 1.2]]), protos, "cosine").tolist() == [2]
    with pytest.raises(ValueError):
        nearest_prototype(x, protos, "manhattan")


def test_bad_client_statistics_are_rejected() -> None:
    s, n = class_sums(torch.ones(3, 4), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(AggregationError, match="do not match"):
        aggregate_class_sums([s, s[:, :3]], [n, n])
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AggregationError, match="non-finite"):
        aggregate_class_sums([s, bad], [n, n])
    with pytest.raises(AggregationError):
        aggregate_class_sums([], [])


def test_prototype_bytes() -> None:
    assert prototype_nbytes(77, 384) == 77 * 384 * 4 + 77 * 8


def test_prototype_classifier_run_predicts_by_exact_class_means(tmp_path, tiny_overrides) -> None:
    """End to end: the prototypes a run keeps are the pooled class means of the reporting clients'
    features under the final model, and its predictions are the nearest of them."""
    import numpy as np

    from fedtalora.api import prepare, run
    from fedtalora.config import resolve

    cfg = resolve("tiny-vit", [*tiny_overrides, "classifier.kind=prototype"])
    setup = prepare(cfg)
    result = run(setup, tmp_path / "run")
    m = result.metrics
    assert m["complete"] and len(m["accuracy_matrix"]) == 2
    classifier, model, exp = setup.classifier, result.model, setup.exp
    protos = classifier.prototypes
    assert protos is not None and not torch.isnan(protos).any()
    # the last task's prototypes equal the class means of all its clients' features now
    last = exp.scenario.tasks[-1]
    idx = np.concatenate(exp.partitions[last.index])
    from fedtalora.fed.client import extract_features

    feats = extract_features(model, exp.dataset.train, idx, transform=setup.transform, batch_size=64,
                             device=setup.device)
    targets = torch.as_tensor(exp.train_targets[idx])
    for c in range(last.label_offset, last.label_offset + len(last.classes)):
        torch.testing.assert_close(protos[c], feats[targets == c].double().mean(0), rtol=1e-5, atol=1e-6)
    # prototype uplink is counted in the last round of each task
    last_rounds = [r for r in m["rounds"] if r["round"] == cfg.fed.rounds_per_task - 1]
    first_rounds = [r for r in m["rounds"] if r["round"] == 0]
    assert all(a["uplink_bytes"] > b["uplink_bytes"] for a, b in zip(last_rounds, first_rounds, strict=True))


def test_class_sums_over_a_range_of_positions_leaves_other_labels_out() -> None:
    f = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    sums, counts = class_sums(f, torch.tensor([10, 10, 11, 7]), 3, offset=10)
    assert sums.tolist() == [[4.0, 2.0], [5.0, 5.0], [0.0, 0.0]] and counts.tolist() == [2, 1, 0]
