"""Tests of the server's update screening (validation.py), the injected faults (faults.py) and how the
loop uses both: rejected updates are left out, too few valid ones skip the round, nothing is accepted
silently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedtalora.api import run
from fedtalora.config import FaultsConfig, resolve
from fedtalora.core.aggregation import fedavg, normalize_weights
from fedtalora.core.validation import check_update, screen_updates, update_norm
from fedtalora.fed.faults import SCALE, corrupt, draw_fault


def _state(seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"lora_A": (4, 6), "lora_B": (5, 4), "head.weight": (3, 5), "head.bias": (3,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# --- update_norm -------------------------------------------------------------------------------------


def test_update_norm_hand_computed() -> None:
    # Prepare: the update moves a by (3, 0) and b by 4 -> distance sqrt(9 + 16) = 5.
    reference = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[5.0]])}
    # Execute / Assert
    assert update_norm(update, reference) == 5.0
    assert check_update(update, 10, reference, max_norm=5.0) is None  # the bound is inclusive
    reason = check_update(update, 10, reference, max_norm=4.99)
    assert reason is not None and "update norm 5 exceeds fed.max_update_norm=4.99" in reason


@pytest.mark.parametrize("seed", range(5))
def test_update_norm_properties(seed: int) -> None:
    ref, upd = _state(seed), _state(seed + 100)
    flat = torch.cat([(upd[k].double() - ref[k].double()).flatten() for k in ref])
    assert update_norm(upd, ref) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-12)
    assert update_norm(upd, ref) == pytest.approx(update_norm(ref, upd), rel=1e-12)  # symmetric
    assert update_norm(ref, ref) == 0.0
    c = 1.0 + seed
    scaled = {k: ref[k] + c * (upd[k] - ref[k]) for k in ref}
    assert update_norm(scaled, ref) == pytest.approx(c * update_norm(upd, ref), rel=1e-5)


# --- check_update ------------------------------------------------------------------------------------


def test_valid_update_is_accepted() -> None:
    ref = _state(0)
    assert check_update(_state(1), 7, ref) is None
    assert check_update(_state(1), 7.5, ref, max_norm=1e9) is None


@pytest.mark.parametrize(("damage", "words"), [
    pytest.param(lambda s: s.pop("head.bias"), ["missing", "head.bias"], id="missing-key"),
    pytest.param(lambda s: s.update(extra=torch.zeros(2)), ["unexpected", "extra"], id="extra-key"),
    pytest.param(lambda s: s.update(lora_A=torch.zeros(4, 7)), ["lora_A", "(4, 7)", "(4, 6)"], id="shape"),
    pytest.param(lambda s: s.update(lora_A=torch.zeros(24)), ["lora_A", "(24,)"], id="flattened"),
    pytest.param(lambda s: s.update(lora_A=torch.zeros(4, 6, dtype=torch.float64)), ["lora_A", "float64"],
                 id="dtype"),
    pytest.param(lambda s: s["lora_B"].view(-1).__setitem__(3, float("nan")), ["lora_B", "1 non-finite"], id="nan"),
    pytest.param(lambda s: s["head.bias"].fill_(float("inf")), ["head.bias", "3 non-finite"], id="inf"),
    pytest.param(lambda s: s["lora_A"].__setitem__(0, float("-inf")), ["lora_A", "6 non-finite"], id="neg-inf"),
    pytest.param(lambda s: s.update(lora_A=[[0.0] * 6] * 4), ["lora_A", "not a tensor"], id="not-a-tensor"),
])
def test_bad_update_is_rejected_with_a_reason(damage, words) -> None:
    ref = _state(0)
    upd = _state(1)
    damage(upd)
    reason = check_update(upd, 10, ref)
    assert reason is not None
    for w in words:
        assert w in reason, (w, reason)
    assert "\n" not in reason


@pytest.mark.parametrize("n", [0, -3, float("nan"), float("inf"), True, "12", None])
def test_bad_sample_count_is_rejected(n) -> None:
    reason = check_update(_state(1), n, _state(0))
    assert reason is not None and "num_samples" in reason


def test_screen_updates_keeps_the_valid_ones_in_order() -> None:
    ref = _state(0)
    ups = [_state(i) for i in range(1, 6)]
    ups[1]["lora_A"][0, 0] = float("nan")
    ups[3] = {k: v for k, v in ups[3].items() if k != "lora_B"}
    counts = [5, 6, 7, 8, 0]  # the last one claims no samples
    s = screen_updates(ups, counts, ref)
    assert s.accepted == [0, 2]
    assert [i for i, _ in s.rejected] == [1, 3, 4]
    assert "non-finite" in s.rejected[0][1] and "missing" in s.rejected[1][1] and "num_samples" in s.rejected[2][1]
    # The rest aggregate exactly as if the rejected clients had not taken part.
    w = normalize_weights([counts[i] for i in s.accepted])
    avg = fedavg([ups[i] for i in s.accepted], w)
    for k in ref:
        expected = (5 * ups[0][k].double() + 7 * ups[2][k].double()) / 12
        torch.testing.assert_close(avg[k].double(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="2 updates but 1"):
        screen_updates(ups[:2], [1], ref)


# --- faults -----------------------------------------------------------------------------------------


def test_no_faults_by_default() -> None:
    cfg = FaultsConfig()
    assert all(draw_fault(cfg, 0, t, r, k) == draw_fault(cfg, 0, 0, 0, 0) for t in range(3) for r in range(3)
               for k in range(3))
    f = draw_fault(cfg, 0, 1, 2, 3)
    assert not f.dropped and not f.corrupted


def test_fault_draws_are_seeded_per_client_and_round() -> None:
    cfg = FaultsConfig(client_dropout=0.3, corrupt_update=0.4)
    grid = [(t, r, k) for t in range(10) for r in range(10) for k in range(20)]
    fates = [draw_fault(cfg, 7, *p) for p in grid]
    again = [draw_fault(cfg, 7, *p) for p in reversed(grid)][::-1]  # order of drawing does not matter
    assert [(f.dropped, f.corrupted) for f in fates] == [(f.dropped, f.corrupted) for f in again]
    other_seed = [draw_fault(cfg, 8, *p) for p in grid]
    assert [f.dropped for f in fates] != [f.dropped for f in other_seed]
    n = len(grid)
    drop_rate = sum(f.dropped for f in fates) / n
    corrupt_rate = sum(f.corrupted for f in fates) / sum(not f.dropped for f in fates)
    assert drop_rate == pytest.approx(0.3, abs=0.04)
    assert corrupt_rate == pytest.approx(0.4, abs=0.04)
    assert not any(f.dropped and f.corrupted for f in fates)
    # Raising the dropout probability drops a superset and leaves the corruption draw of the others alone.
    more = [draw_fault(FaultsConfig(client_dropout=0.6, corrupt_update=0.4), 7, *p) for p in grid]
    assert all(m.dropped for f, m in zip(fates, more, strict=True) if f.dropped)
    assert all(m.corrupted == f.corrupted for f, m in zip(fates, more, strict=True) if not m.dropped)


@pytest.mark.parametrize("kind", ["nan", "shape", "scale"])
def test_corruptions_are_caught_by_screening(kind: str) -> None:
    ref, upd = _state(0), _state(1)
    before = {k: v.clone() for k, v in upd.items()}
    bad = corrupt(upd, ref, kind, np.random.default_rng(3))
    for k in upd:  # the input is left alone
        assert torch.equal(upd[k], before[k])
    honest = update_norm(upd, ref)
    if kind == "scale":
        assert check_update(bad, 10, ref) is None  # only a norm bound can tell
        assert update_norm(bad, ref) == pytest.approx(SCALE * honest, rel=1e-4)
        assert "exceeds fed.max_update_norm" in check_update(bad, 10, ref, max_norm=10 * honest)
        assert check_update(upd, 10, ref, max_norm=10 * honest) is None
    else:
        reason = check_update(bad, 10, ref)
        assert reason is not None and ("non-finite" if kind == "nan" else "shape") in reason
    changed = [k for k in upd if bad[k].shape != upd[k].shape or not torch.equal(bad[k], upd[k])]
    assert len(changed) == (len(upd) if kind == "scale" else 1)


# --- in the loop ------------------------------------------------------------------------------------


def _rounds_consistent(m: dict) -> None:
    rel = m["reliability"]
    rounds = m["rounds"]
    assert rel["dropped_clients"] == sum(len(r["dropped"]) for r in rounds)
    assert rel["corrupted_updates"] == sum(len(r["corrupted"]) for r in rounds)
    assert rel["rejected_updates"] == sum(len(r["rejected"]) for r in rounds)
    assert rel["skipped_rounds"] == sum(r["skipped"] for r in rounds)
    for r in rounds:
        rejected = [x["client"] for x in r["rejected"]]
        assert sorted(r["aggregated"] + r["dropped"] + rejected) == r["clients"]
        assert len(r["num_samples"]) == len(r["aggregated"])
        if r["skipped"]:
            assert r["aggregation_error"] is None and r["train_loss"] is None and r["residual_bytes_factored"] == 0
        else:
            assert r["aggregation_error_rounding"] <= 2 and math.isfinite(r["train_loss"])
            assert r["aggregation_error_accumulated_rounding"] <= 2


@pytest.mark.parametrize(("fault", "expected"), [
    # Nobody returns anything.
    ("faults.client_dropout=1.0", {"dropped_clients": 12, "corrupted_updates": 0, "rejected_updates": 0}),
    # Everybody trains (the shared model is changed by local training) and sends a poisoned update.
    ("faults.corrupt_update=1.0", {"dropped_clients": 0, "corrupted_updates": 12, "rejected_updates": 12}),
])
def test_rounds_without_valid_updates_are_skipped_and_keep_the_model(fault, expected, tiny_overrides,
                                                                      make_tiny_model) -> None:
    m = run(resolve("tiny-vit", [*tiny_overrides, fault]))
    metrics = m.metrics
    assert metrics["complete"] is True
    assert metrics["reliability"] == {**expected, "skipped_rounds": 4}
    _rounds_consistent(metrics)
    assert (metrics["uplink_bytes_total"] == 0) == (expected["dropped_clients"] == 12)
    # The global model is the initial one: same trainable tensors, same base weights.
    fresh = make_tiny_model(seed=0)
    for k, v in fresh.parameters_by_key().items():
        assert torch.equal(m.model.parameters_by_key()[k].detach().cpu(), v.detach()), k
    for p in fresh.lora_pairs():
        assert torch.equal(m.model.base_weight(p.layer).detach().cpu(), fresh.base_weight(p.layer).detach())
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON (None, not NaN)


def test_rejected_updates_are_left_out_and_never_reach_the_model(tiny_overrides) -> None:
    overrides = [*tiny_overrides, "fed.rounds_per_task=3", "faults.corrupt_update=0.4", "faults.corrupt_kind=nan",
                 "fed.min_clients=2"]
    res = run(resolve("tiny-vit", overrides))
    m = res.metrics
    _rounds_consistent(m)
    rel = m["reliability"]
    assert rel["corrupted_updates"] > 0 and rel["rejected_updates"] == rel["corrupted_updates"]
    assert rel["skipped_rounds"] > 0, "this seed gives at least one round with fewer than 2 valid updates"
    assert any(not r["skipped"] and r["rejected"] for r in m["rounds"]), "and one that aggregates the rest"
    for r in m["rounds"]:
        assert [x["client"] for x in r["rejected"]] == r["corrupted"]
        assert r["skipped"] == (len(r["aggregated"]) < 2)
    for k, v in res.model.parameters_by_key().items():
        assert torch.isfinite(v).all(), k
    for p in res.model.lora_pairs():
        assert torch.isfinite(res.model.base_weight(p.layer)).all()
    assert math.isfinite(m["final_average_accuracy"])


def test_norm_bound_rejects_scaled_updates_only(tiny_overrides) -> None:
    base = [*tiny_overrides, "faults.corrupt_update=0.5", "faults.corrupt_kind=scale"]
    unbounded = run(resolve("tiny-vit", base)).metrics
    assert unbounded["reliability"]["rejected_updates"] == 0  # without a bound the poison goes through
    honest = run(resolve("tiny-vit", [*tiny_overrides, "fed.max_update_norm=50"])).metrics
    assert honest["reliability"]["rejected_updates"] == 0  # honest updates of this run are far below 50
    bounded = run(resolve("tiny-vit", [*base, "fed.max_update_norm=50"])).metrics
    _rounds_consistent(bounded)
    assert bounded["reliability"]["rejected_updates"] == bounded["reliability"]["corrupted_updates"] > 0
    for r in bounded["rounds"]:
        assert all("exceeds fed.max_update_norm=50" in x["reason"] for x in r["rejected"])


def test_tensor_mismatch_can_ignore_dtype() -> None:
    from fedtalora.core.validation import tensor_mismatch

    ref = {"w": torch.zeros(2, 3)}
    assert tensor_mismatch({"w": torch.zeros(2, 3, dtype=torch.float64)}, ref, check_dtype=False) is None
    assert "float64" in tensor_mismatch({"w": torch.zeros(2, 3, dtype=torch.float64)}, ref)
    assert "(3, 2)" in tensor_mismatch({"w": torch.zeros(3, 2)}, ref, check_dtype=False)
