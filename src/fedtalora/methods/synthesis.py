"""Data-free synthesis for ``target`` and ``lander``: a class-conditional generator of embedding-space
samples, trained on the server by inverting the global model, and sampled by the clients.

**Generator** (:class:`TokenGenerator`). A conditioning vector ``v`` (``nz``) is mapped by
``Linear -> LayerNorm -> LeakyReLU`` to a code, a learned position code is added per token, and a
two-layer MLP turns each token's code into a ``D``-dimensional token; the tokens are normalised
(LayerNorm without affine) and scaled / shifted per channel by learnable "data statistics" initialised
from the clients' embedding statistics (LANDER's learnable data stats; TARGET's generator ends in a
sigmoid and a fixed normaliser instead). ``v`` depends on the method:

* ``condition="embedding"`` (TARGET): ``v = z + E[y]``, ``z ~ N(0, I)``, ``E`` a learned class embedding;
* ``condition="label_text"`` (LANDER): ``v = z + W e_y + b`` with ``e_y`` the class's label-text embedding
  (standardised over the classes the generator covers) and ``W`` a learned linear layer initialised
  ``N(0, 1/E)`` (LANDER's noisy layer; see :mod:`fedtalora.methods.lander` for why it is not re-drawn).

**Prior** (:class:`FeaturePrior`). Pre-trained ViTs and BERT encoders have no BatchNorm running statistics,
so DeepInversion's BN prior is replaced by the same statistics measured where they exist: the
per-channel mean and variance of the embedding-space tokens and of the hidden states entering every
transformer block, measured by the clients on their task data under the task's final global model
(sums, sums of squares and counts, pooled exactly on the server and accumulated over tasks). The prior
loss is ``sum_l ||mu_l(syn) - mu_l(real)||_2 + ||var_l(syn) - var_l(real)||_2`` (DeepInversion's form).

**Training** (:func:`train_generator`). Adam (betas 0.5, 0.999) on
``oh * CE(teacher(x), y) + bn * prior + adv * L_adv (+ extra)`` with balanced labels over the classes
seen so far; ``L_adv = -mean(agree * KL(student || teacher))`` makes samples on which a student that
learns from the teacher (by KL at temperature ``T``, one step per generator step) still disagrees. The
student is the shared backbone with its own LoRA (A copied, B = 0) and a fresh head, substituted with
:func:`torch.func.functional_call` (no second backbone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distill import balanced_labels, kl_divergence, moments
from .distill import parameter_names
from .embedspace import (
    EmbedSpace,
    StatsRecorder,
    complete_tokens,
    embed_inputs,
    features_from_embeddings,
)

if TYPE_CHECKING:
    from ..model import FedModel

__all__ = ["FeaturePrior", "GeneratorConfig", "TokenGenerator", "balanced_labels", "client_moments",
           "train_generator"]


class TokenGenerator(nn.Module):
    """``v (B, nz) -> tokens (B, n, D)``, conditioned by a class embedding or by label-text embeddings."""

    def __init__(self, space: EmbedSpace, num_classes: int, *, nz: int = 256, hidden: int = 256,
                 condition: str = "embedding", label_embeddings: torch.Tensor | None = None) -> None:
        """``num_classes``: the classes it generates (head outputs ``0 .. num_classes - 1``)."""
        super().__init__()
        self.space, self.nz, self.condition = space, nz, condition
        self.inp = nn.Sequential(nn.Linear(nz, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2))
        self.pos = nn.Parameter(torch.randn(space.generated, hidden) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, space.dim))
        self.scale = nn.Parameter(torch.ones(space.dim))
        self.shift = nn.Parameter(torch.zeros(space.dim))
        if condition == "embedding":
            self.class_embedding = nn.Parameter(torch.randn(num_classes, nz))
        elif condition == "label_text":
            if label_embeddings is None or label_embeddings.shape[0] != num_classes:
                raise ValueError("condition='label_text' needs one label embedding per class")
            table = label_embeddings.float()
            if num_classes > 1:  # standardised over the classes the generator covers
                table = (table - table.mean(0)) / table.std(0, unbiased=False).clamp_min(1e-6)
            self.register_buffer("label_embeddings", table.clone(), persistent=True)
            self.label_layer = nn.Linear(table.shape[1], nz)
            nn.init.normal_(self.label_layer.weight, std=1.0 / math.sqrt(table.shape[1]))
            nn.init.zeros_(self.label_layer.bias)
        else:
            raise ValueError(f"unknown condition {condition!r}")

    @torch.no_grad()
    def init_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Start the output's per-channel shift and scale at the real tokens' mean and std."""
        self.shift.copy_(mean.to(self.shift.dtype))
        self.scale.copy_(std.to(self.scale.dtype))

    def condition_vectors(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``v (B, nz)`` for ``labels``: class code plus ``z ~ N(0, I)`` drawn from ``generator`` (a CPU
        generator: the draws do not depend on the device)."""
        dev = self.pos.device
        z = torch.randn(labels.shape[0], self.nz, generator=generator).to(dev)
        y = labels.to(dev)
        if self.condition == "embedding":
            return z + self.class_embedding[y]
        return z + self.label_layer(self.label_embeddings[y])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        code = self.inp(v)[:, None, :] + self.pos[None]
        tokens = F.layer_norm(self.mlp(code), (self.space.dim,))
        return tokens * self.scale + self.shift

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Generated tokens ``(B, n, D)`` of ``labels`` (without text's special tokens)."""
        return self(self.condition_vectors(labels, generator))

    def nbytes(self) -> int:
        """What sending it costs (parameters and buffers)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


# --- the prior --------------------------------------------------------------------------------------


def client_moments(model: FedModel, batches: Iterable[tuple[Any, torch.Tensor, Any]]) -> dict[str, torch.Tensor]:
    """A client's per-channel sums, sums of squares and counts (float64) of its task data's embedding-space
    tokens (``embed``) and of the hidden states entering every block (``block<i>``), under the current model
    in eval mode; keys ``<point>/sum``, ``<point>/sumsq``, ``<point>/count``."""
    rec = StatsRecorder(model)
    totals: dict[str, torch.Tensor] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _, _ in batches:
                mask = x["attention_mask"] if isinstance(x, Mapping) else None
                emb, emb_mask = embed_inputs(model, x)
                points = {"embed": (emb, emb_mask)}
                with rec.recording():
                    model.features(x)
                points.update({name: (h, mask) for name, h in rec.captured.items()})
                for name, (h, m) in points.items():
                    for part, value in zip(("sum", "sumsq", "count"), moments(h, m), strict=True):
                        key = f"{name}/{part}"
                        totals[key] = totals[key] + value.cpu() if key in totals else value.cpu()
    finally:
        model.train(was)
    return totals


def moments_nbytes(totals: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a client's moments as sent (float64 sums, float64 counts)."""
    return sum(t.numel() * 8 for t in totals.values())


class FeaturePrior:
    """Pooled real-data moments per point; the prior loss of synthetic hidden states."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, totals: Mapping[str, torch.Tensor]) -> None:
        for k, v in totals.items():
            self.totals[k] = self.totals[k] + v if k in self.totals else v.clone()

    def __bool__(self) -> bool:
        return bool(self.totals)

    def points(self) -> list[str]:
        return sorted({k.split("/")[0] for k in self.totals})

    def mean_var(self, point: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.totals[f"{point}/count"].clamp_min(1.0)
        mean = self.totals[f"{point}/sum"] / n
        var = (self.totals[f"{point}/sumsq"] / n - mean * mean).clamp_min(0.0)
        return mean.float(), var.float()

    def loss(self, hidden: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_point ||mean(h) - mu||_2 + ||var(h) - var||_2`` over the points present in ``hidden``
        (``(B, N, D)`` synthetic hidden states, every token real)."""
        total = None
        for point, h in hidden.items():
            if f"{point}/count" not in self.totals:
                continue
            mu, var = (t.to(h.device) for t in self.mean_var(point))
            flat = h.reshape(-1, h.shape[-1]).float()
            term = torch.linalg.vector_norm(flat.mean(0) - mu) + torch.linalg.vector_norm(
                flat.var(0, unbiased=False) - var)
            total = term if total is None else total + term
        if total is None:
            raise ValueError("the prior has none of the given points")
        return total

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v for k, v in self.totals.items()}

    def load(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        self.totals = {k[len(prefix):]: v.to(torch.float64) for k, v in state.items() if k.startswith(prefix)}


# --- training on the server ----------------------------------------------------------------------------


@dataclass
class GeneratorConfig:
    """Budget and loss weights of :func:`train_generator`."""

    steps: int
    batch: int
    lr: float
    oh: float
    bn: float
    adv: float
    adv_warmup: int
    student_lr: float
    student_head_lr: float
    temperature: float = 20.0


def synthetic_pass(model: FedModel, generated: torch.Tensor, recorder: StatsRecorder | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Features, logits and (with a recorder) the hidden states of generated tokens ``(B, n, D)``."""
    tokens = complete_tokens(model, generated)
    if recorder is None:
        feats = features_from_embeddings(model, tokens)
        return feats, model.head(feats), {}
    with recorder.recording():
        feats = features_from_embeddings(model, tokens)
    hidden = {"embed": tokens, **recorder.captured}
    return feats, model.head(feats), hidden


class _Student(nn.Module):
    def __init__(self, model: FedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.head(features_from_embeddings(self.model, tokens))


def train_generator(model: FedModel, gen: TokenGenerator, prior: FeaturePrior, num_classes: int, cfg: GeneratorConfig,
                    generator: torch.Generator, *,
                    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Train ``gen`` to invert ``model`` (the teacher, frozen, eval mode) over its first ``num_classes`` outputs.

    Args:
        extra_loss: ``f(teacher features, labels)`` added to the generator's loss (LANDER's label-text bound).

    Returns:
        The last step's loss terms and the teacher's accuracy on the last batch (``accuracy``).
    """
    device = gen.pos.device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was = model.training
    model.eval()
    recorder = StatsRecorder(model)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    student, student_opt, names = None, None, {}
    if cfg.adv > 0:
        params = model.parameters_by_key()
        keys = [*[p.a_key for p in model.lora_pairs()], *[p.b_key for p in model.lora_pairs()], "head.weight", "head.bias"]
        names = parameter_names(model, {k: params[k] for k in keys})
        student = {}
        for p in model.lora_pairs():
            student[names[p.a_key]] = params[p.a_key].detach().clone().requires_grad_(True)
            student[names[p.b_key]] = torch.zeros_like(params[p.b_key]).requires_grad_(True)
        w = params["head.weight"]
        bound = 1.0 / math.sqrt(w.shape[1])
        student[names["head.weight"]] = ((torch.rand(w.shape, generator=generator) * 2 - 1) * bound).to(
            device=w.device, dtype=w.dtype).requires_grad_(True)
        student[names["head.bias"]] = torch.zeros_like(params["head.bias"]).requires_grad_(True)
        head_names = {names["head.weight"], names["head.bias"]}
        student_opt = torch.optim.SGD([
            {"params": [t for n, t in student.items() if n not in head_names], "lr": cfg.student_lr},
            {"params": [t for n, t in student.items() if n in head_names], "lr": cfg.student_head_lr},
        ], momentum=0.9)
    wrapper = _Student(model)

    def student_logits(tokens: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, {f"model.{n}": t for n, t in student.items()}, (tokens,),
                                          strict=False)

    out: dict[str, float] = {}
    try:
        for step in range(cfg.steps):
            labels = balanced_labels(num_classes, cfg.batch, generator)
            y = labels.to(device)
            generated = gen.sample(labels, generator)
            feats, logits, hidden = synthetic_pass(model, generated, recorder)
            logits = logits[:, :num_classes]
            loss_oh = F.cross_entropy(logits, y)
            loss_bn = prior.loss(hidden) if prior and cfg.bn else logits.new_zeros(())
            loss = cfg.oh * loss_oh + cfg.bn * loss_bn
            if extra_loss is not None:
                loss = loss + extra_loss(feats, y)
            loss_adv = logits.new_zeros(())
            tokens = hidden.get("embed") if hidden else complete_tokens(model, generated)
            s_loss = None
            if student is not None:
                # One student pass serves both: the adversarial term (gradient into the generator) and the
                # student's own distillation step (gradient into the student only).
                adversarial = step >= cfg.adv_warmup
                s_logits = student_logits(tokens if adversarial else tokens.detach())[:, :num_classes]
                s_loss = kl_divergence(s_logits, logits.detach(), cfg.temperature)
                s_grads = torch.autograd.grad(s_loss, list(student.values()), retain_graph=adversarial)
                if adversarial:
                    agree = (s_logits.argmax(1) == logits.argmax(1)).float()
                    loss_adv = -(kl_divergence(s_logits, logits, per_sample=True) * agree).mean()
                    loss = loss + cfg.adv * loss_adv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if student is not None:
                for t, g in zip(student.values(), s_grads, strict=True):
                    t.grad = g
                student_opt.step()
            if step == cfg.steps - 1:
                out = {"loss_oh": loss_oh.item(), "loss_bn": loss_bn.item(), "loss_adv": loss_adv.item(),
                       "accuracy": (logits.argmax(1) == y).float().mean().item()}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was)
    return out
