"""``prompt``: an L2P-style prompt pool with key-query selection on the frozen backbone, FedAvg of prompts.

Follows L2P (Wang et al., "Learning to prompt for continual learning", CVPR 2022) in the federated form
used as a rehearsal-free baseline by Fed-CPrompt (Bagwe et al., 2023, arXiv 2307.04869):

* A pool of ``pool_size`` prompts (each ``length`` tokens of the backbone's width) with one learnable key
  each. The query of an input is the frozen backbone's pooled feature (no prompt); the ``top_k`` prompts
  whose keys are most cosine-similar to it are prepended to the token sequence (after the class token,
  without position embeddings), and the average of the prompt tokens' outputs feeds the linear head
  (ViT; for text see below).
* Local loss: cross-entropy (task-masked like every method) plus ``key_weight * mean(1 - cos(q, k))``
  over the selected keys, L2P's surrogate loss that pulls the chosen keys towards their queries.
* Prompts, keys and head train and travel; the server takes their sample-weighted FedAvg (Fed-CPrompt
  averages prompts the same way). Backbone and LoRA stay frozen (LoRA at ``B = 0`` does nothing).

Departures: no L2P prompt-frequency balancing and no batch-wise prompt voting at test time; Fed-CPrompt's
asynchronous task arrival and its contrastive continual loss are not modelled (tasks are synchronous
here); one forward without prompts gives the query (as in L2P), so training costs two forward passes.
Prompt init: uniform(-1, 1) for images (L2P); for text the prompt tokens start as copies of seeded random
vocabulary embeddings (the usual prompt-tuning init; uniform(-1, 1) dwarfs BERT-scale embeddings); keys
uniform(-1, 1). Text prompts sit after ``[CLS]`` and do take position embeddings (the encoder adds them to
every input embedding), so ``data.max_length + top_k * length`` must fit the encoder's positions. Text
features are the encoder's own pooling (masked mean) over the input's tokens, which the prompts steer
through attention: the prompt tokens' own outputs, L2P's choice for ViTs, carry little of the sentence in
a mean-pooled sentence encoder such as MiniLM (on Banking77 they gave below-chance accuracy within a task).

Options (``method_options``): ``pool_size`` (10), ``length`` (5), ``top_k`` (5), ``key_weight`` (0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..seeding import torch_generator
from .base import METHODS, Method, MethodContext, check_option

if TYPE_CHECKING:
    from ..model import FedModel


@dataclass
class PromptOptions:
    pool_size: int = 10
    """Number of prompts (and keys) in the pool."""
    length: int = 5
    """Tokens per prompt."""
    top_k: int = 5
    """Prompts selected per input."""
    key_weight: float = 0.1
    """Weight of the key-query matching loss."""

    def validate(self) -> None:
        check_option(self.pool_size >= 1, "pool_size", self.pool_size, "an integer >= 1")
        check_option(self.length >= 1, "length", self.length, "an integer >= 1")
        check_option(1 <= self.top_k <= self.pool_size, "top_k", self.top_k,
                     f"an integer in [1, method_options.pool_size={self.pool_size}]")
        check_option(self.key_weight >= 0, "key_weight", self.key_weight, "a number >= 0")


class PromptPool(nn.Module):
    """``prompts (M, L, D)`` and ``keys (M, D)``; :meth:`select` picks the ``k`` best-matching prompts."""

    def __init__(self, prompts: torch.Tensor, keys: torch.Tensor) -> None:
        super().__init__()
        self.prompts = nn.Parameter(prompts)
        self.keys = nn.Parameter(keys)

    def select(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``query (B, D)`` -> selected prompt tokens ``(B, k L, D)`` and the cosine similarities of the
        selected keys ``(B, k)``."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T  # (B, M)
        top, idx = sim.topk(k, dim=1)
        chosen = self.prompts[idx]  # (B, k, L, D)
        return chosen.flatten(1, 2), top


def select_and_match(pool: PromptPool, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected prompts and L2P's matching loss ``mean(1 - cos(q, k_selected))``."""
    tokens, sim = pool.select(query, k)
    return tokens, (1 - sim).mean()


