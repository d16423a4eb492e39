"""The input-embedding space of a backbone, where the data-free baselines synthesise samples.

A synthetic sample is a sequence of token embeddings fed to the first transformer block's embedding
stage, for both modalities:

* **ViT (timm):** the output of ``patch_embed`` (``N`` patch tokens of width ``D``, before the class token
  and the position embeddings are added). The patch embedding is a linear map of the pixels, so this is
  image space up to a linear projection, at a fraction of its size (``N x D`` numbers per sample).
* **Text (transformers encoder):** word embeddings (the output of the input embedding table, before
  position / token-type embeddings and the embedding LayerNorm), ``text_tokens`` tokens with the
  tokenizer's ``[CLS]`` word embedding first and its ``[SEP]`` last; the generator makes the ones between.

Real inputs map into the same space with :func:`embed_inputs`, so a prior measured on real data
(:class:`StatsRecorder`) and the synthetic samples share one coordinate system. :func:`features_from_embeddings`
runs the rest of the backbone and pools as :meth:`FedModel.features` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..model import FedModel

__all__ = ["EmbedSpace", "StatsRecorder", "complete_tokens", "embed_inputs", "embed_space",
           "features_from_embeddings"]


@dataclass(frozen=True)
class EmbedSpace:
    """Shape of a synthetic sample: ``generated`` tokens of width ``dim`` (``specials`` more are added by
    :func:`complete_tokens`)."""

    modality: str
    generated: int
    dim: int
    specials: int = 0


def embed_space(model: FedModel, text_tokens: int) -> EmbedSpace:
    """The space of ``model``'s backbone; ``text_tokens`` is the length of a synthetic text (with ``[CLS]``
    and ``[SEP]``)."""
    if model.spec.modality == "text":
        enc = model.backbone
        limit = int(getattr(enc.model.config, "max_position_embeddings", 0) or 0)
        if limit and text_tokens > limit:
            raise ConfigError(f"method_options.text_tokens={text_tokens} exceeds the encoder's {limit} positions")
        specials = int(enc.tokenizer.cls_token_id is not None) + int(enc.tokenizer.sep_token_id is not None)
        if text_tokens <= specials:
            raise ConfigError(f"method_options.text_tokens={text_tokens} leaves no token to generate")
        return EmbedSpace("text", text_tokens - specials, enc.num_features, specials)
    vit = model.backbone
    return EmbedSpace("image", int(vit.patch_embed.num_patches), int(vit.embed_dim))


def _word_embeddings(model: FedModel) -> nn.Module:
    return model.backbone.model.get_input_embeddings()


def embed_inputs(model: FedModel, x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Real inputs in the embedding space: ``(tokens (B, N, D), mask (B, N) of real tokens or None)``."""
    if model.spec.modality == "text":
        return _word_embeddings(model)(x["input_ids"]), x["attention_mask"]
    return model.backbone.patch_embed(x), None


def complete_tokens(model: FedModel, generated: torch.Tensor) -> torch.Tensor:
    """Generated tokens ``(B, n, D)`` as a full input: text gets its ``[CLS]`` / ``[SEP]`` word embeddings."""
    if model.spec.modality != "text":
        return generated
    tok = model.backbone.tokenizer
    table = _word_embeddings(model).weight
    parts = []
    B = generated.shape[0]
    if tok.cls_token_id is not None:
        parts.append(table[tok.cls_token_id].to(generated.dtype).expand(B, 1, -1))
    parts.append(generated)
    if tok.sep_token_id is not None:
        parts.append(table[tok.sep_token_id].to(generated.dtype).expand(B, 1, -1))
    return torch.cat(parts, dim=1)


def features_from_embeddings(model: FedModel, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled features (the head's input) of embedding-space inputs ``tokens (B, N, D)``."""
    if model.spec.modality == "text":
        out = model.backbone.model(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
        if mask is None:
            return out.mean(1)
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp_min(1.0)
    vit = model.backbone
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
    return vit.forward_head(vit.norm(vit.blocks(h)), pre_logits=True)


class StatsRecorder:
    """Captures the hidden states entering every transformer block (forward pre-hooks) while active.

    ``captured[name]`` is the last ``(B, N, D)`` input of block ``name`` (``block0``, ``block1``, ...);
    gradients flow through them, so a loss on their moments trains what produced the input.
    """

    def __init__(self, model: FedModel) -> None:
        blocks = model.backbone.get_submodule(model.spec.blocks_path)
        self.modules = {f"block{i}": b for i, b in enumerate(blocks)}
        self.captured: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[StatsRecorder]:
        self.captured = {}
        handles = []
        for name, module in self.modules.items():
            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                h = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                self.captured[name] = h
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for hd in handles:
                hd.remove()
