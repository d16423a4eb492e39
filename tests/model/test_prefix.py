"""The backbone cut in two (``model/prefix.py``): the two halves compute what the whole does; kernels and compile."""

from __future__ import annotations

import pytest
import torch

from fedtalora.config import LoraConfig, ModelConfig
from fedtalora.data import Split, TextTransform, tokenize_split
from fedtalora.model import build_model
from fedtalora.model.prefix import (
    Activations,
    batch_statistics_modules,
    block_index,
    compile_backbone,
    prefix,
    set_fused_attention,
    skip_zero_adapters,
    split_points,
    stochastic_modules,
)


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("point", [None, 0, 1, 2, 3])
def test_vit_halves_compute_the_whole_forward_bit_for_bit(point, make_tiny_model) -> None:
    # Prepare: a 3-block ViT with trained-looking LoRA in block 2
    model = make_tiny_model(depth=3, blocks=(2,))
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))))
    model.eval()
    x = _images()

    # Execute
    with torch.no_grad():
        acts = prefix(model.backbone, model.spec.blocks_path, x, point)
        got = model.features(acts)
        logits = model(acts)

    # Assert: exactly the uncut model
    assert isinstance(acts, Activations) and acts.point == point
    assert torch.equal(got, model.features(x)) and torch.equal(logits, model(x))
    assert acts.hidden.shape == ((6, 32) if point is None else (6, 5, 32))  # pooled, or cls + 4 patch tokens


def test_gradients_reach_the_lora_above_the_cut_as_in_the_whole_model(make_tiny_model) -> None:
    model = make_tiny_model(depth=3, blocks=(1, 2))
    x, y = _images(), torch.tensor([0, 1, 2, 3, 4, 5])
    grads = []
    for use_cache in (False, True):
        model.zero_grad(set_to_none=True)
        inp = x
        if use_cache:
            with torch.no_grad():
                inp = prefix(model.backbone, model.spec.blocks_path, x, 1)
        torch.nn.functional.cross_entropy(model(inp), y).backward()
        grads.append({k: p.grad.clone() for k, p in model.lora_parameters().items()})
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("point", [None, 1, 2])
def test_text_halves_compute_the_whole_forward(point, tiny_bert) -> None:
    # Prepare: sentences of different lengths (a padded batch)
    model = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True), LoraConfig(rank=2, blocks=[1]),
                        4, 0, 0)
    model.eval()
    split = tokenize_split(Split(["card lost", "where is my card my card", "pin"], [0, 1, 2]),
                           model.backbone.tokenizer, 16)
    x = TextTransform()(split.inputs[torch.arange(3)].to("cpu"))
    blocks_before = list(model.backbone.model.encoder.layer)

    # Execute
    with torch.no_grad():
        acts = prefix(model.backbone, model.spec.blocks_path, x, point)
        got = model(acts)

    # Assert: equal to the whole forward; the encoder has all its layers again; no hook left behind
    assert torch.allclose(got, model(x), atol=1e-6, rtol=0)
    assert list(model.backbone.model.encoder.layer) == blocks_before
    assert not model.backbone.model.embeddings._forward_hooks
    if point is not None:
        assert acts.mask is not None and acts.padded and acts.hidden.shape[:2] == x["input_ids"].shape


def test_where_a_backbone_can_be_cut(make_tiny_model, tiny_bert) -> None:
    vit = make_tiny_model()
    assert split_points(vit.backbone)
    assert block_index("backbone.blocks.3.attn.qkv.lora_A", "blocks") == 3
    assert block_index("backbone.patch_embed.proj.weight", "blocks") is None
    assert block_index("head.weight", "blocks") is None
    bert = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True), LoraConfig(rank=2, blocks=[0]), 4, 0, 0)
    assert split_points(bert.backbone)
    assert block_index("backbone.model.encoder.layer.1.output.dense.lora_B", bert.spec.blocks_path) == 1


def test_stochastic_modules_are_found(tiny_configs) -> None:
    model_cfg, lora_cfg = tiny_configs()
    assert stochastic_modules(build_model(model_cfg, lora_cfg, 10, 8, 0)) == []
    lora_cfg.dropout = 0.1
    found = stochastic_modules(build_model(model_cfg, lora_cfg, 10, 8, 0))
    assert found and all("lora_dropout" in n for n in found)
    model_cfg.kwargs = {**model_cfg.kwargs, "drop_path_rate": 0.1}
    lora_cfg.dropout = 0.0
    assert any("drop_path" in n for n in stochastic_modules(build_model(model_cfg, lora_cfg, 10, 8, 0)))


def test_batch_statistics_modules_are_found(make_tiny_model) -> None:
    model = make_tiny_model()
    assert batch_statistics_modules(model) == []
    model.backbone.blocks[1].norm1 = torch.nn.BatchNorm1d(5)
    assert batch_statistics_modules(model) == ["backbone.blocks.1.norm1"]
    assert batch_statistics_modules(model.backbone) == ["blocks.1.norm1"]


