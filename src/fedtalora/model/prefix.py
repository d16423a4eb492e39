"""The backbone cut in two at a block: the frozen prefix computed once, the rest run from its output.

For a cache of frozen work (:mod:`fedtalora.fed.cache`) the backbone is split at a *point*:

* ``point = j`` (an int): the input of block ``j`` (the hidden states after the embeddings and blocks
  ``0 .. j-1``); :func:`prefix` computes it, :func:`resume` runs blocks ``j ..``, the final norm and the pooling;
* ``point = None``: the backbone's pooled output (the head's input); :func:`resume` returns it unchanged.

:func:`resume` followed by the head computes exactly what ``model(x)`` computes: the same modules run in the
same order on the same values (the split forward is checked against the whole one in the tests). Supported
split points: timm :class:`~timm.models.vision_transformer.VisionTransformer` s (``patch_embed``, ``_pos_embed``,
``blocks``, ``norm``, ``forward_head``) and the transformers encoders of :mod:`.hf` (their layer list is
run in two parts; the embeddings' output is replaced by the cached hidden states). Any backbone supports the
pooled point.

Activations travel as :class:`Activations`, which :meth:`FedModel.features <fedtalora.model.FedModel.features>`
recognises in place of raw inputs, so a method whose forward calls ``model(x)`` or ``model.features(x)``
needs no change (:attr:`Method.forward_through_model <fedtalora.methods.Method.forward_through_model>`).

Also here: what makes a model draw random numbers in training (:func:`stochastic_modules`) or mix the samples
of a batch (:func:`batch_statistics_modules`), the attention
kernel (:func:`set_fused_attention`) and ``torch.compile`` of the backbone (:func:`compile_backbone`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hf import HFEncoder

__all__ = ["Activations", "batch_statistics_modules", "block_index", "compile_backbone", "prefix", "resume",
           "set_fused_attention", "skip_zero_adapters", "split_points", "stochastic_modules"]


@dataclass
class Activations:
    """Cached activations of a batch at a split point, standing in for the raw batch.

    Attributes:
        hidden: ``(B, ...)``: the pooled features ``(B, D)`` (``point`` None), an image's tokens ``(B, N, D)`` or
            text hidden states ``(B, L, D)`` at the input of block ``point``.
        point: the block whose input ``hidden`` is, or None for the pooled output.
        mask: text at a block: the ``(B, L)`` attention mask (1 on real tokens).
        padded: text: whether any sequence is shorter than ``L`` (known on the host).
    """

    hidden: torch.Tensor
    point: int | None
    mask: torch.Tensor | None = None
    padded: bool = False

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Activations:
        return Activations(self.hidden.to(device, non_blocking=non_blocking), self.point,
                           None if self.mask is None else self.mask.to(device, non_blocking=non_blocking), self.padded)

    def pin_memory(self) -> Activations:
        return Activations(self.hidden.pin_memory(), self.point,
                           None if self.mask is None else self.mask.pin_memory(), self.padded)


# --- what draws random numbers ----------------------------------------------------------------------


def stochastic_modules(module: nn.Module) -> list[str]:
    """Names of the submodules that draw random numbers in training mode: dropout with ``p > 0``
    (``lora.dropout``, a backbone's own dropout, attention dropout) and drop-path (timm ``drop_prob``)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append(name)
        elif float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:
            out.append(name)
    return out


def batch_statistics_modules(module: nn.Module) -> list[str]:
    """Names of the submodules whose training-mode output depends on the other samples of the batch and
    which update state as they run: batch normalisation (it normalises by the batch's statistics and moves its
    running averages). Such a layer gives other values for a batch of several clients (or padded rows) than
    for each client's own batch, and other values in training than in the evaluation mode a cache is filled in."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- where the backbone can be cut --------------------------------------------------------------------


def _is_plain_vit(backbone: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    cls = type(backbone)
    return (isinstance(backbone, VisionTransformer) and cls.forward is VisionTransformer.forward
            and cls.forward_features is VisionTransformer.forward_features
            and not getattr(backbone, "grad_checkpointing", False))


def split_points(backbone: nn.Module) -> bool:
    """Whether ``backbone`` can be cut at a block (every backbone can be cut after its pooled output)."""
    if isinstance(backbone, HFEncoder):
        return hasattr(backbone.model, "embeddings")
    return _is_plain_vit(backbone)


def block_index(key: str, blocks_path: str) -> int | None:
    """The block a module path or state-dict key of :class:`~fedtalora.model.FedModel` lies in
    (``backbone.<blocks_path>.<i>.…`` -> ``i``), None outside the blocks."""
    head = f"backbone.{blocks_path}."
    if not key.startswith(head):
        return None
    first = key[len(head):].split(".", 1)[0]
    return int(first) if first.isdigit() else None


def _blocks_parent(backbone: nn.Module, blocks_path: str) -> tuple[nn.Module, str]:
    parent, _, attr = blocks_path.rpartition(".")
    return (backbone.get_submodule(parent) if parent else backbone), attr


@contextlib.contextmanager
def _only_blocks(backbone: nn.Module, blocks_path: str, part: slice) -> Iterator[None]:
    """Temporarily replace the backbone's block list by ``blocks[part]`` (the same module objects)."""
    parent, attr = _blocks_parent(backbone, blocks_path)
    blocks = getattr(parent, attr)
    cls = nn.Sequential if isinstance(blocks, nn.Sequential) else nn.ModuleList
    setattr(parent, attr, cls(*list(blocks)[part]) if cls is nn.Sequential else cls(list(blocks)[part]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


@contextlib.contextmanager
def _embeddings_output(module: nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    """``module`` (the encoder's embeddings) returns ``hidden`` instead of what it computed."""
    handle = module.register_forward_hook(lambda _m, _args, _out: hidden)
    try:
        yield
    finally:
        handle.remove()


# --- the two halves -----------------------------------------------------------------------------------


def prefix(backbone: nn.Module, blocks_path: str, x: Any, point: int | None) -> Activations:
    """The activations of the batch ``x`` at ``point`` (call under ``torch.no_grad()``)."""
    if point is None:
        return Activations(backbone(x), None)
    if isinstance(backbone, HFEncoder):
        mask = x["attention_mask"]
        with _only_blocks(backbone, blocks_path, slice(0, point)):
            h = backbone.model(input_ids=x["input_ids"],
                               attention_mask=backbone._attention_mask(mask, x.get("padded"))).last_hidden_state
        return Activations(h, point, mask, bool(x.get("padded", True)))
    h = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
    for blk in list(backbone.blocks)[:point]:
        h = blk(h)
    return Activations(h, point)


@contextlib.contextmanager
def skip_zero_adapters(backbone: nn.Module, blocks_path: str, point: int | None) -> Iterator[int]:
    """Run the LoRA layers below ``point`` (all of them for the pooled point) that add exactly nothing as their
    base layer alone; yields how many were switched off.

    A peft LoRA layer computes ``base(x) + B(A(dropout(x))) * s``; while every ``B`` is zero (LoRA's
    initialisation, and ``head-only``, which never trains it) the second term is a zero tensor and the sum
    equals ``base(x)`` exactly, so skipping it changes no value (for finite inputs) and saves the two rank-r
    matmuls, the scaling and the addition. Only plain, unmerged LoRA layers are skipped (a merged layer or a
    variant such as DoRA is run as it is). The switch is peft's ``_disable_adapters`` flag, restored on exit
    (``enable_adapters`` would also change ``requires_grad``)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        yield 0
        return
    switched: list[Any] = []
    with torch.no_grad():
        for name, m in backbone.named_modules():
            if not isinstance(m, LoraLayer) or getattr(m, "merged", False) or getattr(m, "_disable_adapters", True):
                continue
            if point is not None and ((b := block_index(f"backbone.{name}", blocks_path)) is None or b >= point):
                continue
            active = [a for a in m.active_adapters if a in m.lora_B]
            if any(a in getattr(m, "lora_variant", {}) for a in active):
                continue
            weights = [t for a in active for t in (m.lora_B[a].weight, m.lora_B[a].bias) if t is not None]
            if active and all(t.device.type != "meta" and not bool(t.any()) for t in weights):
                switched.append(m)
    for m in switched:
        m._disable_adapters = True
    try:
        yield len(switched)
    finally:
        for m in switched:
            m._disable_adapters = False


def resume(backbone: nn.Module, blocks_path: str, acts: Activations) -> torch.Tensor:
    """The backbone's pooled output, computed from ``acts`` (what ``backbone(x)`` gives for the raw batch)."""
    if acts.point is None:
        return acts.hidden
    j = acts.point
    if isinstance(backbone, HFEncoder):
        mask = acts.mask
        if mask is None:
            raise ValueError("text activations at a block need their attention mask")
        ids = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)  # embedded, then replaced
        with _only_blocks(backbone, blocks_path, slice(j, None)), \
                _embeddings_output(backbone.model.embeddings, acts.hidden):
            return backbone({"input_ids": ids, "attention_mask": mask, "padded": acts.padded})
    h = acts.hidden
    for blk in list(backbone.blocks)[j:]:
        h = blk(h)
    return backbone.forward_head(backbone.norm(h))


# --- kernels ------------------------------------------------------------------------------------------


def set_fused_attention(backbone: nn.Module, fused: bool) -> int:
    """Use fused scaled-dot-product attention (``fused``) or the eager one in every attention layer of
    ``backbone``: timm's ``fused_attn`` flags, transformers' ``attn_implementation`` (``sdpa``/``eager``).
    Returns how many timm attention layers were set (transformers: 1 when set)."""
    n = 0
    if isinstance(backbone, HFEncoder):
        impl = "sdpa" if fused else "eager"
        hf = backbone.model
        if getattr(hf.config, "_attn_implementation", None) != impl:
            setter = getattr(hf, "set_attn_implementation", None)
            if setter is not None:
                setter(impl)
            else:  # pragma: no cover - older transformers
                hf.config._attn_implementation = impl
        return 1
    for m in backbone.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(fused)
            n += 1
    return n


def compile_backbone(backbone: nn.Module, mode: str, **kwargs: Any) -> None:
    """``torch.compile`` the backbone in place (:meth:`torch.nn.Module.compile`: parameter names and
    state-dict keys stay as they are) with ``mode`` (``default``, ``reduce-overhead``, ``max-autotune``);
    ``none``: nothing. Text batches change length from batch to batch: their shapes are compiled dynamic."""
    if mode == "none":
        return
    if isinstance(backbone, HFEncoder):
        kwargs.setdefault("dynamic", True)
    backbone.compile(mode=None if mode == "default" else mode, **kwargs)
