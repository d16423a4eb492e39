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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .aggregation import LoraPair
from .config import LoraConfig, ModelConfig
from .errors import ConfigError, ModelError
from .safeio import one_line, short
from .seeding import seeded_torch

logger = logging.getLogger(__name__)

# Placement vocabulary -> module paths inside one timm ViT block.
TIMM_VIT_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

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
    ``{input_ids, attention_mask}``, see :mod:`fedtalora.text_model`)."""


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
    for path in (TIMM_VIT_TARGETS["qkv"],):
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


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weight file, unwrapped.

    ``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` files with
    ``torch.load(weights_only=True)`` (no arbitrary code runs). A ``state_dict`` or ``model`` entry
    holding the tensors is unwrapped, and a ``module.`` prefix on every key (DistributedDataParallel)
    is removed.

    Raises:
        ModelError: The file is missing, of an unknown type, unreadable, or holds no tensors.
    """
    import pickle
    from pathlib import Path


    source = f"model.checkpoint={path!r}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{source} does not exist")
    suffix = p.suffix.lower()
    if suffix not in _CHECKPOINT_SUFFIXES:
        raise ModelError(f"{source}: unsupported file type {suffix or '(no suffix)'}; "
                         f"use one of {', '.join(_CHECKPOINT_SUFFIXES)}")
    if not p.is_file() or not os.access(p, os.R_OK):
        raise ModelError(f"{source} is not a readable regular file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            # torch's message ends by suggesting weights_only=False, i.e. running the file's code: not here
            raise ModelError(f"{source} holds pickled Python objects besides tensors, which fedtalora never "
                             "unpickles (that could run code from the file); save the weights as .safetensors "
                             "or as a plain state dict of tensors") from None
        raise ModelError(f"cannot read {source}: not a PyTorch weight file ({_first_line(e)})") from None
    except Exception as e:  # torch.load or safetensors on a file that is something else (text, truncated...)
        raise ModelError(f"cannot read {source}: not a valid {suffix} weight file "
                         f"({type(e).__name__}: {one_line(_strip_ansi(str(e)), 200)})") from None
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k in ("state_dict", "model", "module") if isinstance(state.get(k), Mapping)]
        if not inner:
            break
        state = state[inner[0]]
    if not isinstance(state, Mapping):
        raise ModelError(f"{source} holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{source} holds no tensors (keys: {', '.join(map(str, list(state)[:5]))})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, name: str) -> None:
    """Load a backbone's weights strictly: every key present, nothing extra, every shape equal.

    The timm model family's own ``checkpoint_filter_fn`` runs first when it has one (it converts
    original formats, e.g. official DINO or OpenCLIP files, and resamples position embeddings to the
    model's ``img_size``). Classifier weights in the file are dropped when the model has no classifier
    (``num_classes=0``).

    Args:
        model: The freshly built timm model.
        state: Its weights (see :func:`read_checkpoint`).
        source: How the user named the file, for messages.
        name: The model name, for messages.

    Raises:
        ModelError: One line listing a few missing, unexpected and mis-shaped keys.
    """
    import importlib

    state = dict(state)
    family = importlib.import_module(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state = dict(filter_fn(state, model))
        except Exception as e:  # timm's converter on tensors it does not expect (e.g. a 1-D pos_embed)
            raise ModelError(f"{source} does not fit {name}: timm's converter failed "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    expected = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if getattr(model, "num_classes", None) == 0 and classifier:
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        dropped = [k for k in state if k not in expected and any(k.startswith(f"{h}.") for h in heads)]
        for k in dropped:
            del state[k]
        if dropped:
            logger.info("%s: ignoring classifier weights %s (the backbone has no classifier)", source, dropped)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} shape mismatch(es) ({_few(mis_shaped, 2)})")
        raise ModelError(f"{source} does not fit {name}: {'; '.join(problems)}; check model.backbone and "
                         "model.kwargs against the model the file was saved from")
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s into %s", len(state), source, name)


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


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, num_classes: int, image_size: int,
                seed: int) -> FedModel:
    """Backbone from ``model.backbone``, LoRA from ``lora.*``, a head over ``num_classes``.

    ``model.backbone`` is a timm model name, or a transformers encoder (``hf:...``, ``minilm``).
    """
    from .text_model import build_hf_backbone, is_text_backbone

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