def test_fused_and_eager_attention_agree(make_tiny_model, tiny_bert) -> None:
    model = make_tiny_model()
    model.eval()
    x = _images()
    with torch.no_grad():
        assert set_fused_attention(model.backbone, True) == 2
        fused = model(x)
        set_fused_attention(model.backbone, False)
        eager = model(x)
    assert all(not m.fused_attn for m in model.backbone.modules() if hasattr(m, "fused_attn"))
    assert torch.allclose(fused, eager, atol=1e-5)

    bert = build_model(ModelConfig(backbone=f"hf:{tiny_bert}", pretrained=True), LoraConfig(rank=2, blocks=[0]), 4, 0, 0)
    bert.eval()
    split = tokenize_split(Split(["card lost", "where is my card"], [0, 1]), bert.backbone.tokenizer, 16)
    xt = TextTransform()(split.inputs[torch.arange(2)].to("cpu"))
    outs = {}
    for fused_on in (False, True):
        set_fused_attention(bert.backbone, fused_on)
        assert bert.backbone.model.config._attn_implementation == ("sdpa" if fused_on else "eager")
        with torch.no_grad():
            outs[fused_on] = bert(xt)
    assert torch.allclose(outs[True], outs[False], atol=1e-5)


def test_compile_keeps_names_and_results(make_tiny_model) -> None:
    """``train.compile`` wiring on the CPU (torch's ``aot_eager`` backend: the compile path without a C++
    toolchain's minutes); the parameter names, and so checkpoints, stay those of the eager model."""
    model = make_tiny_model()
    model.eval()
    x = _images()
    with torch.no_grad():
        want = model(x)
    names = [n for n, _ in model.named_parameters()]
    compile_backbone(model.backbone, "none")
    assert model.backbone._compiled_call_impl is None
    compile_backbone(model.backbone, "default", backend="aot_eager")
    with torch.no_grad():
        got = model(x)
    assert model.backbone._compiled_call_impl is not None
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == list(
        make_tiny_model().state_dict())
    assert torch.allclose(got, want, atol=1e-5)


def test_the_run_config_reaches_attention_and_compile(tiny_overrides) -> None:
    """``train.fused_attention`` and ``train.compile`` are applied where every engine builds its model
    (:func:`fedtalora.fed.build.build_components`); compiling is lazy, so building stays cheap."""
    from fedtalora.config import resolve
    from fedtalora.fed.build import build_components

    plain = build_components(resolve("tiny-vit", list(tiny_overrides)), 10).model
    assert all(m.fused_attn for m in plain.backbone.modules() if hasattr(m, "fused_attn"))
    assert plain.backbone._compiled_call_impl is None
    cfg = resolve("tiny-vit", [*tiny_overrides, "train.fused_attention=false", "train.compile=max-autotune"])
    model = build_components(cfg, 10).model
    assert not any(m.fused_attn for m in model.backbone.modules() if hasattr(m, "fused_attn"))
    assert model.backbone._compiled_call_impl is not None


@pytest.mark.parametrize("point", [None, 2])
def test_lora_layers_that_add_zero_are_skipped_without_changing_a_value(point, make_tiny_model) -> None:
    # Prepare: LoRA in blocks 0-2 as initialised (B = 0), A trained-looking; block 1's B made nonzero
    model = make_tiny_model(depth=3, blocks=(0, 1, 2))
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            if ".lora_A" in k:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))))
    model.eval()
    x = _images()
    with torch.no_grad():
        want = prefix(model.backbone, model.spec.blocks_path, x, point).hidden
    grads = {k: p.requires_grad for k, p in model.named_parameters()}

    # Execute: all B zero -> every LoRA layer below the cut is skipped
    with torch.no_grad(), skip_zero_adapters(model.backbone, model.spec.blocks_path, point) as n:
        got = prefix(model.backbone, model.spec.blocks_path, x, point).hidden
    n_layers = len([p for p in model.lora_pairs() if point is None or block_index(p.layer, model.spec.blocks_path) < point])

    # Assert: bit for bit the same activations, flags and requires_grad restored
    assert n == n_layers > 0
    assert torch.equal(got, want)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert not any(m.disable_adapters for m in model._lora.values())

    # Execute: a nonzero B in block 1 is not skipped (it changes the output)
    name = next(p.layer for p in model.lora_pairs() if block_index(p.layer, model.spec.blocks_path) == 1)
    with torch.no_grad():
        model._lora[name].lora_B["default"].weight.fill_(0.5)
        want = prefix(model.backbone, model.spec.blocks_path, x, point).hidden
        with skip_zero_adapters(model.backbone, model.spec.blocks_path, point) as n2:
            got = prefix(model.backbone, model.spec.blocks_path, x, point).hidden
    assert n2 == n_layers - 1
    assert torch.equal(got, want)
