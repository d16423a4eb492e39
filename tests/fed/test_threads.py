"""``train.threads``: torch's intra-op thread count for a run (the demo and tiny-vit presets use 1)."""

from __future__ import annotations

import pytest
import torch

from fedtalora.api import run
from fedtalora.config import resolve
from fedtalora.errors import ConfigError
from fedtalora.fed.build import torch_threads


def test_demo_presets_run_on_one_thread() -> None:
    assert resolve("tiny-vit").train.threads == 1 and resolve("demo").train.threads == 1


def test_threads_apply_for_the_duration_only_and_zero_keeps_the_setting() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1, "restored afterwards: no process-wide side effect"
        with torch_threads(0):
            assert torch.get_num_threads() == 1, "0 leaves torch's setting alone"
    finally:
        torch.set_num_threads(before)


def test_a_run_trains_with_its_thread_count(tiny_overrides: list[str]) -> None:
    seen: list[int] = []
    before = torch.get_num_threads()
    run(resolve("tiny-vit", [*tiny_overrides, "train.threads=2", "fed.rounds_per_task=1"]),
        progress=lambda e: seen.append(torch.get_num_threads()) if e["event"] == "round" else None)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before


def test_negative_threads_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.threads"):
        resolve("tiny-vit", ["train.threads=-1"])
