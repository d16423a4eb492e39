"""Datasets as in-memory tensors, and a batch-level image transform.

A :class:`Dataset` holds a train and a test :class:`Split`; each split keeps its raw inputs (images
as ``uint8`` tensors of shape ``(N, 3, H, W)``) and the original class ids. Class orders, task
splits and client partitions are decided elsewhere, from these ids.

Datasets are built by name through :data:`DATASETS` / :func:`load_dataset`:

* ``digits``: scikit-learn's bundled 8x8 digits (offline, used by tests and smoke runs);
* ``cifar100``: CIFAR-100 through :class:`torchvision.datasets.CIFAR100`.

Missing or corrupted data raises :class:`~fedtalora.errors.DataError` with a one-line message that
says what to download and where to put it.

:class:`ImageTransform` turns a ``uint8`` batch into a normalised ``float32`` batch at the backbone's
input size, on whatever device the batch lives; its only randomness (horizontal flips) comes from
an explicit generator.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR100

from .errors import ConfigError, DataError
from .registry import Registry
from .seeding import numpy_rng

if TYPE_CHECKING:
    from .config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "Dataset",
    "ImageTransform",
    "Split",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_from_config",
    "per_class_subset",
    "subset_dataset",
]


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


DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def load_dataset(name: str, root: str | Path, *, seed: int, download: bool = False, **kwargs: Any) -> Dataset:
    """Build the dataset registered as ``name``.

    Args:
        name: Registry name (see ``DATASETS.names()``).
        root: Directory holding the dataset files (ignored by datasets bundled with a library).
        seed: Root seed; datasets that draw their own train/test split derive their generator from it.
        download: Whether the loader may download missing files.
        **kwargs: Extra keyword arguments for the dataset's loader.

    Returns:
        The loaded dataset.

    Raises:
        ConfigError: ``name`` is not a registered dataset.
        DataError: The dataset files are missing or corrupted.
    """
    loader = DATASETS.get(name)
    kwargs = _check_loader_options(name, loader, kwargs)
    dataset = loader(Path(root).expanduser(), seed=seed, download=download, **kwargs)
    logger.info(
        "loaded dataset %s: %d classes, %d train / %d test samples",
        dataset.name,
        dataset.num_classes,
        len(dataset.train),
        len(dataset.test),
    )
    return dataset


def load_from_config(data: DataConfig, seed: int) -> Dataset:
    """The dataset a run's ``data`` section describes: loaded, then subset per class if asked. The one
    entry point of the server and of every Flower client, so both see the same samples."""
    dataset = load_dataset(data.dataset, data.root, seed=seed, download=data.download, **data.options)
    return subset_dataset(dataset, seed, data.train_per_class, data.test_per_class)


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


def _check_loader_options(name: str, loader: Callable[..., Dataset], options: dict[str, Any]) -> dict[str, Any]:
    """Reject ``data.options`` the loader does not take, naming the ones it does; check each value against
    the loader's annotation of that parameter (as strictly as a config field: ``test_fraction: abc`` is
    an error naming ``data.options.test_fraction``). Returns the options, converted where the
    annotation says so (``"1e-3"`` -> ``0.001``)."""
    import inspect
    import typing

    from .config import coerce_value

    params = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
               and n not in ("seed", "download")]
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"data.options: {name} takes no option {unknown[0]!r} "
                          f"(it takes: {', '.join(allowed) or 'none'})")
    try:
        hints = typing.get_type_hints(loader)
    except Exception:  # pragma: no cover - an unresolvable annotation of a third-party loader: no type check
        hints = {}
    out = {}
    for key, value in options.items():
        hint = hints.get(key, Any)
        try:
            out[key] = coerce_value(value, hint, f"data.options.{key}")
        except TypeError:  # an annotation the config types do not cover: the loader checks the value itself
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------------


def _stratified_split(
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
    train_idx, test_idx = _stratified_split(labels, test_fraction, numpy_rng(seed, "digits-split"))
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


def _one_line(text: object) -> str:
    """``str(text)`` with all whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def _cifar_error(root: Path, dataset_cls: type[CIFAR100], download: bool, exc: BaseException) -> DataError:
    """The one-line :class:`DataError` for CIFAR-100 files that are missing, corrupted or undownloadable."""
    folder = root / dataset_cls.base_folder
    names = [n for n, _ in dataset_cls.train_list] + [n for n, _ in dataset_cls.test_list]
    names.append(dataset_cls.meta["filename"])
    expected = f"{folder}/{{{','.join(names)}}}"
    present = [n for n in names if (folder / n).is_file()]
    if download:
        state = f"could not be downloaded to {root} ({type(exc).__name__}: {_one_line(exc)})"
    elif len(present) == len(names):
        state = f"is corrupted under {root} (a file under {folder} fails its checksum or cannot be read)"
    else:
        state = f"not found under {root}"
    return DataError(
        _one_line(
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


# --------------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------------

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


class ImageTransform:
    """Batch-level preprocessing: ``uint8 (B, 3, H, W)`` -> normalised ``float32 (B, 3, S, S)``.

    Steps: scale to ``[0, 1]``; resize to ``image_size`` with :func:`torch.nn.functional.interpolate`
    (antialiased when downsampling, skipped when already that size); when ``train`` is true, flip
    each image horizontally with probability 1/2 using ``generator``; normalise with ``mean``/``std``.
    Runs on the batch's device and is deterministic given the generator.

    Args:
        image_size: Output height and width ``S``.
        mean: Per-channel mean subtracted after scaling to ``[0, 1]``.
        std: Per-channel standard deviation divided by after subtracting the mean.
        interpolation: One of ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"area"``.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str = "bilinear",
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r})"
        )

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = self.image_size
        if height == size and width == size:
            return x
        kwargs: dict[str, Any] = {}
        if self.interpolation in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
            kwargs["antialias"] = height > size or width > size
        x = F.interpolate(x, size=(size, size), mode=self.interpolation, **kwargs)
        return x.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else x

    def __call__(
        self, images_uint8: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Preprocess a batch.

        Args:
            images_uint8: ``uint8`` tensor of shape ``(B, 3, H, W)`` on any device.
            train: Apply random horizontal flips.
            generator: Source of the flip draws (on any device; the draws are moved to the batch's
                device). ``None`` uses torch's default generator, which is not reproducible.

        Returns:
            ``float32`` tensor of shape ``(B, 3, image_size, image_size)`` on the input's device.
        """
        if images_uint8.dtype != torch.uint8:
            raise ValueError(f"ImageTransform expects uint8 images, got {images_uint8.dtype}")
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"ImageTransform expects shape (B, 3, H, W), got {tuple(images_uint8.shape)}")
        device = images_uint8.device
        x = images_uint8.to(torch.float32).div_(255.0)
        x = self._resize(x)
        if train and x.shape[0] > 0:
            draw_device = generator.device if generator is not None else device
            flip = torch.rand(x.shape[0], generator=generator, device=draw_device)
            if flip.device != device:  # host draws for a GPU batch: an asynchronous copy, no wait for the GPU
                flip = (flip.pin_memory() if device.type == "cuda" else flip).to(device, non_blocking=True)
            x = torch.where((flip < 0.5)[:, None, None, None], x.flip(-1), x)
        mean, std = self._stats(device)
        return (x - mean) / std

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as ``(1, 3, 1, 1)`` tensors on ``device``, made once per device (a tensor
        made from Python numbers on a GPU is a synchronous copy)."""
        if device not in self._on_device:
            self._on_device[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                                            for v in (self.mean, self.std))
        return self._on_device[device]

# Register the folder and text datasets (they import this module, so they come last).
from . import image_data, text_data  # noqa: E402,F401
