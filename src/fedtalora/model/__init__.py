"""The model: a frozen pre-trained backbone, shared task-agnostic LoRA (peft) and one linear head.

* :mod:`.fedmodel` -- :class:`FedModel` (backbone + LoRA + head, its trainable state and base weights)
  and the LoRA placement;
* :mod:`.timm` -- timm ViTs; :mod:`.hf` -- Hugging Face text encoders (BERT family);
* :mod:`.weights` -- local weight files, read safely and loaded strictly.

:func:`build_model` builds one from a run's ``model`` and ``lora`` sections.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import LoraConfig, ModelConfig
from .fedmodel import ADAPTER, BackboneSpec, FedModel, inject_lora, lora_module_paths
from .hf import build_hf_backbone, is_text_backbone
from .timm import build_timm_backbone
from .weights import load_checkpoint, read_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER", "BackboneSpec", "FedModel", "build_model", "build_timm_backbone", "inject_lora",
           "load_checkpoint", "lora_module_paths", "read_checkpoint"]


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, num_classes: int, image_size: int,
                seed: int) -> FedModel:
    """Backbone from ``model.backbone``, LoRA from ``lora.*``, a head over ``num_classes``.

    ``model.backbone`` is a timm model name, or a transformers encoder (``hf:...``, ``minilm``).
    """
    backbone: nn.Module
    if is_text_backbone(model_cfg.backbone):
        backbone, fields = build_hf_backbone(model_cfg, seed)
        spec = BackboneSpec(**fields)
    else:
        backbone, spec = build_timm_backbone(model_cfg, image_size, seed)
    inject_lora(backbone, spec, lora_cfg, seed)
    model = FedModel(backbone, spec, num_classes, seed)
    n_lora = sum(p.numel() for p in model.lora_parameters().values())
    logger.info("%s: %d LoRA layers, %d LoRA parameters, head %d x %d, pretrained=%s",
                model_cfg.backbone, len(model.lora_pairs()), n_lora, spec.num_features, num_classes,
                spec.pretrained)
    return model
