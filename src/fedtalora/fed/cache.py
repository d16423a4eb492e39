"""Frozen work done once: activations below the first adapted block, cached per sample (``train.feature_cache``).

A frozen pre-trained backbone computes the same thing for the same sample every time: in every local epoch,
round and task, and in every evaluation of old tasks' test data. :class:`FeatureCache` computes the
activations at a *cut point* once per sample and feeds them to the rest of the model instead of the raw input
(:mod:`fedtalora.model.prefix`):

* **Where the cut is.** Nothing below the cut may change during the run. It is the backbone's pooled output
  when the method trains nothing in the backbone (``head-only``: the whole backbone is frozen; the head, or the
  prototype classifier, reads cached features), and otherwise the input of the lowest block that holds an
  adapted layer or a trained tensor (``lora.blocks=[8,9,10,11]`` caches blocks 0-7). Base weights change only
  in adapted layers (the residual, PILoRA's merge), which are at or above the cut by construction. There is no
  cut (no cache) when the method trains a tensor outside the blocks (``finetune``), when its forward does not go
  through ``model(x)`` / ``model.features(x)`` (:attr:`Method.forward_through_model`, e.g. ``prompt``), when
  the first block is adapted (nothing worth caching below it), when a layer below the cut draws random numbers
  (dropout, drop-path) or normalises by batch statistics (batch norm: training differs from the fill), or when
  the input augmentation is not a finite set of variants.
* **How a change below is caught.** Every use checks a fingerprint of every parameter and buffer of the
  backbone below the cut: its storage address and its version counter, which torch bumps on every in-place
  change (an optimiser step, ``copy_``, ``add_``). A changed fingerprint clears the cache; it is refilled on
  demand. (A change that bypasses the version counter, through ``tensor.data``, would not be seen: the package
  never writes parameters that way.)
* **Augmentation.** Images have two variants per sample (the image and its horizontal flip); a training batch
  draws its flips from the client's generator exactly as the uncached transform does
  (:meth:`~fedtalora.data.ImageTransform.draw_variants`) and reads the matching variant, so the random stream
  and the samples are those of the uncached run. Text has no augmentation.
* **Memory.** Each split's store is allocated once, for all its samples and variants, when it is first used:
  on the training device (``train.feature_cache=device``) or in host memory, page-locked when training on a GPU
  (``host``). When it would take the cache over ``train.feature_cache_mb`` the split is left uncached (logged):
  the run is then as fast as without the cache, never wrong. Text hidden states are stored padded to the
  split's longest sequence.

* **The fill.** Inference only (``torch.inference_mode``, evaluation mode), in length-sorted batches for text;
  the engine asks for all training samples of a round's clients at once, so each is computed in one pass
  (:class:`~fedtalora.fed.transport.InProcessTransport`); LoRA layers below the cut that add an exact zero
  (``B = 0``) run as their base layer (:func:`~fedtalora.model.prefix.skip_zero_adapters`, bit-identical).
* **Across runs** (``train.feature_cache=disk``): as ``device``, and each split's activations are also kept in a
  file keyed by a fingerprint of what they depend on, which later runs read (:mod:`fedtalora.fed.diskcache`);
  :meth:`FeatureCache.persist` writes them after each task's evaluation.

Results equal the uncached run to float rounding. The activations of a sample are computed in other batches
than on the uncached path (fill batches of ``train.batch_size``), and a GEMM kernel may round differently
for a different number of rows (on the CPU here: a batch of one image differs from larger ones by ~1e-6; the
tiny runs of the tests are bit for bit identical); text also differs by whether a batch is padded (attention
with or without a mask, ~1e-6). The engine asks the cache for its inputs through :func:`cached_inputs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Split
from ..methods import Method
from ..model import FedModel
from ..model.prefix import (
    Activations,
    batch_statistics_modules,
    block_index,
    prefix,
    skip_zero_adapters,
    split_points,
    stochastic_modules,
)
from .client import Transform, autocast, to_device
from .diskcache import DiskFeatures, default_folder, fingerprint

logger = logging.getLogger(__name__)

__all__ = ["CachedTransform", "FeatureCache", "IndexBatch", "IndexInputs", "cache_point", "cached_inputs"]


@dataclass
class IndexBatch:
    """A batch of a cached split: the samples' positions (on the CPU), which :class:`CachedTransform` turns
    into activations. Moving it to a device is a no-op (the activations move)."""

    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def pin_memory(self) -> IndexBatch:
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> IndexBatch:
        return self


class IndexInputs:
    """The inputs of a cached split: indexing gives an :class:`IndexBatch`; ``lengths`` are the raw split's
    (text), so length grouping and sorting batch exactly as without the cache."""

    def __init__(self, n: int, lengths: torch.Tensor | None) -> None:
        self.n = n
        self.lengths = lengths

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> IndexBatch:
        return IndexBatch(torch.as_tensor(index, dtype=torch.long).reshape(-1))


def cache_point(model: FedModel, method: Method, transform: Any) -> tuple[bool, int | None, str]:
    """Where the backbone is cut for the cache: ``(usable, point, why)`` with ``point`` the first block above
    the cut, or None for the pooled output; ``why`` says where, or why there is no cut (module docstring)."""
    if not method.forward_through_model:
        return False, None, f"method {method.name!r} computes its forward otherwise (Method.forward_through_model)"
    if not (isinstance(getattr(transform, "variants", None), int) and hasattr(transform, "draw_variants")):
        return False, None, "the input transform's augmentation is not a finite set of variants"
    bp = model.spec.blocks_path
    trained = [k for k in method.trainable_keys(model) if k.startswith("backbone.")]
    point: int | None = None
    if trained:
        blocks = [block_index(k, bp) for k in trained]
        if any(b is None for b in blocks):
            return False, None, f"the method trains {trained[blocks.index(None)]!r}, outside the blocks"
        point = min([b for b in blocks if b is not None]
                    + [b for p in model.lora_pairs() if (b := block_index(p.layer, bp)) is not None])
        if point == 0:
            return False, None, "block 0 is adapted: nothing frozen below it is worth caching"
        if not split_points(model.backbone):
            return False, None, f"the backbone ({type(model.backbone).__name__}) cannot be cut at a block"
    def below(names: list[str]) -> list[str]:
        return [n for n in names if point is None or (b := block_index(f"backbone.{n}", bp)) is None or b < point]

    if random := below(stochastic_modules(model.backbone)):
        return False, None, f"a layer below the cut draws random numbers in training ({random[0]})"
    if mixing := below(batch_statistics_modules(model.backbone)):
        return False, None, f"a layer below the cut normalises by batch statistics in training ({mixing[0]})"
    return True, point, "the pooled features" if point is None else f"the input of block {point}"


class _Store:
    """One split's cached activations: ``values (V, N, *shape)`` and which are filled, ``have (V, N)``."""

    def __init__(self, split: Split, transform: Any, variants: int) -> None:
        self.split, self.transform, self.V = split, transform, variants
        self.n = len(split)
        self.lengths: torch.Tensor | None = getattr(split.inputs, "lengths", None)
        self.values: torch.Tensor | None = None
        self.have = torch.zeros(variants, self.n, dtype=torch.bool)
        self.disabled = False
        self.key: str | None = None
        """``train.feature_cache=disk``: the disk key of the activations (None: not looked up yet)."""
        self.dirty = False
        """Activations computed since the store was last written to disk."""

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()


