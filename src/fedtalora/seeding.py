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
def seeded_torch(root: int, *path: object, device: torch.device | str | None = None) -> Iterator[None]:
    """Run code that draws from torch's global RNG reproducibly: third-party init (timm, peft) or the
    model's own draws during training (LoRA dropout, drop-path).

    The global CPU RNG (and that of ``device`` when it is a GPU) is saved, seeded from ``(root, *path)`` and
    restored on exit, so the caller's RNG stream is left exactly as it was. Seeding per position (client,
    task, round) makes the draws depend only on the position, not on the history of the process: a resumed
    run equals an uninterrupted one, and a client in another process equals one in this process.
    """
    s = derive_seed(root, *path)
    dev = torch.device(device) if device is not None else None
    gpu = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev is not None and dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu):
        torch.default_generator.manual_seed(s)
        if gpu:
            with torch.cuda.device(gpu[0]):
                torch.cuda.manual_seed(s)
        yield
