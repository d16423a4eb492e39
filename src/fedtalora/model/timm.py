"""timm Vision Transformers as frozen backbones: built by name, weights from the hub or a local file.

``model.backbone`` names any timm model with transformer ``blocks`` (ViT, DeiT, DINO, ...); the LoRA
placement vocabulary (``qkv``, ``proj``, ``fc1``, ``fc2``) maps onto each block's ``attn.qkv``,
``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``. Offline, pretrained weights fail fast with one line that says
where to download them (instead of huggingface_hub's ~50 s of retries).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelError, one_line
from ..safeio import short
from ..seeding import seeded_torch
from .fedmodel import BackboneSpec
from .weights import load_checkpoint, read_checkpoint

# Placement vocabulary -> module paths inside one timm ViT block.
TIMM_VIT_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

logger = logging.getLogger(__name__)


def build_timm_backbone(cfg: ModelConfig, image_size: int, seed: int) -> tuple[nn.Module, BackboneSpec]:
    """A timm model without classifier (``num_classes=0``), weights from the hub or a local file."""
    import timm

    if not timm.is_model(cfg.backbone):
        close = timm.list_models(f"*{cfg.backbone.split('.')[0].split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.backbone={cfg.backbone!r} is not a timm model{hint}")
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("img_size", image_size)
    pretrained = cfg.pretrained or bool(cfg.checkpoint)
    from_hub = pretrained and not cfg.checkpoint  # a local checkpoint is loaded below, strictly
    if cfg.checkpoint:
        checkpoint = read_checkpoint(cfg.checkpoint)  # fail on a bad file before building anything
    if from_hub:
        _check_vit_architecture(cfg.backbone)  # before fetching weights of a model that cannot be used
        if not _pretrained_available(cfg.backbone):
            raise ModelError(_offline_message(cfg.backbone))
    try:
        with seeded_torch(seed, "backbone-init"):
            model = timm.create_model(cfg.backbone, pretrained=from_hub, num_classes=0, **kwargs)
    except TypeError as e:
        _check_vit_architecture(cfg.backbone)  # "unexpected keyword argument 'img_size'" from a ResNet: say so
        raise ConfigError(f"model.kwargs={short(cfg.kwargs)} rejected by timm for {cfg.backbone}: "
                          f"{_first_line(e)}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if not from_hub:
            raise ModelError(f"cannot build {cfg.backbone}: {_first_line(e)}") from None
        raise ModelError(_offline_message(cfg.backbone)) from None
    except Exception as e:  # e.g. timm's AssertionError "dim should be divisible by num_heads": the kwargs
        raise ConfigError(f"timm cannot build {cfg.backbone} with model.kwargs={short(cfg.kwargs)} and "
                          f"data.image_size={image_size}: {type(e).__name__}: {_first_line(e)}") from None
    if cfg.checkpoint:
        load_checkpoint(model, checkpoint, source=f"model.checkpoint={cfg.checkpoint!r}", name=cfg.backbone)
    check_vit(model, cfg.backbone)
    check_geometry(model, image_size, f"model.backbone={cfg.backbone!r}, model.kwargs={short(cfg.kwargs)}, "
                                      f"data.image_size={image_size}")
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
    spec = BackboneSpec(
        blocks_path="blocks",
        num_blocks=len(model.blocks),
        targets={k: (v,) for k, v in TIMM_VIT_TARGETS.items()},
        num_features=model.num_features,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        pretrained=pretrained,
    )
    return model, spec


def _first_line(e: BaseException) -> str:
    return one_line(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 300)


def _not_a_vit(backbone: str, why: str) -> str:
    return (f"model.backbone={backbone!r} is not a ViT ({why}); fedtalora adapts the transformer blocks of a timm "
            f"ViT (blocks.N.attn.qkv, attn.proj, mlp.fc1, mlp.fc2): use e.g. vit_base_patch16_224.dino")


def check_vit(model: nn.Module, backbone: str) -> None:
    """Raise :class:`ConfigError` unless ``model`` is a timm ViT: a list of ``blocks`` whose first has an
    ``attn.qkv`` ``Linear`` (the other LoRA targets are checked when LoRA is placed, for the chosen
    ``lora.targets`` only, so ViT variants without e.g. ``mlp.fc2`` stay usable with other targets)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ConfigError(_not_a_vit(backbone, f"{type(model).__name__} has no list of transformer 'blocks'"))
    path = TIMM_VIT_TARGETS["qkv"]
    try:
        layer = blocks[0].get_submodule(path)
    except AttributeError:
        raise ConfigError(_not_a_vit(backbone, f"its blocks have no {path}")) from None
    if not isinstance(layer, nn.Linear):
        raise ConfigError(_not_a_vit(backbone, f"its {path} is a {type(layer).__name__}, not a Linear"))


def _check_vit_architecture(backbone: str) -> None:
    """:func:`check_vit` on ``backbone`` built with timm's defaults on the ``meta`` device (no memory, no
    weights: a fraction of a second), to tell "not a ViT" from "bad model.kwargs"."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, num_classes=0)
    except Exception:  # cannot tell: let the caller report the kwargs
        return
    check_vit(model, backbone)


def check_geometry(model: nn.Module, image_size: int, what: str) -> None:
    """Raise :class:`ConfigError` unless ``model`` takes ``(1, 3, image_size, image_size)`` images.

    One forward pass on the ``meta`` device, with meta copies of the weights (no memory, no arithmetic:
    ~0.1 s for ViT-B/16), so that a patch larger than the image or an ``img_size`` that disagrees with
    ``data.image_size`` fails here, before the run directory exists, not in round 1.
    """
    from torch.func import functional_call

    params = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    try:
        with torch.no_grad():
            out = functional_call(model, params, (x,), strict=False)
    except NotImplementedError:  # pragma: no cover - an op without a meta kernel: no geometry check
        logger.debug("geometry check skipped: an op of %s has no meta kernel", type(model).__name__)
        return
    except Exception as e:  # the shapes do not fit: the config's fault
        raise ConfigError(f"{what}: the model cannot take {image_size}x{image_size} images "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise ConfigError(f"{what}: the backbone returns {getattr(out, 'shape', type(out).__name__)}, "
                          "not one feature vector per image")


def _weights_source(backbone: str) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, URL) of a timm model's pretrained weights."""
    import timm

    pcfg = timm.models.get_pretrained_cfg(backbone)
    if pcfg is None:
        return None, None
    return getattr(pcfg, "hf_hub_id", None), getattr(pcfg, "url", None)


def _offline_message(backbone: str) -> str:
    repo, url = _weights_source(backbone)
    where = f"https://huggingface.co/{repo}" if repo else (url or "the timm hub")
    return (f"cannot fetch pretrained weights of {backbone} (offline?): download them from {where} and pass "
            "model.checkpoint=PATH, or set model.pretrained=false")


def _pretrained_available(backbone: str, timeout: float = 3.0) -> bool:
    """Whether timm can get the weights: cached locally, or the hub answers (fail fast when offline,
    instead of huggingface_hub's ~50 s of retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    repo, url = _weights_source(backbone)
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(repo, fname), str):
                    return True
        except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
            pass
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            return False
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif url:
        host = urlparse(url).hostname
    else:
        return True  # let timm decide
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
