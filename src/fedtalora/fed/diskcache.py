"""Cached frozen activations kept on disk across runs (``train.feature_cache=disk``).

:mod:`fedtalora.fed.cache` computes the activations of the frozen layers once per run. A sweep, a repeated
seed or a resumed run computes the very same activations again: same backbone weights below the cut, same
preprocessing, same data. With ``train.feature_cache=disk`` each split's activations are also written to one
file in a cache folder, named by a fingerprint of everything they depend on, and a later run reads them instead
of running the backbone.

* **The key** (:func:`fingerprint`) is a SHA-256 over: the file format, the torch version, the device type
  and the training precision (another kernel or autocast rounds differently), the cut point, the number of
  input variants, the input transform's ``repr`` (image size, normalisation), the attention kernel setting,
  the backbone's module tree (``repr``: layer types, sizes, dropout rates), the name, dtype, shape and bytes of
  every parameter and buffer below the cut (LoRA factors there included), and the bytes of the split's
  inputs (token ids, masks and lengths; image pixels). Any change to one of them gives another file.
* **The file** ``<key>.pt`` holds ``values (V, N, *shape)``, ``have (V, N)`` (which samples are filled) and a
  SHA-256 of both, written atomically (a reader sees an old file or a whole new one).
* **Reading is guarded.** The file is read through :func:`fedtalora.safeio.read_bytes` (a regular file, at most
  ``train.feature_cache_disk_mb``), unpickled with ``torch.load(weights_only=True)`` (no code runs), and used
  only if it has exactly the expected entries, the key in the file equals its name, the shapes and dtype fit the
  split, the digest matches its tensors and every filled activation is finite. Anything else is logged and the
  file ignored: the run computes the activations as without it. The digest catches a damaged file, not a forged
  one: the folder is trusted as a pip or Hugging Face cache is, and sits in the user's own cache directory by
  default (created with mode 0700).
* **Size.** After each write, the least recently used cache files (by modification time; a read touches its
  file) are deleted until the folder's cache files take at most ``train.feature_cache_disk_mb``. Only files
  named like cache files (64 hex digits + ``.pt``) are ever deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import safeio
from ..errors import FedTaLoRAError

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "DiskFeatures", "default_folder", "fingerprint", "hash_inputs"]

FORMAT = "fedtalora-features/1"
"""The file format; part of every key, so a new format never reads old files."""

_NAME = re.compile(r"^[0-9a-f]{64}\.pt$")


def default_folder() -> Path:
    """``$XDG_CACHE_HOME/fedtalora/features``, else ``~/.cache/fedtalora/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtalora" / "features"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def hash_inputs(h: Any, inputs: Any) -> bool:
    """Feed the bytes of a split's inputs to the hash ``h``: tensors, arrays, dataclasses of them (token ids,
    masks, lengths), lists of strings. False when ``inputs`` holds something else (no key: no disk cache)."""
    if isinstance(inputs, torch.Tensor):
        h.update(f"tensor{tuple(inputs.shape)}{inputs.dtype}".encode())
        h.update(_tensor_bytes(inputs))
        return True
    if isinstance(inputs, np.ndarray) and inputs.dtype != object:
        h.update(f"array{inputs.shape}{inputs.dtype}".encode())
        h.update(memoryview(np.ascontiguousarray(inputs)).cast("B"))
        return True
    if dataclasses.is_dataclass(inputs) and not isinstance(inputs, type):
        h.update(type(inputs).__name__.encode())
        return all(hash_inputs(h, getattr(inputs, f.name)) for f in dataclasses.fields(inputs))
    if isinstance(inputs, list) and all(isinstance(s, str) for s in inputs):
        for s in inputs:
            h.update(len(s).to_bytes(8, "little"))
            h.update(s.encode("utf-8", "surrogatepass"))
        return True
    return False


