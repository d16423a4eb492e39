"""data.val_fraction (a per-client validation split from the seed) and lora.train_tasks (all | first)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedtalora.api import prepare, run
from fedtalora.config import resolve
from fedtalora.errors import ConfigError
from fedtalora.fed.build import Experiment, split_validation
from fedtalora.fed.client import extract_features

# --- the split ----------------------------------------------------------------------------------------


def test_split_validation_hand_example() -> None:
    parts = [[np.array([10, 11, 12, 13, 14]), np.array([20])], [np.array([30, 31])]]
    train, val = split_validation(parts, 0.4, seed=0)
    assert [len(v) for v in val[0]] == [2, 0]  # round(0.4 * 5) = 2; one sample is always kept for training
    assert [len(v) for v in val[1]] == [1]  # round(0.8) = 1
    for t in range(2):
        for ix, tr, va in zip(parts[t], train[t], val[t], strict=True):
            assert sorted([*tr.tolist(), *va.tolist()]) == ix.tolist()  # disjoint, nothing lost
            assert tr.tolist() == sorted(tr.tolist()) and va.tolist() == sorted(va.tolist())  # order kept


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_validation_properties(fraction: float) -> None:
    rng = np.random.default_rng(1)
    parts = [[rng.permutation(200)[: rng.integers(1, 60)] for _ in range(5)] for _ in range(3)]
    train, val = split_validation(parts, fraction, seed=7)
    again = split_validation(parts, fraction, seed=7)
    other = split_validation(parts, fraction, seed=8)
    for t in range(3):
        for k in range(5):
            n = len(parts[t][k])
            assert len(val[t][k]) == min(round(fraction * n), n - 1)
            assert not set(train[t][k].tolist()) & set(val[t][k].tolist())
            assert np.array_equal(val[t][k], again[1][t][k])  # from the seed alone
    assert any(not np.array_equal(a, b) for ta, tb in zip(val, other[1], strict=True)
               for a, b in zip(ta, tb, strict=True) if len(a) > 1)


@pytest.mark.parametrize("bad", ["data.val_fraction=1", "data.val_fraction=-0.1", "data.val_fraction=nan",
                                 "lora.train_tasks=second"])
def test_bad_values_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        resolve("tiny-vit", [bad])


# --- in a run -----------------------------------------------------------------------------------------


def test_validation_split_is_held_out_and_reported(tiny_overrides: list[str]) -> None:
    cfg = resolve("tiny-vit", [*tiny_overrides, "data.val_fraction=0.2"])
    exp = Experiment.build(cfg)
    plain = Experiment.build(resolve("tiny-vit", tiny_overrides))
    for t in range(cfg.scenario.num_tasks):
        for k in range(cfg.fed.num_clients):
            both = np.concatenate([exp.partitions[t][k], exp.validation[t][k]])
            assert sorted(both.tolist()) == sorted(plain.partitions[t][k].tolist())  # drawn from the client's data
            assert len(exp.validation[t][k]) == round(0.2 * len(plain.partitions[t][k]))
    result = run(prepare(cfg))
    m = result.metrics
    trained = [sum(r["num_samples"]) for r in m["rounds"]]
    assert trained == [sum(len(ix) for ix in exp.partitions[r["task"]]) for r in m["rounds"]]  # not trained on
    assert all(0 <= task["val_accuracy"] <= 1 for task in m["tasks"])
    assert m["val_final_average_accuracy"] == m["tasks"][-1]["val_accuracy"]
    assert m["val_average_incremental_accuracy"] == pytest.approx(np.mean([x["val_accuracy"] for x in m["tasks"]]))
    without = run(prepare(resolve("tiny-vit", tiny_overrides))).metrics
    assert "val_final_average_accuracy" not in without and "val_accuracy" not in without["tasks"][0]


def _lora(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.lora_parameters().items()}


def test_train_tasks_first_freezes_lora_after_the_first_task(tiny_overrides: list[str]) -> None:
    """LoRA (and the base the residual folds into) stays bit for bit what task 0 left; the head still trains;
    with ``all`` LoRA keeps moving."""
    ends: dict[str, list[dict[str, torch.Tensor]]] = {"first": [], "all": []}
    heads: list[torch.Tensor] = []
    for mode in ("first", "all"):
        setup = prepare(resolve("tiny-vit", [*tiny_overrides, f"lora.train_tasks={mode}"]))

        def progress(event: dict[str, Any], s: Any = setup, m: str = mode) -> None:
            if event["event"] == "task":
                ends[m].append({**_lora(s.model),
                                **{f"base:{p.layer}": s.model.base_weight(p.layer).detach().clone()
                                   for p in s.model.lora_pairs()}})
                if m == "first":
                    heads.append(s.model.head.weight.detach().clone())

        run(setup, None, progress)
    first, every = ends["first"], ends["all"]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    assert not all(torch.equal(every[0][k], every[1][k]) for k in every[0])
    assert not torch.equal(heads[0], heads[1])


def test_train_tasks_first_holds_with_grouped_clients(tiny_overrides: list[str]) -> None:
    """``train.parallel_clients`` trains clients together on a path that trains every LoRA tensor: with
    ``lora.train_tasks=first`` the clients train one after another, so LoRA still stays what task 0 left."""
    setup = prepare(resolve("tiny-vit", [*tiny_overrides, "lora.train_tasks=first", "train.parallel_clients=2"]))
    ends: list[dict[str, torch.Tensor]] = []

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "task":
            ends.append(_lora(setup.model))

    run(setup, None, progress)
    assert len(ends) >= 2
    assert all(torch.equal(ends[0][k], ends[-1][k]) for k in ends[0])


def test_analytic_with_lora_on_the_first_task_only_is_exact(tiny_overrides: list[str]) -> None:
    """fedtalora + analytic + train_tasks=first: task 0's statistics were taken under the final features,
    so the final W is the ridge of the final model's features of all training data (1e-6); with ``all``
    it is not (the old statistics drifted)."""
    lam = 0.5
    gaps = {}
    for mode in ("first", "all"):
        setup = prepare(resolve("tiny-vit", [*tiny_overrides, "classifier.kind=analytic", f"classifier.ridge={lam}",
                                         "classifier.projection_dim=32", f"lora.train_tasks={mode}",
                                         "train.lr=0.05"]))
        result = run(setup)
        exp = setup.exp
        x = extract_features(result.model, exp.dataset.train, np.arange(len(exp.train_targets)),
                             transform=setup.transform, batch_size=256, device=setup.device).double()
        proj = setup.classifier.projection(x.shape[1])
        phi = torch.relu(x @ proj)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(exp.train_targets), exp.scenario.num_classes).double()
        ref = torch.linalg.solve(phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=torch.float64), phi.T @ onehot)
        gaps[mode] = float((setup.classifier.weights - ref).abs().max() / ref.abs().max())
    assert gaps["first"] < 1e-6
    assert gaps["all"] > 1e-4
