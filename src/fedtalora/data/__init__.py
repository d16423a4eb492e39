"""Datasets as in-memory splits, built by name from a run's ``data`` section.

* :mod:`.types` -- :class:`Split`, :class:`Dataset`, the registry :data:`DATASETS`, seeded subsets;
* :mod:`.builtin` -- ``digits`` (offline) and ``cifar100`` (torchvision);
* :mod:`.images` -- folder datasets: ``imagefolder``, ``tiny-imagenet``, ``imagenet-r``, ``omniglot``;
* :mod:`.text` -- ``banking77``, ``clinc150``, ``text-csv``;
* :mod:`.transforms` -- batch preprocessing (:class:`ImageTransform`, :class:`TextTransform`).

:func:`load_from_config` is the one entry point of the server and of every Flower client, so both see the
same samples. Missing or corrupted data raises :class:`~fedtalora.errors.DataError` with a one-line
message that says what to download and where to put it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import builtin, images, text  # noqa: F401  (registration)
from .builtin import load_cifar100, load_digits
from .transforms import ImageTransform, TextTransform, Tokens, tokenize_split
from .types import DATASETS, Dataset, Split, per_class_subset, stratified_split, subset_dataset

if TYPE_CHECKING:
    from ..config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "Dataset",
    "ImageTransform",
    "Split",
    "TextTransform",
    "Tokens",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_from_config",
    "per_class_subset",
    "stratified_split",
    "subset_dataset",
    "tokenize_split",
]


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
    kwargs = check_loader_options(name, loader, kwargs)
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


def check_loader_options(name: str, loader: Callable[..., Dataset], options: dict[str, Any]) -> dict[str, Any]:
    """Reject ``data.options`` the loader does not take, naming the ones it does; check each value against
    the loader's annotation of that parameter (as strictly as a config field: ``test_fraction: abc`` is
    an error naming ``data.options.test_fraction``). Returns the options, converted where the
    annotation says so (``"1e-3"`` -> ``0.001``)."""
    import typing

    from ..config import coerce_value

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
        try:
            out[key] = coerce_value(value, hints.get(key, Any), f"data.options.{key}")
        except TypeError:  # an annotation the config types do not cover: the loader checks the value itself
            out[key] = value
    return out
