"""Datasets that need no folder of the user's: scikit-learn's ``digits`` and torchvision's ``cifar100``.

* ``digits``: scikit-learn's bundled 8x8 digits (offline, used by tests and smoke runs);
* ``cifar100``: CIFAR-100 through :class:`torchvision.datasets.CIFAR100`.

Missing or corrupted data raises :class:`~fedtalora.errors.DataError` with a one-line message that
says what to download and where to put it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR100

from ..errors import DataError, one_line
from ..seeding import numpy_rng
from .types import DATASETS, Dataset, Split, stratified_split

__all__ = ["load_cifar100", "load_digits"]


# --------------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------------


@DATASETS.register("digits")
def load_digits(
    root: str | Path | None = None,
    *,
    seed: int,
    download: bool = False,
    test_fraction: float = 0.25,
) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 8x8 images of 10 classes, no download needed.

    Pixel values ``0..16`` are scaled to ``uint8`` ``0..255`` (``round(v * 255 / 16)``) and the single
    channel is replicated to three. The train/test split is stratified: within each class, the samples
    are shuffled by ``numpy_rng(seed, "digits-split")`` and the first ``round(n * test_fraction)`` go
    to the test split.

    Args:
        root: Ignored (the data ship with scikit-learn).
        seed: Root seed of the split.
        download: Ignored.
        test_fraction: Fraction of each class put in the test split, in ``(0, 1)``.

    Returns:
        The ``digits`` dataset.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    del root, download
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(images[:, None, :, :], 3, axis=1))  # (N, 3, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, numpy_rng(seed, "digits-split"))
    inputs = torch.from_numpy(images)
    return Dataset(
        name="digits",
        train=Split(inputs[train_idx].contiguous(), labels[train_idx]),
        test=Split(inputs[test_idx].contiguous(), labels[test_idx]),
        class_names=[str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-100 (torchvision)
# --------------------------------------------------------------------------------------------------

_LOAD_ERRORS = (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError)



def _cifar_error(root: Path, dataset_cls: type[CIFAR100], download: bool, exc: BaseException) -> DataError:
    """The one-line :class:`DataError` for CIFAR-100 files that are missing, corrupted or undownloadable."""
    folder = root / dataset_cls.base_folder
    names = [n for n, _ in dataset_cls.train_list] + [n for n, _ in dataset_cls.test_list]
    names.append(dataset_cls.meta["filename"])
    expected = f"{folder}/{{{','.join(names)}}}"
    present = [n for n in names if (folder / n).is_file()]
    if download:
        state = f"could not be downloaded to {root} ({type(exc).__name__}: {one_line(exc)})"
    elif len(present) == len(names):
        state = f"is corrupted under {root} (a file under {folder} fails its checksum or cannot be read)"
    else:
        state = f"not found under {root}"
    return DataError(
        one_line(
            f"CIFAR-100 {state} (expected {expected}); download {dataset_cls.url} and extract it into "
            f"{root}, or set data.download=true on a machine with internet"
        )
    )


def _cifar_split(
    root: Path, train: bool, download: bool, dataset_cls: type[CIFAR100]
) -> tuple[Split, list[str]]:
    try:
        ds = dataset_cls(str(root), train=train, download=download)
        data = np.asarray(ds.data, dtype=np.uint8)
        targets = np.asarray(ds.targets, dtype=np.int64)
        classes = [str(c) for c in ds.classes]
    except _LOAD_ERRORS as exc:
        raise _cifar_error(root, dataset_cls, download, exc) from exc
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"CIFAR-100 under {root}: expected images of shape (N, H, W, 3), got {data.shape}")
    inputs = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))  # HWC -> CHW
    return Split(inputs, targets), classes


@DATASETS.register("cifar100")
def load_cifar100(
    root: str | Path,
    *,
    seed: int,
    download: bool = False,
    dataset_cls: type[CIFAR100] = CIFAR100,
) -> Dataset:
    """CIFAR-100 (50000 train / 10000 test 32x32 images, 100 classes) via torchvision.

    Args:
        root: Directory that holds (or will receive) ``cifar-100-python/``.
        seed: Unused (the official split is fixed); accepted for a uniform loader signature.
        download: Let torchvision download and extract the archive when it is missing.
        dataset_cls: The torchvision dataset class (tests pass a subclass with their own checksums).

    Returns:
        The ``cifar100`` dataset with the fine labels.

    Raises:
        DataError: The files are missing or corrupted (and could not be downloaded).
    """
    del seed
    root = Path(root).expanduser()
    train, class_names = _cifar_split(root, True, download, dataset_cls)
    # The train split already downloaded/verified everything; never download twice.
    test, _ = _cifar_split(root, False, False, dataset_cls)
    for split_name, split in (("train", train), ("test", test)):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(class_names)):
            raise DataError(f"CIFAR-100 under {root}: {split_name} labels outside 0..{len(class_names) - 1}")
    return Dataset(name="cifar100", train=train, test=test, class_names=class_names)


