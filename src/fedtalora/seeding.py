"""One root seed, many independent generators.

Every consumer of randomness (class order, partitions, client sampling, shuffling, augmentation,
initialisation) derives its own generator from the root seed and a path of names, e.g.
``derive_seed(seed, "client", 3, "task", 1, "round", 0)``. Nothing reads or writes the global RNGs,
so adding a new consumer never shifts the draws of another one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(root: int, *path: object) -> int:
    """A 63-bit seed determined by ``root`` and the names in ``path`` (stable across runs/platforms)."""
    text = "/".join([str(int(root))] + [str(p) for p in path])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def numpy_rng(root: int, *path: object) -> np.random.Generator:
    """A NumPy generator for ``(root, *path)``."""
    return np.random.default_rng(derive_seed(root, *path))


def torch_generator(root: int, *path: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for ``(root, *path)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(root, *path))
    return g


@contextlib.contextmanager
def seeded_torch(root: int, *path: object) -> Iterator[None]:
    """Run third-party code that draws from torch's global RNG (e.g. timm init) reproducibly.

    The global CPU RNG state is saved, seeded from ``(root, *path)`` and restored on exit, so the
    caller's RNG stream is left exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(root, *path))
        yield
