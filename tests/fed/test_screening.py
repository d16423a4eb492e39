"""Updates screening lets through but that deserve a warning (:mod:`fedtalora.fed.screening`): flagged only when
``fed.max_update_norm=0`` sets no bound, only above ``LARGE_UPDATE_RATIO``, recorded per round and said in the
run summary."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtalora.api import run
from fedtalora.config import resolve
from fedtalora.fed.history import History, RoundRecord
from fedtalora.fed.screening import LARGE_UPDATE_RATIO, large_update_ratio, screening_summary, warn_if_large


def test_large_update_ratio_hand_example() -> None:
    g = {"a": torch.tensor([3.0, 4.0])}  # ||g|| = 5
    small = {"a": torch.tensor([3.0, 14.0])}  # ratio 2
    huge = {"a": torch.tensor([3.0, 4.0 + 5.0 * 11])}  # ratio 11
    assert LARGE_UPDATE_RATIO == 10.0
    assert large_update_ratio(small, g, 0.0) is None
    assert large_update_ratio(huge, g, 0.0) == pytest.approx(11.0)
    assert large_update_ratio(huge, g, 10.0) is None  # a bound is set: screening enforced it
    zero = {"a": torch.zeros(2)}
    assert large_update_ratio({"a": torch.ones(2)}, zero, 0.0) is None  # no ratio of an all-zero state


def test_warn_if_large_logs_one_line(caplog) -> None:
    g = {"a": torch.ones(4)}
    with caplog.at_level(logging.WARNING, logger="fedtalora.fed.screening"):
        assert warn_if_large({"a": torch.full((4,), 1000.0)}, g, 0.0, "[task 1/2 | round 1/2]", 3)
        assert not warn_if_large({"a": torch.full((4,), 1.5)}, g, 0.0, "[task 1/2 | round 1/2]", 4)
    [record] = caplog.records
    assert "client 3" in record.getMessage() and "999" in record.getMessage() and "fed.max_update_norm=0" in \
        record.getMessage()


def test_screening_summary() -> None:
    h = History(rounds=[RoundRecord(large_updates=[1, 2]), RoundRecord(large_updates=[0])])
    assert screening_summary(0.0, h) == ("shapes and finite values only; update norms unbounded (fed.max_update_norm=0); "
                                         f"3 accepted update(s) were over {LARGE_UPDATE_RATIO:g}x the global state")
    assert screening_summary(0.0, History()).endswith("(fed.max_update_norm=0)")
    assert screening_summary(2.5, h) == "shapes, finite values, update norm <= 2.5 (fed.max_update_norm)"


def test_scaled_updates_are_flagged_and_ordinary_ones_are_not(tiny_overrides) -> None:
    """A run where some updates are scaled by 1000 (``faults.corrupt_kind=scale``) and no bound is set: every
    flagged client is a scaled one, and scaled ones are flagged (not all: in a round whose ordinary change is
    below 1 % of the state, 1000 times it stays under the threshold); with a bound, nothing is flagged."""
    faults = ["faults.corrupt_update=0.3", "faults.corrupt_kind=scale"]
    h = run(resolve("tiny-vit", [*tiny_overrides, *faults])).history
    flagged = {(r.task, r.round, k) for r in h.rounds for k in r.large_updates}
    scaled = {(r.task, r.round, k) for r in h.rounds for k in r.corrupted}
    assert scaled and flagged and flagged <= scaled, (flagged, scaled)  # no ordinary update is flagged
    bounded = run(resolve("tiny-vit", [*tiny_overrides, *faults, "fed.max_update_norm=50"])).history
    assert not any(r.large_updates for r in bounded.rounds)
