"""The model: a frozen pre-trained backbone, shared task-agnostic LoRA (peft) and one linear head.

::

    x --> backbone (frozen W_base, LoRA on chosen blocks/targets: W_base x + s * B A x) --> features
      --> head (Linear(num_features, num_classes over the whole scenario)) --> logits

Only the LoRA factors and the head train and travel. The base weights of adapted layers change only
through the server's residual (:meth:`FedModel.add_to_base`), which accumulates over rounds and tasks;
with the exact base (:meth:`FedModel.enable_exact_base`, :mod:`fedtalora.core.exact`) it accumulates in
float64 beside the untouched pre-trained weight and the float32 weight is rewritten from both.

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
from ..core.exact import ExactBase, ExactnessError, accumulated_error
from ..errors import ConfigError, ModelError
from ..seeding import seeded_torch

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
        self._exact: ExactBase | None = None
        self._exact_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits over all classes of the scenario (``x``: images, or token ids for text backbones)."""
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's pooled features (the head's input)."""
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
        """The float32 base weight the layer computes with."""
        return self._lora[layer].base_layer.weight

    @torch.no_grad()
    def enable_exact_base(self) -> ExactBase:
        """Keep the adapted layers' base weights exactly from now on (:mod:`fedtalora.core.exact`).

        The current base weights become ``W0`` of an :class:`~fedtalora.core.exact.ExactBase` (and the current
        LoRA factors the start of the exact chain); from then on :meth:`add_to_base` adds into its float64
        accumulator and rewrites each base weight as ``fl32(W0 + D)``. Idempotent. Call it on a freshly
        built model, before any residual (and before restoring a checkpoint's accumulator):
        :func:`fedtalora.fed.build.build_components` does, for methods that change the base.
        """
        if self._exact is None:
            self._exact = ExactBase({layer: self.base_weight(layer) for layer in self._lora})
            params = self.lora_parameters()
            self._exact_start = {p.layer: (params[p.b_key].detach().clone(), params[p.a_key].detach().clone())
                                 for p in self.lora_pairs()}
        return self._exact

    @property
    def exact_base(self) -> ExactBase | None:
        """The exact accumulator (None unless :meth:`enable_exact_base` was called)."""
        return self._exact

    @torch.no_grad()
    def add_to_base(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Add ``delta`` (the residual; accumulates) to each adapted layer's base.

        With the exact base (:meth:`enable_exact_base`) ``D += delta`` in float64 (give float64 deltas: a
        float32 one is widened as it is) and the base weight becomes ``fl32(W0 + D)``; otherwise
        ``W_base += delta`` in float32 (rounded every time).
        """
        if self._exact is not None:
            self._exact.add(deltas)
            self.sync_base(list(deltas))
            return
        for layer, d in deltas.items():
            w = self._lora[layer].base_layer.weight
            w.add_(d.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def sync_base(self, layers: list[str] | None = None) -> None:
        """Rewrite the base weights of ``layers`` (default: all) from the exact accumulator (after loading
        its state); a no-op without it."""
        if self._exact is None:
            return
        for layer in self._exact.layers() if layers is None else layers:
            self._exact.materialise_into(layer, self.base_weight(layer))

    def _lora_product(self, layer: str) -> torch.Tensor:
        m = self._lora[layer]
        B, A = m.lora_B[ADAPTER].weight, m.lora_A[ADAPTER].weight
        return (B.detach().to(torch.float64) @ A.detach().to(torch.float64)).mul_(float(m.scaling[ADAPTER]))

    @torch.no_grad()
    def effective_weight(self, layer: str) -> torch.Tensor:
        """``W_base + s B A`` of one adapted layer as the layer computes with it, in float64 (exact up to
        the float64 rounding of the LoRA product)."""
        return self._lora_product(layer).add_(self.base_weight(layer).detach())

    @torch.no_grad()
    def exact_weight(self, layer: str) -> torch.Tensor:
        """``W0 + D + s B A`` in float64: the exact global weight (what export rounds once to float32);
        :meth:`effective_weight` without the exact base."""
        if self._exact is None:
            return self.effective_weight(layer)
        return self._lora_product(layer).add_(self._exact.target(layer))

    def accumulated_errors(self) -> dict[str, ExactnessError]:
        """Per adapted layer, the model's distance from the exact chain since the exact base was enabled
        (:func:`fedtalora.core.exact.accumulated_error`); empty without the exact base."""
        if self._exact is None:
            return {}
        params = self.lora_parameters()
        return {p.layer: accumulated_error(self.base_weight(p.layer).detach(), self._exact.w0[p.layer],
                                           self._exact.acc[p.layer],
                                           (params[p.b_key].detach(), params[p.a_key].detach()),
                                           self._exact_start[p.layer], p.scaling)
                for p in self.lora_pairs()}

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(device)`` and friends also move the exact accumulator (never its dtype)."""
        super()._apply(fn, recurse)
        if self._exact is not None:
            device = self.head.weight.device
            self._exact.to(device)
            self._exact_start = {k: (B.to(device), A.to(device)) for k, (B, A) in self._exact_start.items()}
        return self
