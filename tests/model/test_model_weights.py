"""``model.checkpoint``: local weight files load strictly into the timm backbone, or fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fedtalora.app.cli import main
from fedtalora.config import ModelConfig
from fedtalora.errors import ModelError
from fedtalora.model import build_model, build_timm_backbone, read_checkpoint

BACKBONE = "vit_tiny_patch16_224"


@pytest.fixture
def timm_model(tiny_model_kwargs):  # noqa: ANN201
    """``timm_model(seed, img_size=8, num_classes=0, **overrides)``: a tiny timm ViT with seeded weights."""

    def make(seed: int, *, img_size: int = 8, num_classes: int = 0, **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        kwargs = {**tiny_model_kwargs, **overrides}
        return timm.create_model(BACKBONE, pretrained=False, num_classes=num_classes, img_size=img_size,
                                 **kwargs).eval()

    return make


def save(model: torch.nn.Module, path: Path, wrap: str = "") -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return path


@pytest.fixture
def backbone_cfg(tiny_model_kwargs):  # noqa: ANN201
    """``backbone_cfg(path, **kwargs)``: the tiny ViT's model config loading weights from ``path``."""

    def make(path: Path | str, **kw) -> ModelConfig:
        return ModelConfig(backbone=BACKBONE, pretrained=False, checkpoint=str(path), kwargs={**tiny_model_kwargs, **kw})

    return make


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_through_the_config_gives_equal_outputs(tmp_path: Path, suffix: str, tiny_configs, timm_model) -> None:
    source = timm_model(seed=123)
    path = save(source, tmp_path / f"weights{suffix}")
    model_cfg, lora_cfg = tiny_configs()
    model_cfg.checkpoint = str(path)
    model = build_model(model_cfg, lora_cfg, num_classes=5, image_size=8, seed=0).eval()
    assert model.spec.pretrained
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # LoRA starts with B = 0, so the adapted backbone computes exactly what the saved model does.
        torch.testing.assert_close(model.backbone(x), source(x), rtol=0, atol=0)
        other = build_model(*tiny_configs(), num_classes=5, image_size=8, seed=0).eval()
        assert not torch.allclose(other.backbone(x), source(x))  # without the file: different weights
    for name, tensor in source.state_dict().items():
        loaded = dict(model.backbone.named_parameters()) | dict(model.backbone.named_buffers())
        key = name if name in loaded else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(loaded[key], tensor), name


def test_wrapped_ddp_and_classifier_checkpoints_load(tmp_path: Path, timm_model, backbone_cfg) -> None:
    source = timm_model(seed=7, num_classes=10)  # a classifier checkpoint: its head is dropped
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, tmp_path / "ddp.pth")
    backbone, spec = build_timm_backbone(backbone_cfg(tmp_path / "ddp.pth"), image_size=8, seed=0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), source.forward_head(source.forward_features(x), pre_logits=True))
    assert spec.pretrained


def test_position_embeddings_are_resampled_to_the_image_size(tmp_path: Path, timm_model, backbone_cfg) -> None:
    path = save(timm_model(seed=1, img_size=8), tmp_path / "w8.safetensors")
    backbone, _ = build_timm_backbone(backbone_cfg(path), image_size=16, seed=0)
    assert backbone.pos_embed.shape[1] == 1 + (16 // 4) ** 2


def test_state_dict_wrapper_is_unwrapped(tmp_path: Path, timm_model) -> None:
    path = save(timm_model(seed=2), tmp_path / "w.pth", wrap="state_dict")
    state = read_checkpoint(str(path))
    assert "cls_token" in state and "epoch" not in state


def one_line_model_error(cfg: ModelConfig) -> str:
    with pytest.raises(ModelError) as info:
        build_timm_backbone(cfg, image_size=8, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and "model.checkpoint" in msg
    return msg


def test_deeper_checkpoint_lists_unexpected_keys(tmp_path: Path, timm_model, backbone_cfg) -> None:
    msg = one_line_model_error(backbone_cfg(save(timm_model(seed=0, depth=3), tmp_path / "deep.safetensors")))
    assert "unexpected key(s)" in msg and "blocks.2." in msg and "in all" in msg


def test_shallower_checkpoint_lists_missing_keys(tmp_path: Path, timm_model, backbone_cfg) -> None:
    msg = one_line_model_error(backbone_cfg(save(timm_model(seed=0, depth=1), tmp_path / "shallow.pth")))
    assert "missing key(s)" in msg and "blocks.1." in msg


def test_wider_checkpoint_lists_shape_mismatches(tmp_path: Path, timm_model, backbone_cfg) -> None:
    msg = one_line_model_error(backbone_cfg(save(timm_model(seed=0, embed_dim=48, num_heads=2), tmp_path / "wide.pth")))
    assert "shape mismatch" in msg and "(48,)" in msg and "(32,)" in msg


def test_a_dropped_key_is_not_silently_left_at_its_init(tmp_path: Path, timm_model, backbone_cfg) -> None:
    state = timm_model(seed=0).state_dict()
    del state["blocks.0.norm1.weight"]
    torch.save(state, tmp_path / "hole.pth")
    msg = one_line_model_error(backbone_cfg(tmp_path / "hole.pth"))
    assert "1 missing key(s) (blocks.0.norm1.weight)" in msg


class NotATensor:
    pass


@pytest.mark.parametrize("case", ["missing", "suffix", "garbage", "pickle", "empty"])
def test_unreadable_files_are_one_line_errors(tmp_path: Path, case: str, backbone_cfg) -> None:
    path = {
        "missing": tmp_path / "nope.safetensors",
        "suffix": tmp_path / "weights.npz",
        "garbage": tmp_path / "garbage.safetensors",
        "pickle": tmp_path / "code.pth",
        "empty": tmp_path / "empty.pth",
    }[case]
    if case == "suffix":
        path.write_bytes(b"x")
    elif case == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif case == "pickle":  # weights_only=True refuses arbitrary objects instead of running their code
        torch.save({"obj": NotATensor()}, path)
    elif case == "empty":
        torch.save({"epoch": 1}, path)
    msg = one_line_model_error(backbone_cfg(path))
    assert path.name in msg


def test_cli_mismatched_checkpoint_exits_2_with_one_line(tmp_path: Path, tiny_overrides, capsys, timm_model) -> None:
    path = save(timm_model(seed=0, depth=3), tmp_path / "deep.safetensors")
    rc = main(["run", "tiny-vit", *tiny_overrides, f"model.checkpoint={path}", f"output.dir={tmp_path / 'runs'}",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unexpected key(s)" in err
    assert not (tmp_path / "runs").exists()  # nothing written before the model was built