def vit_prompted_features(vit: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """A timm ViT with ``prompts (B, P, D)`` inserted after its prefix (class) tokens: the mean output of
    the prompt tokens ``(B, D)``."""
    h = vit._pos_embed(vit.patch_embed(x))
    n = getattr(vit, "num_prefix_tokens", 1)
    h = torch.cat([h[:, :n], prompts.to(h.dtype), h[:, n:]], dim=1)
    h = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(h))))
    return h[:, n:n + prompts.shape[1]].mean(1)


def text_prompted_features(encoder: nn.Module, x: dict[str, torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
    """A transformers encoder (:class:`~fedtalora.model.hf.HFEncoder`) with ``prompts (B, P, D)`` after the
    first token: the encoder's own pooling (masked mean) over the outputs of the input's tokens ``(B, D)``."""
    ids, mask = x["input_ids"], x["attention_mask"]
    emb = encoder.model.get_input_embeddings()(ids)
    P = prompts.shape[1]
    inputs = torch.cat([emb[:, :1], prompts.to(emb.dtype), emb[:, 1:]], dim=1)
    full = torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], P), mask[:, 1:]], dim=1)
    h = encoder.model(inputs_embeds=inputs, attention_mask=full).last_hidden_state
    h = torch.cat([h[:, :1], h[:, 1 + P:]], dim=1)  # the input's tokens, prompts dropped
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


@METHODS.register("prompt")
class Prompt(Method):
    """L2P prompt pool + keys + head, FedAvg; frozen backbone."""

    name = "prompt"
    summary = ("L2P-style prompt pool, key-query selection, FedAvg of prompts + keys + head "
               "(options: pool_size, length, top_k, key_weight)")
    Options = PromptOptions
    predicts_with_head = False  # the head reads prompt-conditioned features
    folds_residual = False  # no LoRA residual: prompts, keys and head are averaged

    def __init__(self, options: Any, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self._match: torch.Tensor | None = None

    def attach(self, model: FedModel) -> None:
        o = self.options
        D = model.spec.num_features
        g = torch_generator(self.ctx.seed, "prompt-init")
        keys = torch.rand(o.pool_size, D, generator=g) * 2 - 1
        if model.spec.modality == "text":
            hf = model.backbone.model
            limit = int(getattr(hf.config, "max_position_embeddings", 0) or 0)
            need = self.ctx.max_length + o.top_k * o.length
            if limit and need > limit:
                raise ConfigError(f"method_options: data.max_length + top_k * length = {need} exceeds the encoder's "
                                  f"{limit} positions; lower data.max_length or the prompt size")
            vocab = hf.get_input_embeddings().weight.detach()
            pick = torch.randint(0, vocab.shape[0], (o.pool_size * o.length,), generator=g)
            prompts = vocab[pick].clone().reshape(o.pool_size, o.length, D)
        else:
            prompts = torch.rand(o.pool_size, o.length, D, generator=g) * 2 - 1
        model.prompt = PromptPool(prompts, keys)  # a registered submodule: moves with the model, saved with it
        model.add_trainable({"prompt.prompts": model.prompt.prompts, "prompt.keys": model.prompt.keys})

    def trainable_keys(self, model: FedModel) -> list[str]:
        return ["prompt.prompts", "prompt.keys", *model.head_parameters()]

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        with torch.no_grad():
            query = model.features(x)  # the frozen backbone: LoRA is at B = 0 and never trains here
        tokens, self._match = select_and_match(model.prompt, query.to(model.prompt.keys.dtype), self.options.top_k)
        if model.spec.modality == "text":
            feats = text_prompted_features(model.backbone, x, tokens)
        else:
            feats = vit_prompted_features(model.backbone, x, tokens)
        return model.head(feats)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, model: FedModel) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets)
        if self._match is not None and self.options.key_weight:
            loss = loss + self.options.key_weight * self._match  # the batch :meth:`forward` just saw
        return loss

    def aggregate(self, model: FedModel, updates: Any, weights: torch.Tensor) -> Any:
        from ..core.aggregation import Aggregate, fedavg

        return Aggregate(state=fedavg(updates, weights), residuals={}, errors={}, residual_ranks={})
