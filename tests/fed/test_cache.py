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
    setup = prepare(resolve("tiny-vit", [*tiny_overrides, *overrides]))
    return run(setup).metrics, setup


@pytest.mark.parametrize("extra", [
    ["method=head-only"],
    ["method=head-only", "classifier.kind=prototype", "train.feature_cache=host"],
    ["method=head-only", "classifier.kind=analytic", "classifier.projection_dim=64"],  # statistics from the cache
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
    plain = run(resolve("tiny-vit", base)).metrics
    setup = prepare(resolve("tiny-vit", [*base, "train.feature_cache=device"]))
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


def test_a_cut_at_a_block_is_cleared_only_by_changes_below_it(make_tiny_model) -> None:
    """Cut at block 2 (LoRA in block 2 only): the residual folded into block 2 and a trained head keep the cache;
    an in-place change, a replaced parameter or a loaded state below block 2 clear it, and what is served then
    equals the changed model's own prefix."""
    from fedtalora.model.prefix import prefix

    # Prepare
    method = build_method(from_dict({"method": "fedtalora"}))
    model = make_tiny_model(depth=3, blocks=(2,))
    cache = _fresh_cache(model, method)
    assert cache.point == 2
    split, idx = _split(), np.arange(10)

    def served() -> torch.Tensor:
        s, t = cached_inputs(cache, "train", split, TRANSFORM, idx, train=False)
        return t(s.inputs[torch.arange(10)]).hidden

    def own() -> torch.Tensor:
        with torch.no_grad():
            return prefix(model.backbone, model.spec.blocks_path, TRANSFORM(split.inputs, train=False), 2).hidden

    first = served()

    # Execute + Assert: changes at or above the cut keep it
    layer = model.lora_pairs()[0].layer
    assert ".blocks.2." in layer
    model.add_to_base({layer: torch.full_like(model.base_weight(layer), 0.01)})
    with torch.no_grad():
        model.head.weight.mul_(2.0)
        model.backbone.blocks[2].norm1.weight.add_(1.0)
    assert torch.equal(served(), first) and cache.stats["invalidations"] == 0

    # ... each change below it clears it (a new tensor, an in-place change, a loaded state dict)
    changes = [
        lambda: setattr(model.backbone.blocks[1].norm2, "weight",
                        torch.nn.Parameter(model.backbone.blocks[1].norm2.weight.detach() + 0.5, requires_grad=False)),
        lambda: model.backbone.blocks[0].attn.qkv.weight.detach().mul_(1.5),  # a detached view shares the counter
        lambda: model.backbone.patch_embed.proj.bias.add_(0.1),
        lambda: model.backbone.load_state_dict({k: v * 0.9 for k, v in model.backbone.state_dict().items()}),
    ]
    for n, change in enumerate(changes, start=1):
        before = served()
        with torch.no_grad():
            change()
        now = served()
        assert cache.stats["invalidations"] == n
        assert not torch.equal(now, before)
        assert torch.allclose(now, own(), rtol=0, atol=1e-5)  # fill batches of 4 vs one batch of 10


def test_batch_normalisation_below_the_cut_turns_the_cache_off(make_tiny_model) -> None:
    method = build_method(from_dict({"method": "head-only"}))
    model = make_tiny_model()
    assert cache_point(model, method, TRANSFORM)[0]
    model.backbone.norm_pre = torch.nn.BatchNorm1d(5)  # 4 patches + cls token as channels: only its kind matters
    ok, _, why = cache_point(model, method, TRANSFORM)
    assert not ok and "batch statistics" in why and "norm_pre" in why


def test_a_bf16_cached_run_matches_the_uncached_one(tiny_overrides) -> None:
    """The fill runs under the same bf16 autocast as training: the cached activations are what the uncached
    bf16 forward computes (the block outputs stay float32 under autocast), so the runs agree."""
    extra = ["method=fedtalora", "lora.blocks=[1]", "train.precision=bf16", "train.optimizer=sgd"]
    plain, _ = _cache_run(extra, tiny_overrides)
    cached, setup = _cache_run(["train.feature_cache=device", *extra], tiny_overrides)
    a, b = without_timing(cached), without_timing(plain)
    assert setup.cache.usable and setup.cache.point == 1 and setup.cache.stats["batches"] > 0
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)  # bf16: ~3 significant digits


def test_cached_training_reads_nothing_back_from_the_device(make_tiny_model) -> None:
    """GPU readiness on the CPU: filling the cache and training from it, one client and several together, with
    the model and the cache on ``meta`` (every read-back from the device raises); the bookkeeping of what is
    filled stays on the host."""
    from fedtalora.fed.client import ClientJob, make_optimizer, train_steps
    from fedtalora.fed.parallel import train_steps_together
    from fedtalora.seeding import torch_generator

    # Prepare: LoRA in blocks 1-2 (cut at block 1), the model and the cache on meta
    meta = torch.device("meta")
    method = build_method(from_dict({"method": "fedprox"}))
    model = make_tiny_model(depth=3, blocks=(1, 2)).to(meta)
    cache = FeatureCache(model, method, TRANSFORM, TrainConfig(feature_cache="device", batch_size=4), meta)
    split, idx = _split(24), np.arange(24)
    cfg = TrainConfig(batch_size=5, local_epochs=2, optimizer="adamw")
    keys = method.trainable_keys(model)
    state = model.trainable_state(keys)

    # Execute: fill, one client's inner loop, three clients together
    s, t = cached_inputs(cache, "train", split, TRANSFORM, idx, train=True)
    model.load_trainable(state)
    for k, p in model.parameters_by_key().items():
        p.requires_grad_(k in keys)
    method.on_local_start(model, state)
    total, n = train_steps(model, method, make_optimizer(method.param_groups(model, keys), cfg), s.inputs,
                           torch.arange(24), torch.as_tensor(split.labels), None, transform=t, cfg=cfg,
                           generator=torch.Generator().manual_seed(0), device=meta)
    jobs = [ClientJob(k, idx[k * 8:(k + 1) * 8], split.labels[k * 8:(k + 1) * 8], None,
                      torch_generator(0, "local", 0, 0, k)) for k in range(3)]
    states, totals, steps = train_steps_together(model, method, state, jobs, split=s, transform=t, cfg=cfg, device=meta)

    # Assert: every sample filled once per variant, on the device; the loops ran to the end there
    assert t is not TRANSFORM and cache.stats["computed"] == 2 * 24
    store = cache.stores["train"]
    assert store.values is not None and store.values.device.type == "meta" and store.have.device.type == "cpu"
    assert n == 2 * 5 and total.device.type == "meta"
    assert steps == [4, 4, 4] and all(v.device.type == "meta" for st in states for v in st.values())
