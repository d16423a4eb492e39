"""classifier.kind=analytic: the component in the loop, its uplink, checkpoints, and one-line input errors.

The central property (issue 16, item 6): with a frozen backbone and a fixed lambda the federated,
class-incremental ridge classifier *is* the centralized joint one, whatever the partition and the number
of clients. The reference here is computed independently with numpy from all training features at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtalora.api import prepare, run
from fedtalora.config import resolve
from fedtalora.core.analytic import statistics_nbytes
from fedtalora.errors import CheckpointError
from fedtalora.fed import rundir
from fedtalora.fed.client import extract_features, predict
from fedtalora.methods.classifier import AnalyticClassifier

LAM = 0.5
PROJ = 40
PARTITIONS = {
    "iid-1": ["partition.kind=iid", "fed.num_clients=1", "fed.clients_per_round=1"],
    "iid-10": ["partition.kind=iid", "fed.num_clients=10", "fed.clients_per_round=10"],
    "dirichlet-0.05": ["partition.kind=dirichlet", "partition.beta=0.05", "fed.num_clients=10",
                       "fed.clients_per_round=10"],
    "quantity-2": ["partition.kind=quantity", "partition.alpha=2", "fed.num_clients=10", "fed.clients_per_round=10"],
}


def _frozen(tiny_overrides: list[str], *extra: str) -> Any:
    """A frozen-backbone run (head-only) with the analytic classifier at a fixed lambda."""
    return resolve("tiny-vit", [*tiny_overrides, "method=head-only", "fed.rounds_per_task=1", "classifier.kind=analytic",
                            f"classifier.ridge={LAM}", f"classifier.projection_dim={PROJ}", "partition.min_samples=2",
                            *extra])


def _ridge_numpy(x: np.ndarray, y: np.ndarray, num_classes: int, lam: float) -> np.ndarray:
    """The centralized reference, written independently: W = (X^T X + lam I)^-1 X^T Y with numpy."""
    onehot = np.eye(num_classes)[y]
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ onehot)


@pytest.fixture(scope="module")
def frozen_runs(tiny_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name -> (setup, result, test predictions) for every partition of :data:`PARTITIONS`."""
    out = {}
    for name, extra in PARTITIONS.items():
        setup = prepare(_frozen(tiny_overrides, *extra))
        result = run(setup, tmp_path_factory.mktemp(name))
        exp = setup.exp
        idx = np.arange(len(exp.test_targets))
        preds = predict(result.model, exp.dataset.test, idx, num_seen=exp.scenario.num_classes,
                        transform=setup.transform, batch_size=256, device=setup.device,
                        scores=lambda x, s=setup, m=result.model: s.classifier.scores(m, s.method, x))
        out[name] = (setup, result, preds)
    return out


def test_analytic_run_is_the_centralized_ridge_for_any_partition(frozen_runs: dict[str, Any]) -> None:
    """Same W (1e-6) and the same predictions for IID, Dirichlet 0.05 and quantity 2 with 1 or 10 clients,
    equal to the centralized ridge of all training features."""
    setup, result, _ = frozen_runs["iid-1"]
    exp = setup.exp
    x = extract_features(result.model, exp.dataset.train, np.arange(len(exp.train_targets)),
                         transform=setup.transform, batch_size=256, device=setup.device).double().numpy()
    proj = setup.classifier.projection(x.shape[1])
    assert proj is not None and proj.shape == (x.shape[1], PROJ)
    ref = _ridge_numpy(np.maximum(x @ proj.numpy(), 0), exp.train_targets, exp.scenario.num_classes, LAM)
    x_test = extract_features(result.model, exp.dataset.test, np.arange(len(exp.test_targets)),
                              transform=setup.transform, batch_size=256, device=setup.device).double().numpy()
    ref_pred = (np.maximum(x_test @ proj.numpy(), 0) @ ref).argmax(1)
    for name, (s, r, preds) in frozen_runs.items():
        clf = s.classifier
        assert isinstance(clf, AnalyticClassifier) and clf.lam == LAM
        np.testing.assert_allclose(clf.weights.numpy(), ref, rtol=1e-6, atol=1e-6, err_msg=name)
        assert np.array_equal(preds, ref_pred), name
        assert r.metrics["accuracy_matrix"] == frozen_runs["iid-1"][1].metrics["accuracy_matrix"], name
    assert float((ref_pred == exp.test_targets).mean()) > 0.3  # it learns something (10 classes: chance 0.1)


