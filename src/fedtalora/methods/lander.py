"""``lander``: LANDER -- label-text embeddings as anchors, a bounding loss, and data-free distillation.

Follows LANDER (Tran, Le, Le, Harandi, Phung, "Text-Enhanced Data-free Approach for Federated
Class-Incremental Learning", CVPR 2024; official code ``tmtuan1307/LANDER``, ``methods/lander.py`` and
``methods/generator.py``), built on this project's TARGET (:mod:`fedtalora.methods.target`: the same
server-side generator training, prior, synthetic samples, teacher and accounting):

* **Label-text embeddings (LTE).** Each class name, in a prompt (``template``: ``"a photo of a {}"`` for
  images, ``"{}"`` for text; underscores become spaces), is embedded by a sentence encoder
  (``text_encoder``: all-MiniLM-L6-v2 by default, offline) into ``e_y`` (``E = 384``). Class names are
  public: every party computes the table itself, nothing travels.
* **Anchored features with a bounding loss.** A trainable projection ``a = P f`` (``Linear(D, E)``, trained and
  averaged with LoRA and head; LANDER's ``mapping`` layer) maps the backbone feature ``f``; the local loss
  adds ``ltc * max(0, MSE(a, e_y) - r)``: features stay within radius ``r`` of their class's anchor instead of
  being pulled onto it (LANDER's bounding loss, ``ltc = 5``, ``r = 0.015``).
* **LTE-conditioned generator.** The generator's input is a linear map of the class's LTE (LANDER's noisy
  layer) plus Gaussian noise; its loss adds the bounding loss on the teacher's projection of the generated
  samples.
* **Clients in later tasks:** ``cur * (CE_task + ltc * bound) + pre * (H(softmax(t / tau), softmax(s / tau))
  + MSE(a_s, a_t))`` on real and synthetic samples, with LANDER's weights
  ``cur = cur0 (1 + 1/alpha) / beta``, ``pre = pre0 alpha beta``, ``alpha = log2(C_seen / 2 + 1)``,
  ``beta = sqrt(C_old / C_seen)`` (``cur0 = 0.2``, ``pre0 = 0.4``, ``tau = 2``). Task 0: ``CE + ltc * bound``.

Departures (besides TARGET's, which all apply: embedding-space samples, a feature-statistics prior instead
of BatchNorm statistics, the generator sent instead of a pool of images, the student on the shared backbone):

* **Anchor scale.** LTEs are unit vectors scaled by ``sqrt(E)`` (root-mean-square 1 per coordinate), so the
  radius ``r`` is relative to the anchors' size; the scale of LANDER's stored embeddings is not documented,
  and with unit vectors ``r = 0.015`` would be met by ``a = 0``.
* **Noisy layer.** LANDER (after NAYER) re-initialises the linear layers on the LTEs at random before every
  synthesis round, adapts the generator to them for ``g_steps`` steps and keeps the images of that round:
  a random projection's output does not identify the class on its own, only a generator adapted to that
  projection does. Here clients sample the final generator, so the layer is learned once (initialised
  ``N(0, 1/E)`` like NAYER's re-initialisation) and never re-drawn, and per-sample noise ``z`` gives the
  diversity the re-draws gave. (With the layer re-drawn per batch, the generator's samples were classified
  as their class no better than chance: 0.17 for 5 classes on the tiny test model, against 0.76 for TARGET's
  class embedding.) LANDER standardises the LTEs with BatchNorm1d over the batch; here they are standardised
  over the classes the generator covers.
* LANDER's student also matches the teacher's projection (MSE); ours distils logits only. LANDER keeps the
  round with the lowest training loss as the task's model; here the last round's global model is the
  model (no model selection).
* LANDER's local learning-rate schedule (cosine over rounds) and optimiser are not used (``train.*``).
* Anchors come from ``Dataset.class_names``; a dataset naming classes by ids (Tiny-ImageNet's WordNet ids)
  gives uninformative anchors.

Costs in the round records: as TARGET (``method_server_seconds``, ``synthetic_samples``,
``method_downlink_bytes``); the projection travels with the trainable state every round.

Options (``method_options``): ``ltc`` (5), ``r`` (0.015), ``cur`` (0.2), ``pre`` (0.4), ``temperature``
(2, LANDER's ``tau``), ``template`` ("" = by modality), ``text_encoder`` (``minilm``), and the generator's ``syn_batch`` (0), ``gen_steps`` (100), ``gen_batch`` (64), ``gen_lr`` (0.002), ``nz`` (256),
``hidden`` (256), ``oh`` (0.5), ``bn`` (1), ``adv`` (1), ``adv_warmup`` (20), ``text_tokens`` (16).
Reads from the run config: ``seed``; ``train.batch_size``, ``train.lr``, ``train.head_lr``, ``train.precision``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distill import bounding_loss, lander_weights, soft_cross_entropy
from ..errors import ConfigError
from ..seeding import seeded_torch
from .base import METHODS, MethodContext, check_option
from .embedspace import features_from_embeddings
from .labeltext import label_text_embeddings
from .synthesis import TokenGenerator
from .target import GeneratorOptions, Target

if TYPE_CHECKING:
    from ..core.scenario import Task
    from ..model import FedModel

PROJ_KEYS = ("lander.proj.weight", "lander.proj.bias")


@dataclass
class LanderOptions(GeneratorOptions):
    ltc: float = 5.0
    """Weight of the bounding loss (LANDER's ``lambda_ltc``)."""
    r: float = 0.015
    """Radius of the bounding loss (mean squared error to the anchor that costs nothing)."""
    cur: float = 0.2
    """LANDER's ``alpha_cur``: base weight of the current task's terms."""
    pre: float = 0.4
    """LANDER's ``alpha_pre``: base weight of the distillation terms."""
    template: str = ""
    """Prompt of a class name (``{}`` = the name); empty: ``a photo of a {}`` for images, ``{}`` for text."""
    text_encoder: str = "minilm"
    """Sentence encoder of the label texts: ``minilm`` (all-MiniLM-L6-v2) or ``hf:<folder or hub id>``."""
    bn: float = 1.0
    """Weight of the feature-statistics prior (LANDER's default; TARGET's is 10)."""

    def validate(self) -> None:
        for key in ("ltc", "r", "cur", "pre"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        super().validate()
        check_option(not self.template or "{}" in self.template, "template", self.template,
                     "a prompt with {} where the class name goes")
        check_option(self.text_encoder == "minilm" or self.text_encoder.startswith("hf:"), "text_encoder",
                     self.text_encoder, "minilm or hf:<folder or hub id>")


@functools.lru_cache(maxsize=4)
def _encoder_width(encoder: str) -> int:
    from transformers import AutoConfig

    from ..model.hf import resolve_source

    try:
        return int(AutoConfig.from_pretrained(resolve_source(encoder)).hidden_size)
    except (OSError, ValueError):
        raise ConfigError(f"method_options.text_encoder={encoder!r}: cannot read its config (offline?)") from None


@METHODS.register("lander")
class Lander(Target):
    """TARGET + label-text anchors (bounding loss) for the features and the generator."""

    name = "lander"
    summary = ("LANDER (CVPR 2024): label-text embedding anchors, bounding loss, LTE-conditioned generator, "
               "data-free distillation (options: ltc, r, cur, pre, temperature, template, text_encoder, "
               "syn_batch, gen_steps, gen_batch, gen_lr, nz, hidden, oh, bn, adv, adv_warmup, text_tokens)")
    Options = LanderOptions
    condition = "label_text"

    def __init__(self, options: Mapping[str, Any] | None, ctx: MethodContext) -> None:
        super().__init__(options, ctx)
        self.names: list[str] = []
        self.anchors: torch.Tensor | None = None
        """``(C, E)`` label-text embeddings in head order, scaled to root-mean-square 1 per coordinate."""
        self._feats: torch.Tensor | None = None

    def set_class_names(self, names: Sequence[str]) -> None:
        super().set_class_names(names)
        self.names = list(names)

    def attach(self, model: FedModel) -> None:
        o = self.options
        width = _encoder_width(o.text_encoder)
        if self.names:
            template = o.template or ("{}" if model.spec.modality == "text" else "a photo of a {}")
            le = label_text_embeddings(self.names, template=template, encoder=o.text_encoder)
            self.anchors = le * math.sqrt(le.shape[1])
        with seeded_torch(self.seed, self.name, "projection-init"):
            model.lander_proj = nn.Linear(model.spec.num_features, width)
        model.add_trainable(dict(zip(PROJ_KEYS, (model.lander_proj.weight, model.lander_proj.bias), strict=True)))
        super().attach(model)

    def trainable_keys(self, model: FedModel) -> list[str]:
        return [*super().trainable_keys(model), *PROJ_KEYS]

    # --- generator -----------------------------------------------------------------------------------

    def _new_generator(self, seen: int) -> TokenGenerator:
        o = self.options
        assert self.space is not None and self.anchors is not None
        return TokenGenerator(self.space, seen, nz=o.nz, hidden=o.hidden, condition="label_text",
                              label_embeddings=self.anchors[:seen])

    def _train_generator(self, model: FedModel, task: Task, seen: int, extra_loss: Any = None) -> TokenGenerator:
        anchors = self._anchors(model)

        def bound(feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.options.ltc * bounding_loss(model.lander_proj(feats), anchors[y], self.options.r)

        return super()._train_generator(model, task, seen, extra_loss=bound if self.options.ltc else None)

    def _anchors(self, model: FedModel) -> torch.Tensor:
        if self.anchors is None:
            raise ConfigError("lander needs the dataset's class names (set_class_names) before training")
        device = model.head.weight.device
        if "anchors" not in self._dev or self._dev["anchors"].device != device:
            self._dev["anchors"] = self.anchors.to(device)
        return self._dev["anchors"]

    # --- local training --------------------------------------------------------------------------------

    def forward(self, model: FedModel, x: Any) -> torch.Tensor:
        if not model.training:
            return model(x)
        self._feats = model.features(x)
        return model.head(self._feats)

    def local_loss(self, model: FedModel, x: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        o = self.options
        current = F.cross_entropy(logits, targets)
        if o.ltc and self._feats is not None:
            anchored = model.lander_proj(self._feats.float())
            current = current + o.ltc * bounding_loss(anchored, self._anchors(model)[targets], o.r)
        batch = self._synthetic_batch(model)
        task = self._task
        if batch is None or task is None:
            return current
        known, seen = task.label_offset, task.label_offset + len(task.classes)
        w_cur, w_pre = lander_weights(known, seen, o.cur, o.pre)
        tokens, teacher = batch[0], self._dev["teacher"]
        with self._autocast(tokens.device):
            t_feats = teacher.call(model, lambda m, tok: features_from_embeddings(m, tok), tokens).float()
            s_feats = features_from_embeddings(model, tokens).float()
        t_logits = teacher.call(model, lambda m, f: m.head(f), t_feats)
        t_anch = teacher.call(model, lambda m, f: m.lander_proj(f), t_feats)
        s_logits = model.head(s_feats)
        old = soft_cross_entropy(s_logits[:, :known], t_logits[:, :known], o.temperature) + F.mse_loss(
            model.lander_proj(s_feats), t_anch)
        return w_cur * current + w_pre * old

    def on_local_start(self, model: FedModel, global_state: dict[str, torch.Tensor]) -> None:
        super().on_local_start(model, global_state)
        self._anchors(model)
