"""Frozen features computed once (``train.feature_cache``): where the cut is, identical runs, invalidation, memory limit."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from fedtalora.api import prepare, run
from fedtalora.config import TrainConfig, from_dict, resolve
from fedtalora.data import ImageTransform, Split
from fedtalora.fed.build import build_method
from fedtalora.fed.cache import FeatureCache, cache_point, cached_inputs
from fedtalora.fed.client import extract_features
from fedtalora.fed.history import without_timing

TRANSFORM = ImageTransform(8, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize(("method_name", "blocks", "usable", "point"), [
    ("head-only", (0, 1), True, None),  # nothing trains in the backbone: the pooled features
    ("fedtalora", (1,), True, 1),  # LoRA from block 1: block 0's output
    ("pilora", (2, 1), True, 1),
    ("ffa-lora", (1,), True, 1),
    ("fedtalora", (0, 1), False, None),  # block 0 adapted: nothing below
    ("finetune", (1,), False, None),  # trains the patch embedding
    ("prompt", (1,), False, None),  # its forward does not go through model(x)
])
def test_the_cut_is_below_everything_that_changes(method_name, blocks, usable, point, make_tiny_model) -> None:
    method = build_method(from_dict({"method": method_name}))
    model = make_tiny_model(depth=3, blocks=blocks)
    method.attach(model)
    ok, at, why = cache_point(model, method, TRANSFORM)
    assert (ok, at) == (usable, point), why


def test_no_cut_below_a_layer_that_draws_random_numbers(tiny_configs) -> None:
    from fedtalora.model import build_model

    model_cfg, lora_cfg = tiny_configs(depth=3, blocks=(2,))
    model_cfg.kwargs = {**model_cfg.kwargs, "drop_path_rate": 0.2}  # drop-path in every block
    model = build_model(model_cfg, lora_cfg, 10, 8, 0)
    ok, _, why = cache_point(model, build_method(from_dict({})), TRANSFORM)
    assert not ok and "random numbers" in why
    model_cfg.kwargs = {k: v for k, v in model_cfg.kwargs.items() if k != "drop_path_rate"}
    ok, _, why = cache_point(build_model(model_cfg, lora_cfg, 10, 8, 0), build_method(from_dict({})), lambda x: x)
    assert not ok and "variants" in why  # an augmentation the cache cannot enumerate


def _cache_run(overrides: list[str], tiny_overrides: list[str]) -> tuple[dict[str, Any], Any]:
    setup = prepare(resolve("demo", [*tiny_overrides, *overrides]))
    return run(setup).metrics, setup


@pytest.mark.parametrize("extra", [
    ["method=head-only"],
    ["method=head-only", "classifier.kind=prototype", "train.feature_cache=host"],
    ["method=fedtalora", "lora.blocks=[1]", "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}"],
    ["method=pilora", "lora.blocks=[1]", "train.optimizer=sgd"],
])
def test_a_cached_run_writes_the_same_metrics_as_an_uncached_one(extra, tiny_overrides) -> None:
    # Execute: the same tiny image run without and with the cache
    plain, _ = _cache_run(extra, tiny_overrides)
    cached, setup = _cache_run(["train.feature_cache=device", *extra], tiny_overrides)

    # Assert: identical metrics.json apart from timing, bit for bit; every sample computed once per variant
    assert without_timing(cached) == without_timing(plain)
    exp = setup.exp
    assert setup.cache.usable and setup.cache.stats["invalidations"] == 0
    assert setup.cache.stats["computed"] == 2 * len(exp.dataset.train) + len(exp.dataset.test)


def test_a_cached_text_run_matches_the_uncached_one(tiny_bert, write_banking, text_overrides, tmp_path) -> None:
    base = [*text_overrides(tiny_bert, write_banking(tmp_path / "banking")), "method=head-only",
            "classifier.kind=prototype"]
    plain = run(resolve("demo", base)).metrics
    setup = prepare(resolve("demo", [*base, "train.feature_cache=device"]))
    cached = run(setup).metrics

    # text: an unpadded batch runs attention without a mask, a padded one with it -> float rounding only
    a, b = without_timing(cached), without_timing(plain)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
    assert setup.cache.stats["computed"] == len(setup.exp.dataset.train) + len(setup.exp.dataset.test)


def _fresh_cache(model: Any, method: Any, **train: Any) -> FeatureCache:
    return FeatureCache(model, method, TRANSFORM, TrainConfig(feature_cache="device", batch_size=4, **train),
                        torch.device("cpu"))


def _split(n: int = 10) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), np.arange(n) % 3)


def test_a_change_below_the_cut_clears_the_cache(make_tiny_model) -> None:
    # Prepare: head-only (cut at the pooled features), features cached once
    method = build_method(from_dict({"method": "head-only"}))
    model = make_tiny_model()
    cache = _fresh_cache(model, method)
    split, idx = _split(), np.arange(10)

    def features() -> torch.Tensor:
        s, t = cached_inputs(cache, "train", split, TRANSFORM, idx, train=False)
        return extract_features(model, s, idx, transform=t, batch_size=3, device=torch.device("cpu"))

    before = features()
    assert cache.stats["computed"] == 10

    # Execute: training the head changes nothing below; a residual folded into an adapted base weight does
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(features(), before) and cache.stats["invalidations"] == 0
    layer = model.lora_pairs()[0].layer
    model.add_to_base({layer: torch.full_like(model.base_weight(layer), 0.01)})
    after = features()

    # Assert: recomputed, equal to the uncached features of the changed model
    assert cache.stats["invalidations"] == 1 and cache.stats["computed"] == 20
    assert not torch.equal(after, before)
    uncached = extract_features(model, split, idx, transform=TRANSFORM, batch_size=3, device=torch.device("cpu"))
    assert torch.allclose(after, uncached, rtol=0, atol=1e-5)  # batches of 4 vs 3 (+1): GEMM rounding may differ


def test_a_split_over_the_memory_limit_runs_uncached(make_tiny_model, caplog) -> None:
    method = build_method(from_dict({"method": "fedtalora"}))
    model = make_tiny_model(depth=3, blocks=(2,))
    big = _split(2000)  # 2 variants x 2000 x 5 tokens x 32 x 4 B = 2.4 MiB > 1 MiB
    cache = _fresh_cache(model, method, feature_cache_mb=1)
    with caplog.at_level(logging.WARNING, logger="fedtalora.fed.cache"):
        split, transform = cached_inputs(cache, "train", big, TRANSFORM, np.arange(2000), train=True)
    assert split is big and transform is TRANSFORM
    assert "exceed train.feature_cache_mb=1" in caplog.text
    small, t = cached_inputs(cache, "test", _split(100), TRANSFORM, np.arange(100), train=True)  # 0.12 MiB fits
    assert t is not TRANSFORM and len(small) == 100


def test_training_from_the_cache_draws_the_same_flips(make_tiny_model) -> None:
    """A cached training batch takes the variants the client's generator draws, as the transform would."""
    from fedtalora.fed.client import local_train

    method = build_method(from_dict({"method": "fedtalora"}))
    model = make_tiny_model(depth=3, blocks=(1, 2))
    split, idx = _split(24), np.arange(24)
    cfg = TrainConfig(batch_size=5, local_epochs=2, optimizer="adamw")
    state = model.trainable_state(method.trainable_keys(model))
    outs = []
    for use in (False, True):
        s, t = cached_inputs(_fresh_cache(model, method) if use else None, "train", split, TRANSFORM, idx, train=True)
        outs.append(local_train(model, method, state, client=0, split=s, indices=idx, targets=split.labels,
                                class_mask=None, transform=t, cfg=cfg, generator=torch.Generator().manual_seed(5),
                                device=torch.device("cpu")))
    assert outs[0].loss == outs[1].loss
    assert all(torch.equal(outs[0].state[k], outs[1].state[k]) for k in outs[0].state)


def test_parallel_clients_and_the_cache_together(tiny_overrides) -> None:
    extra = ["method=head-only", "train.optimizer=sgd"]
    plain, _ = _cache_run(extra, tiny_overrides)
    both, setup = _cache_run([*extra, "train.feature_cache=device", "train.parallel_clients=3"], tiny_overrides)
    a, b = without_timing(both), without_timing(plain)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
    assert setup.cache.stats["batches"] > 0