def fingerprint(*, frozen: Iterable[tuple[str, torch.Tensor]], backbone: torch.nn.Module, point: int | None,
                variants: int, transform: Any, inputs: Any, device: torch.device, precision: str,
                fused_attention: bool) -> str | None:
    """The cache key of a split's activations (module docstring); None when the inputs cannot be hashed."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, torch.__version__, device.type, precision, point, variants, repr(transform),
                   bool(fused_attention), repr(backbone))).encode())
    for name, t in frozen:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    if not hash_inputs(h, inputs):
        return None
    return h.hexdigest()


def _digest(values: torch.Tensor, have: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{tuple(values.shape)}{values.dtype}".encode())
    h.update(_tensor_bytes(values))
    h.update(_tensor_bytes(have))
    return h.hexdigest()


class DiskFeatures:
    """The cache folder: :meth:`load` and :meth:`save` one split's activations by key; size-bounded.

    Args:
        folder: where the files are (created on first write, mode 0700).
        max_bytes: size limit of the folder's cache files (``train.feature_cache_disk_mb``).
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.stats = {"hits": 0, "misses": 0, "rejected": 0, "writes": 0, "evicted": 0}

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.folder / f"{key}.pt"

    def load(self, key: str, shape: tuple[int, int], width: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(values, have)`` of ``key`` on the CPU, or None (no file, or one that fails a check: logged).

        Args:
            shape: ``(V, N)``: variants and samples of the split.
            width: text at a block: the split's padded sequence length (``values.shape[2]``); else None.
        """
        path = self.path(key)
        if not path.exists():
            self.stats["misses"] += 1
            return None
        try:
            got = self._read(path, key, shape, width)
        except (FedTaLoRAError, ValueError) as e:
            self.stats["rejected"] += 1
            logger.warning("feature cache: ignoring %s: %s", path.name, e)
            return None
        self.stats["hits"] += 1
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return got

    def _read(self, path: Path, key: str, shape: tuple[int, int], width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        data = safeio.read_bytes(path, what=f"feature cache file {path.name}", max_bytes=self.max_bytes)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, or pickled objects (refused by weights_only)
            raise ValueError(f"not a readable feature cache file ({type(e).__name__})") from None
        if not isinstance(obj, dict) or set(obj) != {"format", "key", "values", "have", "digest"}:
            raise ValueError("unexpected content")
        values, have = obj["values"], obj["have"]
        if obj["format"] != FORMAT or obj["key"] != key:
            raise ValueError("another format or key than its name says")
        if not (isinstance(values, torch.Tensor) and isinstance(have, torch.Tensor)):
            raise ValueError("values/have are not tensors")
        if have.dtype != torch.bool or tuple(have.shape) != shape or values.ndim < 3 \
                or tuple(values.shape[:2]) != shape or not values.is_floating_point() \
                or (width is not None and (values.ndim < 4 or values.shape[2] != width)):
            raise ValueError(f"shapes {tuple(values.shape)}/{tuple(have.shape)} do not fit the split {shape}")
        if obj["digest"] != _digest(values, have):
            raise ValueError("its digest does not match its tensors (damaged)")
        if not bool(torch.isfinite(values[have]).all()):
            raise ValueError("non-finite activations")
        return values, have

    def save(self, key: str, values: torch.Tensor, have: torch.Tensor) -> bool:
        """Write ``key``'s file (atomically), then keep the folder under its limit. False if not written."""
        values, have = values.detach().to("cpu"), have.to("cpu")
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "key": key, "values": values, "have": have,
                    "digest": _digest(values, have)}, buf)
        data = buf.getvalue()
        if len(data) > self.max_bytes:
            logger.warning("feature cache: %.0f MiB of activations exceed train.feature_cache_disk_mb=%d; not kept on "
                           "disk", len(data) / 2**20, self.max_bytes // 2**20)
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            safeio.atomic_write_bytes(self.path(key), data, fsync=False)
        except (OSError, FedTaLoRAError) as e:
            logger.warning("feature cache: cannot write to %s: %s", self.folder, e)
            return False
        self.stats["writes"] += 1
        self.evict(keep=self.path(key))
        return True

    def evict(self, keep: Path | None = None) -> None:
        """Delete the least recently used cache files until they fit in :attr:`max_bytes` (never ``keep``)."""
        files = []
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for e in entries:
            if not _NAME.match(e.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.is_file(follow_symlinks=False):
                files.append((st.st_mtime, st.st_size, Path(e.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
            self.stats["evicted"] += 1
