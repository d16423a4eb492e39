"""What a dataset is: in-memory splits, the dataset registry, and seeded per-class subsets and splits.

A :class:`Dataset` holds a train and a test :class:`Split`; each split keeps its raw inputs (images as
``uint8`` tensors of shape ``(N, 3, H, W)``, or a list of strings for text) and the original class ids.
Class orders, task splits and client partitions are decided elsewhere, from these ids. Loaders register
themselves in :data:`DATASETS` (:mod:`.builtin`, :mod:`.images`, :mod:`.text`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..registry import Registry
from ..seeding import numpy_rng

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "Dataset", "Split", "per_class_subset", "stratified_split", "subset_dataset"]


@dataclass
class Split:
    """One split (train or test) of a dataset, held in memory.

    Attributes:
        inputs: Images as a ``uint8`` tensor of shape ``(N, 3, H, W)`` (grayscale replicated to three
            channels).
        labels: ``int64`` array of shape ``(N,)`` with the original class ids ``0..num_classes-1``.
    """

    inputs: torch.Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A named dataset with a train and a test split.

    Attributes:
        name: Registry name of the dataset (e.g. ``"cifar100"``).
        train: Training split.
        test: Test split.
        class_names: Name of each original class id, in id order.
        modality: ``"image"`` (``"text"`` is planned).
    """

    name: str
    train: Split
    test: Split
    class_names: list[str]
    modality: str = "image"

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of :attr:`class_names`)."""
        return len(self.class_names)

    def names_of(self, class_ids: Sequence[int]) -> list[str]:
        """The names of ``class_ids`` (original ids), in that order: e.g. the scenario's head order, for a
        method that embeds the label texts (``lander``). Class names are public: every party may compute
        with them."""
        return [self.class_names[int(c)] for c in class_ids]


DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def per_class_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_class`` samples of every class, drawn without replacement.

    Pure and deterministic given ``rng``'s state: classes are visited in increasing id order and each
    draws its samples with one ``rng.permutation``. The result is sorted (the split keeps its order).
    ``per_class <= 0`` keeps everything.
    """
    labels = np.asarray(labels).reshape(-1)
    if per_class <= 0:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx[rng.permutation(len(idx))[:per_class]] if len(idx) > per_class else idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _take(split: Split, idx: np.ndarray) -> Split:
    inputs = split.inputs
    if isinstance(inputs, torch.Tensor):
        taken: Any = inputs[torch.from_numpy(idx)]
    elif isinstance(inputs, np.ndarray):
        taken = inputs[idx]
    else:  # a list (text)
        taken = [inputs[i] for i in idx.tolist()]
    return Split(taken, split.labels[idx])


def subset_dataset(dataset: Dataset, seed: int, train_per_class: int = 0, test_per_class: int = 0) -> Dataset:
    """``dataset`` with at most ``train_per_class`` / ``test_per_class`` samples of each class (0: all),
    drawn from generators derived from ``seed`` (``"subset", "train"`` and ``"subset", "test"``)."""
    if train_per_class <= 0 and test_per_class <= 0:
        return dataset
    splits = {}
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        split = getattr(dataset, name)
        splits[name] = split if per_class <= 0 else _take(
            split, per_class_subset(split.labels, per_class, numpy_rng(seed, "subset", name)))
    logger.info("subset of %s: %d train / %d test samples (at most %d / %d per class)", dataset.name,
                len(splits["train"]), len(splits["test"]), train_per_class, test_per_class)
    return Dataset(dataset.name, splits["train"], splits["test"], dataset.class_names, dataset.modality)


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: shuffle each class and take its first ``round(n * test_fraction)``.

    Every class with at least two samples keeps at least one sample on each side. Both index arrays
    are returned sorted (original order).
    """
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(np.floor(len(idx) * test_fraction + 0.5))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))

