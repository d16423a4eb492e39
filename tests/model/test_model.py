"""Tests of fedtalora.model: LoRA placement, frozen base, residual folding, exact aggregation, seeding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedtalora.config import RunConfig, TrainConfig
from fedtalora.core.aggregation import aggregate_lora, normalize_weights
from fedtalora.data import ImageTransform, Split
from fedtalora.errors import ConfigError
from fedtalora.fed.build import build_method
from fedtalora.fed.client import local_train
from fedtalora.model import build_timm_backbone

ATOL = 1e-5


def _inputs(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that is not a LoRA factor or the head, cloned."""
    trainable = {id(p) for p in model.parameters_by_key().values()}
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: t.detach().clone() for n, t in named if id(t) not in trainable}


def _random_lora(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# --- placement ----------------------------------------------------------------------------------


def test_lora_placement_blocks_and_targets(make_tiny_model) -> None:
    model = make_tiny_model(depth=3, blocks=[0, 2], targets=["qkv", "fc2"], rank=4, alpha=8.0)
    expected = sorted(f"backbone.blocks.{b}.{t}" for b in (0, 2) for t in ("attn.qkv", "mlp.fc2"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == expected
    assert sorted(p.layer for p in model.lora_pairs()) == expected
    assert not isinstance(model.backbone.patch_embed.proj, LoraLayer)
    for b in (0, 1, 2):  # the non-targets of every block and everything in block 1 stay plain
        blk = model.backbone.blocks[b]
        assert not isinstance(blk.attn.proj, LoraLayer)
        assert not isinstance(blk.mlp.fc1, LoraLayer)
    assert not isinstance(model.backbone.blocks[1].attn.qkv, LoraLayer)
    assert not isinstance(model.backbone.blocks[1].mlp.fc2, LoraLayer)
    # The scaling is alpha / rank, and only LoRA factors (and the head) are trainable.
    assert all(p.scaling == pytest.approx(2.0) for p in model.lora_pairs())
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{layer[len('backbone.'):]}.lora_{ab}.default.weight" for layer in expected for ab in ("A", "B")
    }
    # Factor shapes: A (r, d_in), B (d_out, r); B starts at zero (the model starts as the base).
    params = model.lora_parameters()
    assert params["backbone.blocks.0.attn.qkv.lora_A"].shape == (4, 32)
    assert params["backbone.blocks.0.attn.qkv.lora_B"].shape == (96, 4)
    assert params["backbone.blocks.2.mlp.fc2.lora_A"].shape == (4, 128)
    assert params["backbone.blocks.2.mlp.fc2.lora_B"].shape == (32, 4)
    assert all(not p.any() for k, p in params.items() if k.endswith("lora_B"))
    assert all(p.abs().sum() > 0 for k, p in params.items() if k.endswith("lora_A"))


@pytest.mark.parametrize("blocks", [[3], [0, 5]])
def test_lora_block_out_of_range(make_tiny_model, blocks: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"lora\.blocks.*3 blocks"):
        make_tiny_model(depth=3, blocks=blocks)


# --- the frozen base ----------------------------------------------------------------------------


def test_local_training_leaves_frozen_weights_bit_identical(make_tiny_model) -> None:
    model = make_tiny_model(depth=2, blocks=[0, 1])
    cfg = RunConfig(train=TrainConfig(lr=0.1, head_lr=0.1, local_epochs=2, batch_size=8, device="cpu"))
    method = build_method(cfg)
    keys = method.trainable_keys(model)
    assert set(keys) == set(model.lora_parameters()) | {"head.weight", "head.bias"}
    global_state = model.trainable_state(keys)

    frozen = _frozen_tensors(model)
    for layer in (p.layer[len("backbone."):] for p in model.lora_pairs()):
        assert f"backbone.{layer}.base_layer.weight" in frozen
        assert f"backbone.{layer}.base_layer.bias" in frozen
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.norm1.weight", "backbone.norm.weight",
                 "backbone.pos_embed", "backbone.cls_token"):
        assert name in frozen

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = np.arange(40) % 5
    split = Split(images, labels)
    indices = np.arange(4, 36)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:5] = True
    res = local_train(
        model, method, global_state, client=2, split=split, indices=indices, targets=labels[indices],
        class_mask=mask, transform=ImageTransform(8, model.spec.mean, model.spec.std), cfg=cfg.train,
        generator=torch.Generator().manual_seed(1), device=torch.device("cpu"),
    )
    assert res.client == 2 and res.num_samples == 32 and res.steps == 2 * 4
    assert np.isfinite(res.loss)
    assert set(res.state) == set(keys)

    now = dict([*model.named_parameters(), *model.named_buffers()])
    for name, before in frozen.items():
        assert torch.equal(now[name], before), f"frozen tensor {name} changed during local training"
        assert not now[name].requires_grad, name
    changed_b = [p.b_key for p in model.lora_pairs() if not torch.equal(res.state[p.b_key], global_state[p.b_key])]
    assert changed_b == [p.b_key for p in model.lora_pairs()], "every LoRA B should train"
    assert not torch.equal(res.state["head.weight"], global_state["head.weight"])
    # The returned state is what the model now holds.
    params = model.parameters_by_key()
    for k, t in res.state.items():
        assert torch.equal(params[k].detach(), t)


