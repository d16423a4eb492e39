"""Pure tensor math of the distillation baselines (``glfc``, ``target``, ``lander``): losses, weights, draws.

No model appears here: every function maps tensors to tensors (the methods in :mod:`fedtalora.methods`
wire them to the network).

* :func:`soft_cross_entropy`, :func:`kl_divergence` -- the distillation losses of TARGET / LANDER clients.
* :func:`compensation_weights`, :func:`relation_target`, :func:`glfc_loss` -- GLFC's class-aware gradient
  compensation and class-semantic relation distillation.
* :func:`herding` -- iCaRL's exemplar selection (GLFC's opt-in memory).
* :func:`bounding_loss`, :func:`lander_weights` -- LANDER's bounding loss and its task weights.
* :func:`balanced_labels` -- class labels of a synthetic batch.
* :func:`moments` -- per-channel sums a client sends for a generator's feature prior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["balanced_labels", "bounding_loss", "compensation_weights", "glfc_loss", "herding", "kl_divergence",
           "lander_weights", "moments", "relation_target", "soft_cross_entropy"]


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_i -sum_c softmax(t_i / T)_c log softmax(s_i / T)_c`` (the distillation loss of TARGET's and
    LANDER's clients, without the ``T^2`` factor)."""
    target = F.softmax(teacher / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(1).mean()


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, *,
                  per_sample: bool = False) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (or per sample)."""
    log_q = F.log_softmax(student / temperature, dim=1)
    p = F.softmax(teacher / temperature, dim=1)
    kl = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(1) * temperature ** 2
    return kl if per_sample else kl.mean()


def compensation_weights(true_prob: torch.Tensor, is_old: torch.Tensor) -> torch.Tensor:
    """GLFC's class-aware gradient compensation: ``w_i = g_i / mean_{j in group(i)} g_j`` with
    ``g_i = |p_{y_i} - 1|`` and the groups old / new classes (a group whose ``g`` are all 0 gets weight 0)."""
    g = (true_prob.detach() - 1).abs()
    w = torch.zeros_like(g)
    for group in (is_old, ~is_old):
        if group.any():
            mean = g[group].mean()
            w[group] = g[group] / mean if mean > 0 else 0.0
    return w


def relation_target(old_probs: torch.Tensor, targets: torch.Tensor, num_seen: int) -> torch.Tensor:
    """The relation-distillation target ``(B, num_seen)``: the old model's probabilities over the old classes
    (``old_probs (B, C_old)``) next to the one-hot label over the new classes, each row normalised to sum 1."""
    num_old = old_probs.shape[1]
    onehot = F.one_hot(targets, num_seen).to(old_probs.dtype)[:, num_old:]
    target = torch.cat([old_probs, onehot], dim=1)
    return target / target.sum(1, keepdim=True)


def glfc_loss(logits: torch.Tensor, targets: torch.Tensor, num_old: int, old_logits: torch.Tensor | None, *,
              gc: float, rd: float) -> torch.Tensor:
    """``gc * L_GC + rd * L_RD`` over ``logits (B, C_seen)`` (``L_GC`` alone, unweighted, when ``num_old = 0``);
    ``old_logits (B, C_old)``: the old model's logits over the old classes (None: no distillation)."""
    logp = F.log_softmax(logits, dim=1)
    ce = -logp.gather(1, targets[:, None]).squeeze(1)
    if num_old == 0:
        return ce.mean()
    w = compensation_weights(ce.detach().neg().exp(), targets < num_old)
    loss = gc * (w * ce).mean()
    if old_logits is not None and rd:
        target = relation_target(F.softmax(old_logits.float(), dim=1), targets, logits.shape[1])
        kl = (target * (torch.log(target.clamp_min(1e-12)) - logp)).sum(1).mean()
        loss = loss + rd * kl
    return loss


def herding(features: torch.Tensor, m: int) -> list[int]:
    """iCaRL herding: ``min(m, n)`` distinct row indices whose running mean best tracks the mean of the
    L2-normalised ``features (n, d)``, in the order chosen."""
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(min(m, len(f))):
        dist = (mu - (running + f) / (k + 1)).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += f[i]
    return chosen


def bounding_loss(anchored: torch.Tensor, anchors: torch.Tensor, radius: float) -> torch.Tensor:
    """LANDER's bounding loss ``max(0, MSE(anchored, anchors) - radius)`` (MSE averaged over all entries)."""
    return F.relu(F.mse_loss(anchored, anchors) - radius)


def lander_weights(num_old: int, num_seen: int, cur: float, pre: float) -> tuple[float, float]:
    """LANDER's ``(cur, pre)`` weights for a task with ``num_old`` earlier classes among ``num_seen``:
    ``cur (1 + 1/alpha) / beta`` and ``pre alpha beta`` with ``alpha = log2(num_seen / 2 + 1)``,
    ``beta = sqrt(num_old / num_seen)``."""
    alpha = math.log2(num_seen / 2 + 1)
    beta = math.sqrt(num_old / num_seen)
    return cur * (1 + 1 / alpha) / beta, pre * alpha * beta


def balanced_labels(num_classes: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels in ``[0, num_classes)``: concatenated random permutations (each class ``floor`` or
    ``ceil`` of ``n / num_classes`` times; any ``num_classes`` consecutive labels from a permutation
    boundary are distinct)."""
    reps = math.ceil(n / num_classes)
    perms = [torch.randperm(num_classes, generator=generator) for _ in range(reps)]
    return torch.cat(perms)[:n]


def moments(h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum, sum of squares, count)`` of the tokens of ``h (B, N, D)`` where ``mask`` is set
    (float64, no gradient): what a client sends for the prior."""
    h = h.detach().to(torch.float64)
    if mask is not None:
        if mask.shape[1] != h.shape[1]:  # e.g. a ViT block's class token: all tokens are real
            mask = None
        else:
            h = h[mask.bool()]
    flat = h.reshape(-1, h.shape[-1])
    return flat.sum(0), (flat * flat).sum(0), torch.tensor(float(flat.shape[0]), dtype=torch.float64)
