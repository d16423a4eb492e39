"""``train.threads``: torch's intra-op thread count for a run (the demo preset uses 1)."""

from __future__ import annotations

import pytest
import torch

from fedtalora.config import resolve
from fedtalora.engine import prepare
from fedtalora.errors import ConfigError


def test_demo_preset_runs_on_one_thread() -> None:
    assert resolve("demo").train.threads == 1


def test_prepare_sets_the_thread_count_and_zero_keeps_it(tiny_overrides: list[str]) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prepare(resolve("demo", [*tiny_overrides, "train.threads=2"]))
        assert torch.get_num_threads() == 2
        prepare(resolve("demo", [*tiny_overrides, "train.threads=0"]))
        assert torch.get_num_threads() == 2, "0 leaves torch's setting alone"
    finally:
        torch.set_num_threads(before)


def test_negative_threads_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.threads"):
        resolve("demo", ["train.threads=-1"])
