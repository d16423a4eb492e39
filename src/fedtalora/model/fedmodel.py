"""The model: a frozen pre-trained backbone, shared task-agnostic LoRA (peft) and one linear head.

::

    x --> backbone (frozen W_base, LoRA on chosen blocks/targets: W_base x + s * B A x) --> features
      --> head (Linear(num_features, num_classes over the whole scenario)) --> logits

Only the LoRA factors and the head train and travel. The base weights of adapted layers change only
through the server's residual (:meth:`FedModel.add_to_base`), which accumulates over rounds and tasks.

The simulation keeps ONE model; a client is nothing but a state dict of trainable tensors that is
copied into it before local training (:meth:`FedModel.load_trainable`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraConfig
from ..core.aggregation import LoraPair
from ..errors import ConfigError, ModelError
from ..seeding import seeded_torch
from .prefix import Activations, resume

logger = logging.getLogger(__name__)

ADAPTER = "default"


@dataclass(frozen=True)
class BackboneSpec:
    """What the LoRA placement needs to know about a backbone."""

    blocks_path: str
    """Module path of the list of transformer blocks (``blocks`` for timm ViTs)."""
    num_blocks: int
    targets: Mapping[str, tuple[str, ...]]
    """Placement name -> module paths inside one block."""
    num_features: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pretrained: bool = False
    modality: str = "image"
    """``image`` (timm ViT: takes normalised image tensors) or ``text`` (transformers encoder: takes
    ``{input_ids, attention_mask}``, see :mod:`fedtalora.model.hf`)."""


def lora_module_paths(spec: BackboneSpec, lora: LoraConfig) -> list[str]:
    """Full module paths that get LoRA, in block order."""
    bad = [b for b in lora.blocks if b >= spec.num_blocks]
    if bad:
        raise ConfigError(
            f"lora.blocks={lora.blocks} out of range: the backbone has {spec.num_blocks} blocks "
            f"(0..{spec.num_blocks - 1})"
        )
    paths = []
    for b in sorted(lora.blocks):
        for t in lora.targets:
            for sub in spec.targets[t]:
                paths.append(f"{spec.blocks_path}.{b}.{sub}")
    return paths


def inject_lora(backbone: nn.Module, spec: BackboneSpec, lora: LoraConfig, seed: int) -> list[str]:
    """Wrap the configured linear layers with peft LoRA; freeze everything else. Returns the paths."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    paths = lora_module_paths(spec, lora)
    pattern = "(" + "|".join(re.escape(p) for p in paths) + ")"
    peft_cfg = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern, bias="none"
    )
    with seeded_torch(seed, "lora-init"):  # peft draws A ~ kaiming_uniform from the global RNG
        inject_adapter_in_model(peft_cfg, backbone, adapter_name=ADAPTER)
    wrapped = [n for n, m in backbone.named_modules() if _is_lora_layer(m)]
    if sorted(wrapped) != sorted(paths):
        raise ModelError(f"LoRA placement mismatch: expected {paths}, peft wrapped {wrapped}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for n, p in backbone.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)
    return paths


def _is_lora_layer(m: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(m, LoraLayer)


class FedModel(nn.Module):
    """Backbone with LoRA + linear head; knows its trainable tensors and its LoRA layers by name."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int, seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        with seeded_torch(seed, "head-init"):
            self.head = nn.Linear(spec.num_features, num_classes)
        self._lora: dict[str, nn.Module] = {
            f"backbone.{n}": m for n, m in backbone.named_modules() if _is_lora_layer(m)
        }
        self._extra: dict[str, nn.Parameter] = {}

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor] | Activations) -> torch.Tensor:
        """Logits over all classes of the scenario (``x``: images, or token ids for text backbones, or cached
        activations of the frozen layers, :class:`~fedtalora.model.prefix.Activations`)."""
        return self.head(self.features(x))

    def features(self, x: torch.Tensor | dict[str, torch.Tensor] | Activations) -> torch.Tensor:
        """The backbone's pooled features (the head's input); from cached activations, only the layers above
        their split point run (:func:`fedtalora.model.prefix.resume`)."""
        if isinstance(x, Activations):
            return resume(self.backbone, self.spec.blocks_path, x)
        return self.backbone(x)

    # --- trainable state ----------------------------------------------------------------------

    def lora_pairs(self) -> list[LoraPair]:
        """The adapted layers with the state-dict keys of their factors and their scaling."""
        return [
            LoraPair(layer=name, a_key=f"{name}.lora_A", b_key=f"{name}.lora_B",
                     scaling=float(m.scaling[ADAPTER]))
            for name, m in self._lora.items()
        ]

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for name, m in self._lora.items():
            out[f"{name}.lora_A"] = m.lora_A[ADAPTER].weight
            out[f"{name}.lora_B"] = m.lora_B[ADAPTER].weight
        return out

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return {"head.weight": self.head.weight, "head.bias": self.head.bias}

    def parameters_by_key(self) -> dict[str, nn.Parameter]:
        """Every tensor a method may train and send: LoRA factors, head, and what a method added
        (:meth:`add_trainable`)."""
        return {**self.lora_parameters(), **self.head_parameters(), **self._extra}

    def add_trainable(self, params: Mapping[str, nn.Parameter]) -> None:
        """Make more parameters of this model trainable and sendable by key (methods that train more than
        LoRA and head, e.g. the whole backbone or a prompt pool: :meth:`Method.attach`)."""
        taken = set(self.lora_parameters()) | set(self.head_parameters()) | set(self._extra)
        clash = sorted(taken & set(params))
        if clash:
            raise ModelError(f"trainable keys already exist: {clash[:3]}")
        self._extra.update(params)

    def extra_keys(self) -> list[str]:
        """Keys added by :meth:`add_trainable`."""
        return list(self._extra)

    def trainable_state(self, keys: list[str]) -> dict[str, torch.Tensor]:
        params = self.parameters_by_key()
        return {k: params[k].detach().clone() for k in keys}

    @torch.no_grad()
    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        params = self.parameters_by_key()
        for k, t in state.items():
            params[k].copy_(t)

    # --- the frozen base ----------------------------------------------------------------------

    def base_weight(self, layer: str) -> torch.Tensor:
        return self._lora[layer].base_layer.weight

    @torch.no_grad()
    def add_to_base(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """``W_base += delta`` for each adapted layer (the residual; accumulates)."""
        for layer, d in deltas.items():
            w = self._lora[layer].base_layer.weight
            w.add_(d.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def effective_weight(self, layer: str) -> torch.Tensor:
        """``W_base + s B A`` of one adapted layer (for tests and export)."""
        m = self._lora[layer]
        s = float(m.scaling[ADAPTER])
        return m.base_layer.weight + s * m.lora_B[ADAPTER].weight @ m.lora_A[ADAPTER].weight