def test_uplink_counts_the_statistics_once_per_task(frozen_runs: dict[str, Any], tiny_overrides: list[str]) -> None:
    """Each task's last round carries each reporting client's upper triangle of G, the C columns of its
    classes and their counts and indices, on top of what head-only sends anyway."""
    setup, result, _ = frozen_runs["quantity-2"]
    plain = run(prepare(resolve("tiny-vit", [*tiny_overrides, "method=head-only", "fed.rounds_per_task=1",
                                         "partition.min_samples=2", *PARTITIONS["quantity-2"]]))).metrics
    exp = setup.exp
    for t, (rec, base) in enumerate(zip(result.metrics["rounds"], plain["rounds"], strict=True)):
        held = [len(np.unique(exp.train_targets[exp.partitions[t][k]])) for k in rec["aggregated"]]
        assert all(h <= 2 for h in held)  # quantity alpha=2: at most 2 classes of the task per client
        expected = sum(statistics_nbytes(PROJ, h) for h in held)
        assert rec["uplink_bytes"] - base["uplink_bytes"] == expected


def test_checkpoint_state_round_trip_and_refusals(frozen_runs: dict[str, Any]) -> None:
    setup, result, _ = frozen_runs["dirichlet-0.05"]
    clf = setup.classifier
    state = clf.checkpoint_state()
    assert state["gram"].shape == (PROJ * (PROJ + 1) // 2,)  # the upper triangle only
    # the run directory's latest checkpoint carries the same sums (method/classifier.<key>)
    ckpt = rundir.load_latest(result.run_dir, setup.cfg.to_dict())
    assert ckpt is not None
    assert torch.equal(ckpt.method_state["classifier.gram"], state["gram"])
    fresh = AnalyticClassifier(projection_dim=PROJ, ridge=LAM, seed=setup.cfg.seed)
    fresh.load_checkpoint_state({k[len("classifier."):]: v for k, v in ckpt.method_state.items()
                                 if k.startswith("classifier.")})
    assert torch.equal(fresh.stats.gram, clf.stats.gram) and torch.equal(fresh.weights, clf.weights)
    with pytest.raises(CheckpointError, match="projection_dim=41"):
        AnalyticClassifier(projection_dim=41, ridge=LAM).load_checkpoint_state(state)
    with pytest.raises(CheckpointError, match="incomplete"):
        fresh.load_checkpoint_state({"gram": state["gram"]})
    with pytest.raises(CheckpointError, match="non-finite"):
        fresh.load_checkpoint_state({**state, "corr": state["corr"] * float("nan")})
    with pytest.raises(CheckpointError, match="unexpected"):
        fresh.load_checkpoint_state({**state, "prototypes": state["corr"]})
    fresh.load_checkpoint_state({})  # a checkpoint before the first task end: no statistics yet
    assert fresh.stats is None and fresh.weights is None


class _Crash(Exception):
    pass


def test_resume_restores_the_statistics(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """A run that crashes in task 1 (after task 0's checkpoint) and is resumed ends with the same sums,
    lambda and accuracies as an uninterrupted one."""
    cfg = _frozen(tiny_overrides, "classifier.ridge=auto")
    full = prepare(cfg)
    ref = run(full, tmp_path / "full")

    def crash(event: dict[str, Any]) -> None:
        if event["event"] == "round" and event["task"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        run(prepare(cfg), tmp_path / "part", crash)
    resumed_setup = prepare(cfg)
    resumed = run(resumed_setup, tmp_path / "part", resume=True)
    assert resumed.metrics["accuracy_matrix"] == ref.metrics["accuracy_matrix"]
    assert torch.equal(resumed_setup.classifier.stats.gram, full.classifier.stats.gram)
    assert resumed_setup.classifier.lam == full.classifier.lam


def test_cli_run_with_the_analytic_classifier(run_cli, tiny_overrides: list[str], tmp_path: Path) -> None:
    rc, out, err = run_cli(["run", "tiny-vit", *tiny_overrides, "classifier.kind=analytic", "classifier.projection_dim=32",
                            "output.dir=runs", "output.name=a"], cwd=tmp_path)
    assert rc == 0, err
    m = json.loads((tmp_path / "runs" / "a" / "metrics.json").read_text())
    assert m["complete"] and m["final_average_accuracy"] > 0.2  # 10 digit classes: chance is 0.1
    last = [r for r in m["rounds"] if r["round"] == 1]
    first = [r for r in m["rounds"] if r["round"] == 0]
    assert all(a["uplink_bytes"] > b["uplink_bytes"] for a, b in zip(last, first, strict=True))


@pytest.mark.parametrize("bad", ["classifier.ridge=0", "classifier.ridge=-2", "classifier.ridge=often",
                                 "classifier.ridge=nan", "classifier.projection_dim=-1",
                                 "classifier.projection_dim=2.5"])
def test_cli_rejects_bad_values_in_one_line(run_cli, tmp_path: Path, bad: str) -> None:
    rc, out, err = run_cli(["run", "tiny-vit", "classifier.kind=analytic", bad], cwd=tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert bad.split("=")[0] in lines[0]