class CachedTransform:
    """The transform of a cached split: :class:`IndexBatch` -> :class:`~fedtalora.model.prefix.Activations`
    on the device, the training variants drawn as the raw transform draws them."""

    def __init__(self, cache: FeatureCache, store: _Store) -> None:
        self.cache, self.store = cache, store

    def __call__(self, batch: IndexBatch, *, train: bool = False, generator: torch.Generator | None = None,
                 variants: torch.Tensor | None = None) -> Activations:
        n = len(batch)
        if variants is None:
            variants = (self.store.transform.draw_variants(n, generator) if train and n > 0
                        else torch.zeros(n, dtype=torch.long))
        return self.cache.gather(self.store, batch.index, variants.to("cpu"))

    def __repr__(self) -> str:
        return f"CachedTransform({self.store.transform!r})"


class FeatureCache:
    """Activations of the frozen layers below the cut, per split and sample (module docstring).

    Args:
        transform: the raw batch transform of the run (:func:`fedtalora.fed.build.input_transform`).
        cfg: ``train.feature_cache`` (where), ``feature_cache_mb`` (limit), ``batch_size`` (fill batches, sorted by
            length for text: on the CPU, MiniLM runs 282 sentences/s in sorted batches of 32 and 162/s in batches
            of 256), ``precision`` (the fill runs under the same autocast as training).
    """

    def __init__(self, model: FedModel, method: Method, transform: Any, cfg: TrainConfig,
                 device: torch.device) -> None:
        self.model, self.transform, self.device = model, transform, device
        self.usable, self.point, self.why = cache_point(model, method, transform)
        self.where = device if cfg.feature_cache in ("device", "disk") else torch.device("cpu")
        self.pin = cfg.feature_cache == "host" and device.type == "cuda"
        self.budget = cfg.feature_cache_mb * 2**20
        self.batch_size, self.precision = cfg.batch_size, cfg.precision
        self.fused_attention = cfg.fused_attention
        self.disk = (DiskFeatures(cfg.feature_cache_dir or default_folder(), cfg.feature_cache_disk_mb * 2**20)
                     if cfg.feature_cache == "disk" and self.usable else None)
        self.stores: dict[str, _Store] = {}
        self.fingerprint: tuple[Any, ...] | None = None
        self.stats = {"computed": 0, "batches": 0, "invalidations": 0, "loaded": 0}
        """Samples x variants computed, cached batches served, times the cache was cleared, samples x variants
        read from disk (``train.feature_cache=disk``)."""
        logger.info("feature cache: %s%s", "activations at " if self.usable else "off: ", self.why)

    # --- validity -------------------------------------------------------------------------------------

    def _frozen(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer of the backbone below the cut."""
        bp = self.model.spec.blocks_path
        for name, t in [*self.model.backbone.named_parameters(), *self.model.backbone.named_buffers()]:
            if self.point is not None and (b := block_index(f"backbone.{name}", bp)) is not None and b >= self.point:
                continue
            yield name, t

    def check(self) -> None:
        """Clear the cache when anything below the cut changed since the last use."""
        now = tuple((name, t.data_ptr(), t._version) for name, t in self._frozen())
        if self.fingerprint is not None and now != self.fingerprint:
            logger.info("feature cache: the frozen layers changed; recomputing")
            self.stats["invalidations"] += 1
            for store in self.stores.values():
                store.values, store.have = None, torch.zeros_like(store.have)
                store.key, store.dirty = None, False
        self.fingerprint = now

    # --- filling and reading --------------------------------------------------------------------------

    def _store(self, name: str, split: Split, transform: Any) -> _Store:
        store = self.stores.get(name)
        if store is None or store.split is not split or store.transform is not transform:
            store = self.stores[name] = _Store(split, transform, int(transform.variants))
        return store

    def _allocate(self, name: str, store: _Store, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        nbytes = store.V * store.n * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        used = sum(s.nbytes for s in self.stores.values())
        if used + nbytes > self.budget:
            logger.warning("feature cache: the %s split's activations (%.0f MiB) exceed train.feature_cache_mb=%d "
                           "(%.0f MiB in use); it runs uncached", name, nbytes / 2**20, self.budget // 2**20,
                           used / 2**20)
            store.disabled = True
            return False
        values = torch.zeros((store.V, store.n, *shape), dtype=dtype, device=self.where)
        store.values = values.pin_memory() if self.pin else values
        return True

    @torch.no_grad()
    def _fill(self, name: str, store: _Store, indices: np.ndarray, variants: range) -> bool:
        model, backbone = self.model, self.model.backbone
        wanted = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        missing = {v: torch.unique(wanted[~store.have[v, wanted]]) for v in variants}
        if not any(len(idx) for idx in missing.values()):
            return True
        was_training = model.training
        model.eval()
        try:
            with skip_zero_adapters(backbone, model.spec.blocks_path, self.point):
                return self._fill_missing(name, store, missing)
        finally:
            model.train(was_training)

    def _fill_missing(self, name: str, store: _Store, missing: dict[int, torch.Tensor]) -> bool:
        model, backbone = self.model, self.model.backbone
        for v, idx in missing.items():
            if store.lengths is not None and len(idx):
                idx = idx[torch.argsort(store.lengths[idx], stable=True)]
            for start in range(0, len(idx), self.batch_size):
                b = idx[start:start + self.batch_size]
                x = store.transform(to_device(store.split.inputs[b], self.device), train=False,
                                    variants=torch.full((len(b),), v, dtype=torch.long))
                # inference only: no autograd bookkeeping; the results are copied into the store (a normal
                # tensor) at once, so no inference tensor ever reaches training
                with torch.inference_mode(), autocast(self.device, self.precision):
                    acts = prefix(backbone, model.spec.blocks_path, x, self.point)
                h = acts.hidden
                if store.values is None:
                    shape = tuple(h.shape[1:])
                    if acts.mask is not None:  # text at a block: room for the split's longest sequence
                        shape = (store.split.inputs.input_ids.shape[1], *shape[1:])
                    if not self._allocate(name, store, shape, h.dtype):
                        return False
                assert store.values is not None
                dest = store.values[v]
                if acts.mask is not None:
                    dest[b.to(dest.device), :h.shape[1]] = h.to(dest.device)
                else:
                    dest[b.to(dest.device)] = h.to(dest.device)
                store.have[v, b] = True
                store.dirty = True
                self.stats["computed"] += len(b)
        return True

    # --- across runs (train.feature_cache=disk) --------------------------------------------------------

    def _width(self, store: _Store) -> int | None:
        return store.split.inputs.input_ids.shape[1] if store.lengths is not None and self.point is not None else None

    def _load(self, name: str, store: _Store) -> None:
        """Look ``store``'s activations up on disk (once per store and fingerprint) and take what is there."""
        assert self.disk is not None
        key = fingerprint(frozen=self._frozen(), backbone=self.model.backbone, point=self.point, variants=store.V,
                          transform=store.transform, inputs=store.split.inputs, device=self.device,
                          precision=self.precision, fused_attention=self.fused_attention)
        if key is None:
            logger.info("feature cache: the %s split's inputs cannot be fingerprinted; not kept on disk", name)
            store.key = ""
            return
        store.key = key
        got = self.disk.load(key, (store.V, store.n), self._width(store))
        if got is None:
            return
        values, have = got
        nbytes = values.numel() * values.element_size()
        if sum(s.nbytes for s in self.stores.values()) + nbytes > self.budget:
            logger.warning("feature cache: the %s split's activations on disk exceed train.feature_cache_mb; "
                           "computed instead", name)
            return
        values = values.to(self.where)
        store.values = values.pin_memory() if self.pin else values
        store.have = have.clone()
        self.stats["loaded"] += int(have.sum())
        logger.info("feature cache: read %d activations of the %s split from %s", int(have.sum()), name,
                    self.disk.folder)

    def persist(self) -> None:
        """``train.feature_cache=disk``: write every store with newly computed activations (a no-op otherwise).
        The loop calls it after each task's evaluation."""
        if self.disk is None:
            return
        for store in self.stores.values():
            if store.dirty and store.key and store.values is not None:
                self.disk.save(store.key, store.values, store.have)
                store.dirty = False

    def gather(self, store: _Store, index: torch.Tensor, variants: torch.Tensor) -> Activations:
        """The cached activations of ``index`` (variant ``variants[i]`` for sample ``i``), on the device."""
        values = store.values
        assert values is not None
        self.stats["batches"] += 1
        where = values.device
        h = values[variants.to(where), index.to(where)]
        if store.lengths is None or self.point is None:
            return Activations(h, self.point).to(self.device, non_blocking=True)
        lengths = store.lengths[index]
        width = int(lengths.max()) if len(index) else 0
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        padded = bool(len(index) and int(lengths.min()) < width)
        return Activations(h[:, :width], self.point, mask, padded).to(self.device, non_blocking=True)

    def inputs(self, name: str, split: Split, transform: Any, indices: np.ndarray, *,
               train: bool) -> tuple[Split, Any]:
        """``(split, transform)`` to train (``train``) or evaluate on ``split[indices]`` with: the cached pair
        when the cache applies (filled for ``indices`` now), else the given ones."""
        if not self.usable or transform is not self.transform:
            return split, transform
        self.check()
        store = self._store(name, split, transform)
        if store.disabled:
            return split, transform
        if self.disk is not None and store.key is None:
            self._load(name, store)
        if not self._fill(name, store, np.asarray(indices), range(store.V) if train else range(1)):
            return split, transform
        return Split(IndexInputs(len(split), store.lengths), split.labels), CachedTransform(self, store)  # type: ignore[arg-type]


def cached_inputs(cache: FeatureCache | None, name: str, split: Split, transform: Transform, indices: np.ndarray,
                  *, train: bool) -> tuple[Split, Any]:
    """:meth:`FeatureCache.inputs`, or ``(split, transform)`` unchanged without a cache."""
    if cache is None:
        return split, transform
    return cache.inputs(name, split, transform, indices, train=train)
