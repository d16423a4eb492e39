"""core/distill.py: the baselines' pure losses, weights and draws -- hand examples and properties."""

from __future__ import annotations

import math

import pytest
import torch

from fedtalora.core.distill import (
    balanced_labels,
    bounding_loss,
    compensation_weights,
    glfc_loss,
    herding,
    kl_divergence,
    lander_weights,
    moments,
    relation_target,
    soft_cross_entropy,
)


def test_balanced_labels_cover_every_class_equally() -> None:
    y = balanced_labels(4, 10, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(y, minlength=4).tolist()) == [2, 2, 3, 3]
    assert sorted(y[:4].tolist()) == [0, 1, 2, 3] and sorted(y[4:8].tolist()) == [0, 1, 2, 3]


def test_soft_cross_entropy_hand_example() -> None:
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[0.0, 0.0]])
    # teacher 1/2, 1/2; student 1/4, 3/4: -(0.5 log 0.25 + 0.5 log 0.75)
    assert float(soft_cross_entropy(s, t, 1.0)) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))


def test_bounding_loss_and_lander_weights_hand_examples() -> None:
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert float(bounding_loss(a, e, 0.1)) == pytest.approx(0.25 - 0.1)  # MSE = 1/4
    assert float(bounding_loss(a, e, 0.3)) == 0.0  # inside the radius: no pull
    cur, pre = lander_weights(10, 20, 0.2, 0.4)
    alpha, beta = math.log2(11), math.sqrt(0.5)
    assert cur == pytest.approx(0.2 * (1 + 1 / alpha) / beta) and pre == pytest.approx(0.4 * alpha * beta)


def test_gradient_compensation_reweights_as_the_paper_says() -> None:
    """GLFC: w_i = |p_{y_i} - 1| / mean over the sample's group (old / new classes) of |p_y - 1|."""
    p = torch.tensor([0.9, 0.5, 0.2, 0.6, 0.8])
    old = torch.tensor([True, True, True, False, False])
    w = compensation_weights(p, old)
    g_old, g_new = [0.1, 0.5, 0.8], [0.4, 0.2]
    expected = [g / (sum(g_old) / 3) for g in g_old] + [g / (sum(g_new) / 2) for g in g_new]
    torch.testing.assert_close(w, torch.tensor(expected))
    assert float(w[old].mean()) == pytest.approx(1.0) and float(w[~old].mean()) == pytest.approx(1.0)
    # hard samples of the minority group weigh more than easy ones; a group learnt perfectly weighs nothing
    assert w[2] > w[0] and compensation_weights(torch.tensor([1.0, 0.5]), torch.tensor([True, False])).tolist() == [0, 1]
    # the loss: sum of w_i * CE_i / B (gc = 1, no distillation)
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.25, 0.5, 0.25]]))
    y = torch.tensor([0, 2])  # class 0 old (p = 0.9), class 2 new (p = 0.25)
    loss = glfc_loss(logits, y, 2, None, gc=1.0, rd=0.0)
    assert float(loss) == pytest.approx((1.0 * -math.log(0.9) + 1.0 * -math.log(0.25)) / 2, rel=1e-5)
    assert float(glfc_loss(logits, y, 0, None, gc=0.5, rd=0.5)) == pytest.approx(
        (-math.log(0.9) - math.log(0.25)) / 2, rel=1e-5)  # task 0: plain CE


def test_relation_target_hand_example() -> None:
    old = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    y = torch.tensor([3, 1])  # a new-class sample (3) and an exemplar of old class 1
    target = relation_target(old, y, 4)
    torch.testing.assert_close(target, torch.tensor([[0.25, 0.25, 0.0, 0.5], [0.2, 0.8, 0.0, 0.0]]))


def test_herding_picks_the_samples_closest_to_the_mean_first() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1]])
    order = herding(f, 4)
    assert order[0] == 2 and sorted(order) == [0, 1, 2, 3]
    assert herding(f, 10) == order and herding(f, 0) == []


@pytest.mark.parametrize("seed", range(5))
def test_distillation_losses_are_minimal_where_student_equals_teacher(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(6, 4, generator=g) * 3
    s = torch.randn(6, 4, generator=g) * 3
    assert float(kl_divergence(s, t, 2.0)) > 0 and float(kl_divergence(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # soft cross-entropy = KL / T^2 + the teacher's entropy: the same minimiser, the same gradient
    p = torch.softmax(t / 2.0, 1)
    entropy = float(-(p * torch.log(p)).sum(1).mean())
    assert float(soft_cross_entropy(s, t, 2.0)) == pytest.approx(float(kl_divergence(s, t, 2.0)) / 4 + entropy, rel=1e-5)
    x = t.clone().requires_grad_(True)
    soft_cross_entropy(x, t, 2.0).backward()
    assert float(x.grad.abs().max()) < 1e-6  # zero gradient at the teacher: nothing to correct


@pytest.mark.parametrize("seed", range(5))
def test_compensation_weights_average_one_per_group_and_relation_rows_sum_to_one(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(20, generator=g) * 0.99
    old = torch.rand(20, generator=g) < 0.5
    w = compensation_weights(p, old)
    for group in (old, ~old):
        if group.any():
            assert float(w[group].mean()) == pytest.approx(1.0, rel=1e-5)
    probs = torch.softmax(torch.randn(20, 3, generator=g), 1)
    y = torch.randint(0, 7, (20,), generator=g)
    target = relation_target(probs, y, 7)
    torch.testing.assert_close(target.sum(1), torch.ones(20))
    assert bool((target >= 0).all())
    loss = glfc_loss(torch.randn(20, 7, generator=g), y, 3, torch.randn(20, 3, generator=g), gc=0.5, rd=0.5)
    assert math.isfinite(float(loss)) and float(loss) > 0


def test_moments_hand_example_and_mask() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    s, sq, n = moments(h, mask)
    torch.testing.assert_close(s, torch.tensor([4.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(sq, torch.tensor([10.0, 20.0], dtype=torch.float64))
    assert float(n) == 2.0
    assert float(moments(h)[2]) == 3.0  # no mask: every token