# --- folding and exact aggregation ----------------------------------------------------------------


@torch.no_grad()
def test_folding_residual_into_base_preserves_function(make_tiny_model) -> None:
    model = make_tiny_model(depth=2, blocks=[0, 1], rank=4, alpha=8.0).eval()
    _random_lora(model, seed=3)
    x = _inputs()
    y0 = model(x)
    no_lora = copy.deepcopy(model)
    for p in no_lora.lora_pairs():
        no_lora.parameters_by_key()[p.b_key].zero_()
    assert (no_lora(x) - y0).abs().max() > 1e-3, "the random LoRA factors should matter"

    params = model.lora_parameters()
    for pair in model.lora_pairs():
        assert pair.scaling == pytest.approx(2.0)
        A, B = params[pair.a_key], params[pair.b_key]
        before = model.effective_weight(pair.layer).clone()
        model.add_to_base({pair.layer: pair.scaling * B @ A})
        B.zero_()
        torch.testing.assert_close(model.effective_weight(pair.layer), before, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(x), y0, atol=ATOL, rtol=0)
    assert all(not params[p.b_key].any() for p in model.lora_pairs())


def _client_states(model: nn.Module, keys: list[str], n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = model.parameters_by_key()
    return [{k: torch.randn(params[k].shape, generator=g) * 0.1 for k in keys} for _ in range(n)]


@torch.no_grad()
def _reference_outputs(tiny_configs, states, weights, pairs, x) -> torch.Tensor:
    """A plain timm backbone (no LoRA) with W0 + s sum_k p_k B_k A_k and the averaged head."""
    model_cfg, _ = tiny_configs(depth=2)
    plain, spec = build_timm_backbone(model_cfg, 8, seed=0)
    plain.eval()
    mods = dict(plain.named_modules())
    p = weights.tolist()
    for pair in pairs:
        delta = sum(pk * s[pair.b_key].double() @ s[pair.a_key].double() for pk, s in zip(p, states, strict=True))
        lin = mods[pair.layer[len("backbone."):]]
        lin.weight.copy_((lin.weight.double() + pair.scaling * delta).float())
    head = nn.Linear(spec.num_features, 10)
    head.weight.copy_(sum(pk * s["head.weight"].double() for pk, s in zip(p, states, strict=True)).float())
    head.bias.copy_(sum(pk * s["head.bias"].double() for pk, s in zip(p, states, strict=True)).float())
    return head(plain(x))


@torch.no_grad()
def test_residual_aggregation_is_exact_and_naive_is_not(make_tiny_model, tiny_configs) -> None:
    x = _inputs()
    method_res = build_method(RunConfig())
    cfg_naive = RunConfig()
    cfg_naive.fed.residual = False
    method_naive = build_method(cfg_naive)

    model = make_tiny_model(depth=2, blocks=[0, 1], rank=4, alpha=8.0).eval()
    # Sanity: with B = 0 the LoRA model is the plain backbone it was built from (same seed).
    model_cfg, _ = tiny_configs(depth=2)
    plain, _spec = build_timm_backbone(model_cfg, 8, seed=0)
    torch.testing.assert_close(model.backbone(x), plain.eval()(x), atol=ATOL, rtol=0)

    keys = method_res.trainable_keys(model)
    states = _client_states(model, keys, 3, seed=7)
    weights = normalize_weights([120, 45, 80])
    pairs = model.lora_pairs()
    ref = _reference_outputs(tiny_configs, states, weights, pairs, x)

    agg = aggregate_lora(states, weights, pairs, residual=True)
    assert set(agg.residuals) == {p.layer for p in pairs}
    assert agg.max_error <= 1e-6
    method_res.apply(model, agg)
    torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)

    naive_model = make_tiny_model(depth=2, blocks=[0, 1], rank=4, alpha=8.0).eval()
    agg_naive = aggregate_lora(states, weights, naive_model.lora_pairs(), residual=False)
    assert agg_naive.residuals == {}
    assert agg_naive.max_error > 1e-2
    method_naive.apply(naive_model, agg_naive)
    assert (naive_model(x) - ref).abs().max() > 1e-4
    # Same averaged factors and head in both; only the base differs.
    for k in keys:
        torch.testing.assert_close(naive_model.parameters_by_key()[k], model.parameters_by_key()[k])


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_same_model_different_seed_different_lora(make_tiny_model) -> None:
    a = make_tiny_model(seed=5).state_dict()
    b = make_tiny_model(seed=5).state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = make_tiny_model(seed=6).state_dict()
    lora_a = [k for k in a if ".lora_A." in k]
    assert lora_a
    assert all(not torch.equal(a[k], c[k]) for k in lora_a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_building_does_not_touch_global_rng(make_tiny_model) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny_model(seed=1)
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)
