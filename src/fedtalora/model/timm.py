"""timm Vision Transformers as frozen backbones: built by name, weights from the hub or a local file.

``model.backbone`` names any timm model with transformer ``blocks`` (ViT, DeiT, DINO, ...); the LoRA
placement vocabulary (``qkv``, ``proj``, ``fc1``, ``fc2``) maps onto each block's ``attn.qkv``,
``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``. Offline, pretrained weights fail fast with one line that says
where to download them (instead of huggingface_hub's ~50 s of retries).
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelError
from ..seeding import seeded_torch
from .fedmodel import BackboneSpec
from .weights import load_checkpoint, read_checkpoint

# Placement vocabulary -> module paths inside one timm ViT block.
TIMM_VIT_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


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
    if from_hub and not _pretrained_available(cfg.backbone):
        raise ModelError(_offline_message(cfg.backbone))
    try:
        with seeded_torch(seed, "backbone-init"):
            model = timm.create_model(cfg.backbone, pretrained=from_hub, num_classes=0, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs={cfg.kwargs!r} rejected by timm for {cfg.backbone}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if not from_hub:
            raise ModelError(f"cannot build {cfg.backbone}: {str(e).splitlines()[0]}") from None
        raise ModelError(_offline_message(cfg.backbone)) from None
    if cfg.checkpoint:
        load_checkpoint(model, checkpoint, source=f"model.checkpoint={cfg.checkpoint!r}", name=cfg.backbone)
    if not hasattr(model, "blocks"):
        raise ConfigError(f"model.backbone={cfg.backbone!r} has no transformer 'blocks'; use a timm ViT")
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
