"""Image datasets read from their usual on-disk layouts: Tiny-ImageNet, ImageNet-R, any ImageFolder, Omniglot.

Registered in :data:`~fedtalora.data.types.DATASETS` (CIFAR-100 and digits live in :mod:`fedtalora.data`):

==================  ======================================================================================
``tiny-imagenet``   the official ``tiny-imagenet-200`` folder: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
                    ``val/images/*.JPEG`` + ``val/val_annotations.txt`` (the val set is the test split)
``imagenet-r``      ``imagenet-r/<wnid>/*.jpg`` (200 classes, no official split: a per-class train/test split
                    is drawn from the seed)
``imagefolder``     any ``root/train/<class>/...`` and ``root/test/<class>/...`` (or ``root/val``)
``omniglot``        ``Alphabet/characterNN/*.png`` read straight from the ``images_background_small{1,2}.zip``
                    archives (or their extracted folders); one class per character, a per-class train/test
                    split drawn from the seed
==================  ======================================================================================

``data.root`` may name the dataset's own folder (``.../tiny-imagenet-200``) or its parent.

**Memory.** Every image is decoded once into one preallocated ``uint8`` tensor ``(N, 3, size, size)``;
the backbone's input size and normalisation are applied per batch by
:class:`~fedtalora.data.ImageTransform` (on the GPU when training there). ``size`` is a loader option
(``data.options={size: N}``) with a per-dataset default chosen for memory:

* Tiny-ImageNet keeps its native 64 px: 110,000 images x 12,288 B = 1.35 GB (at 224 px it would be 16.6 GB);
* ImageNet-R and ImageFolder store 224 px (the ViT input): ImageNet-R's 30,000 images take 4.5 GB;
* Omniglot keeps its native 105 px: 4,840 images x 33,075 B = 160 MB for the 242 small-set characters.

Non-square images are resized so their shorter side is ``size`` and centre-cropped (``PIL.ImageOps.fit``,
bicubic); grayscale is replicated to three channels. Files are decoded by a thread pool (Pillow releases
the GIL while decoding and resizing); ``workers`` sets its size.

**Splits.** Class ids are positions in the sorted class names, and samples are ordered by sorted path,
so the label mapping does not depend on the file system's listing order. Where a dataset has no
official test set (ImageNet-R, Omniglot), each class is shuffled by ``numpy_rng(seed, "<name>-split")``
and its first ``round(n * test_fraction)`` samples go to the test split: the split is a pure function
of (seed, file listing, test_fraction). ImageNet-R can also save the split it drew to a JSON file and
read it back (``split_file``), so a split can be shared between machines or kept with the runs.

Missing files raise :class:`~fedtalora.errors.DataError` with one line saying what to download from
where and where to put it; ``data.download=true`` fetches the public archives (needs internet).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import safeio
from ..errors import DataError, one_line
from ..safeio import atomic_write_text
from ..seeding import numpy_rng
from .types import DATASETS, Dataset, Split, stratified_split

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_R_URL",
    "OMNIGLOT_PARTS",
    "OMNIGLOT_URL",
    "TINY_IMAGENET_URL",
    "decode_images",
    "load_imagefolder",
    "load_imagenet_r",
    "load_omniglot",
    "load_tiny_imagenet",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{part}.zip"
OMNIGLOT_PARTS = ("images_background_small1", "images_background_small2")

#: A source of one encoded image: a file path, or the bytes of a file (e.g. a zip member).
ImageSource = Path | bytes

MAX_IMAGE_BYTES = 256 * 2**20
"""Largest image file read (a dataset image is at most a few MB)."""


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_one(source: ImageSource, size: int, name: str) -> np.ndarray:
    """One image as ``uint8 (3, size, size)``: RGB, shorter side resized to ``size``, centre-cropped.

    A path is read only if it is a regular file (:func:`fedtalora.safeio.read_bytes`: a FIFO named
    ``x.png`` is refused instead of blocking). Whatever Pillow raises on the bytes (truncated or
    forged files, decompression bombs: see :func:`decode_images`) becomes one :class:`DataError`.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Path):
        source = safeio.read_bytes(source, what=f"image {name}", max_bytes=MAX_IMAGE_BYTES, error=DataError)
    try:
        with Image.open(io.BytesIO(source)) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {name} is too large to decode safely ({one_line(exc, 200)})") from None
    except Exception as exc:  # any failure of the decoder on these bytes is a bad file, not a bug of ours
        raise DataError(f"cannot decode image {name}: {type(exc).__name__}: {one_line(exc, 200)}") from None
    return arr.transpose(2, 0, 1)  # HWC -> CHW


def decode_images(
    sources: Sequence[ImageSource], size: int, *, names: Sequence[str] | None = None, workers: int = 0
) -> torch.Tensor:
    """Decode images into one preallocated ``uint8`` tensor of shape ``(N, 3, size, size)``.

    Args:
        sources: Paths or encoded bytes, one per image, in output order.
        size: Side of the stored square images.
        names: Names of the images for error messages (default: the paths, or the positions).
        workers: Decoding threads; ``0`` picks ``min(8, cpu_count)``.

    Returns:
        The images; row ``i`` holds ``sources[i]``.

    Raises:
        DataError: An image cannot be read or decoded (the message names it), is not a regular file,
            or has more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``;
            the warning Pillow gives between one and two times that limit is an error here).
    """
    if size <= 0:
        raise DataError(f"image size must be positive, got {size}")
    n = len(sources)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    view = out.numpy()  # shares memory: workers fill distinct rows

    def fill(i: int) -> None:
        src = sources[i]
        name = names[i] if names is not None else (str(src) if isinstance(src, Path) else f"#{i}")
        view[i] = _decode_one(src, size, name)

    from PIL import Image

    workers = workers or _default_workers()
    with warnings.catch_warnings():  # entered by this thread only; the decoding threads see the filter
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if workers == 1 or n < 64:
            for i in range(n):
                fill(i)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(fill, range(n), chunksize=64):
                    pass
    return out


def _check_size(dataset: str, size: int, workers: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DataError(f"{dataset}: data.options size must be a positive integer, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"{dataset}: data.options workers must be an integer >= 0, got {workers!r}")


def _check_fraction(dataset: str, test_fraction: float) -> None:
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"{dataset}: test_fraction must be in (0, 1), got {test_fraction}")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted by path (hidden folders skipped)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if _is_image(Path(f)))
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for every non-hidden subfolder of ``folder``."""
    return {
        d.name: _images_under(d)
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def _download_error(what: str, url: str, root: Path, exc: BaseException) -> DataError:
    return DataError(one_line(
        f"{what} could not be downloaded from {url} to {root} ({type(exc).__name__}: {exc}); "
        f"download it by hand and extract it into {root}"
    ))


def _fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` (via a temporary file, so a broken download leaves nothing behind)."""
    import shutil
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
        shutil.copyfileobj(response, out, length=1 << 20)
    tmp.replace(dest)


def _download_and_extract(what: str, url: str, root: Path) -> None:
    from torchvision.datasets.utils import extract_archive

    archive = root / url.rstrip("/").rsplit("/", 1)[-1]
    logger.info("downloading %s from %s to %s", what, url, archive)
    try:
        _fetch(url, archive)
        extract_archive(str(archive), str(root))
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:  # URLError is an OSError
        raise _download_error(what, url, root, exc) from None


def _split_by_class(labels: np.ndarray, test_fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The seeded per-class split of :func:`fedtalora.data.types.stratified_split`, under its own stream."""
    return stratified_split(labels, test_fraction, numpy_rng(seed, f"{name}-split"))


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------


def _labelled(folders: dict[str, list[Path]], class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    index = {c: i for i, c in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    for cls in class_names:
        for p in folders.get(cls, []):
            paths.append(p)
            labels.append(index[cls])
    return paths, np.asarray(labels, dtype=np.int64)


@DATASETS.register("imagefolder")
def load_imagefolder(
    root: str | Path,
    *,
    seed: int,
    download: bool = False,
    size: int = 224,
    workers: int = 0,
) -> Dataset:
    """Any dataset laid out as ``root/train/<class>/...`` and ``root/test/<class>/...``.

    ``root/val`` is used when there is no ``root/test``. Images may sit anywhere below their class
    folder. Both splits must have the same class folders; class ids follow the sorted folder names.

    Args:
        root: The folder holding ``train/`` and ``test/`` (or ``val/``).
        seed: Unused (the split is given by the folders).
        download: Unsupported for arbitrary folders; ignored.
        size: Side of the stored square images (shorter side resized, centre crop).
        workers: Decoding threads (``0``: ``min(8, cpu_count)``).

    Returns:
        The ``imagefolder`` dataset.

    Raises:
        DataError: The layout is missing or inconsistent, a class has no images, or an image is unreadable.
    """
    del seed, download
    _check_size("imagefolder", size, workers)
    root = Path(root).expanduser()
    layout = f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg (set data.root to that folder)"
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(f"imagefolder: no train/ and test/ (or val/) folders under {root}; {layout}")
    train_folders = _class_folders(train_dir)
    test_folders = _class_folders(test_dir)
    if not train_folders:
        raise DataError(f"imagefolder: {train_dir} has no class folders; {layout}")
    if set(train_folders) != set(test_folders):
        only_train = sorted(set(train_folders) - set(test_folders))[:3]
        only_test = sorted(set(test_folders) - set(train_folders))[:3]
        raise DataError(
            f"imagefolder: {train_dir} and {test_dir} must have the same class folders "
            f"(only in train: {only_train or 'none'}; only in {test_dir.name}: {only_test or 'none'})"
        )
    empty = [c for c in sorted(train_folders) if not train_folders[c]]
    if empty:
        raise DataError(f"imagefolder: class folder(s) {empty[:3]} under {train_dir} hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    class_names = sorted(train_folders)
    splits = []
    for folders in (train_folders, test_folders):
        paths, labels = _labelled(folders, class_names)
        splits.append(Split(decode_images(paths, size, workers=workers), labels))
    return Dataset(name="imagefolder", train=splits[0], test=splits[1], class_names=class_names)


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------------


def _tiny_base(root: Path) -> Path | None:
    for base in (root / "tiny-imagenet-200", root):
        if (base / "wnids.txt").is_file() and (base / "train").is_dir():
            return base
    return None


def _tiny_missing(root: Path, detail: str = "not found") -> DataError:
    return DataError(one_line(
        f"Tiny-ImageNet {detail} under {root} (expected {root}/tiny-imagenet-200/wnids.txt, "
        f"train/<wnid>/images/*.JPEG and val/val_annotations.txt); download {TINY_IMAGENET_URL} and "
        f"extract it into {root}, or set data.download=true on a machine with internet"
    ))


@DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(
    root: str | Path,
    *,
    seed: int,
    download: bool = False,
    size: int = 64,
    workers: int = 0,
) -> Dataset:
    """Tiny-ImageNet-200: 100,000 train / 10,000 val 64x64 images of 200 classes (val is the test split).

    Class ids follow the sorted WordNet ids of ``wnids.txt``; ``class_names`` are those ids. The
    unlabelled ``test/`` folder is not used.

    Args:
        root: ``tiny-imagenet-200/`` or the folder holding it.
        seed: Unused (the official split is fixed).
        download: Download and extract the official zip (237 MB) when it is missing.
        size: Side of the stored images (default: the native 64; the backbone's size is applied per batch).
        workers: Decoding threads (``0``: ``min(8, cpu_count)``).

    Returns:
        The ``tiny-imagenet`` dataset.

    Raises:
        DataError: Files are missing or inconsistent (e.g. a val image of an unknown class).
    """
    del seed
    _check_size("tiny-imagenet", size, workers)
    root = Path(root).expanduser()
    base = _tiny_base(root)
    if base is None and download:
        _download_and_extract("Tiny-ImageNet", TINY_IMAGENET_URL, root)
        base = _tiny_base(root)
    if base is None:
        raise _tiny_missing(root)
    wnids_text = safeio.read_text(base / "wnids.txt", what=f"Tiny-ImageNet {base / 'wnids.txt'}", error=DataError)
    wnids = sorted({w.strip() for w in wnids_text.split() if w.strip()})
    if not wnids:
        raise _tiny_missing(root, f"wnids.txt is empty in {base}")
    index = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        folder = base / "train" / w / "images"
        files = sorted(p for p in folder.glob("*") if _is_image(p)) if folder.is_dir() else []
        if not files:
            raise _tiny_missing(root, f"is incomplete: no images in {folder}")
        train_paths.extend(files)
        train_labels.extend([index[w]] * len(files))
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise _tiny_missing(root, f"is incomplete: {annotations} is missing")
    val_paths: list[Path] = []
    val_labels: list[int] = []
    annotations_text = safeio.read_text(annotations, what=f"Tiny-ImageNet {annotations}", error=DataError)
    for lineno, line in enumerate(annotations_text.splitlines(), start=1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not line.strip():
            continue
        if len(fields) < 2:
            raise DataError(f"Tiny-ImageNet: {annotations} line {lineno} has no '<file>\\t<wnid>' fields")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"Tiny-ImageNet: {annotations} line {lineno}: {wnid!r} is not in wnids.txt")
        path = base / "val" / "images" / fname
        if not path.is_file():
            raise _tiny_missing(root, f"is incomplete: {path} (listed in val_annotations.txt) is missing")
        val_paths.append(path)
        val_labels.append(index[wnid])
    order = sorted(range(len(val_paths)), key=lambda i: val_paths[i].name)
    val_paths = [val_paths[i] for i in order]
    val_labels = [val_labels[i] for i in order]
    train = Split(decode_images(train_paths, size, workers=workers), np.asarray(train_labels))
    test = Split(decode_images(val_paths, size, workers=workers), np.asarray(val_labels))
    return Dataset(name="tiny-imagenet", train=train, test=test, class_names=wnids)


# --------------------------------------------------------------------------------------------------
# ImageNet-R
# --------------------------------------------------------------------------------------------------

_WNID = re.compile(r"^n\d{8}$")


def _imagenet_r_base(root: Path) -> Path | None:
    for base in (root / "imagenet-r", root):
        if base.is_dir() and any(d.is_dir() and _WNID.match(d.name) for d in base.iterdir()):
            return base
    return None


def _read_split_file(path: Path, base: Path, class_names: list[str],
                     known: set[str] | None = None) -> tuple[list[str], list[str]]:
    data = safeio.read_json(path, what=f"ImageNet-R split file {path}", error=DataError)
    lists = [data.get(k) for k in ("train", "test")] if isinstance(data, dict) else [None, None]
    bad = [k for k, v in zip(("train", "test"), lists, strict=True) if not isinstance(v, list)
           or not all(isinstance(p, str) and p and not Path(p).is_absolute() and ".." not in Path(p).parts
                      for p in v)]
    if bad:
        raise DataError(f"ImageNet-R split file {path} is not a split: '{bad[0]}' must be a list of paths relative "
                        "to imagenet-r/; delete it to redraw")
    train, test = list(lists[0]), list(lists[1])  # type: ignore[arg-type]
    missing = [p for p in train + test if (p not in known if known is not None else not (base / p).is_file())]
    if missing:
        raise DataError(f"ImageNet-R split file {path} lists {len(missing)} file(s) missing under {base} "
                        f"(e.g. {missing[0]}); delete it to redraw")
    classes = sorted({Path(p).parts[0] for p in train})
    if classes != class_names:
        raise DataError(f"ImageNet-R split file {path} has {len(classes)} classes but {base} has "
                        f"{len(class_names)}; delete it to redraw")
    return train, test


@DATASETS.register("imagenet-r")
def load_imagenet_r(
    root: str | Path,
    *,
    seed: int,
    download: bool = False,
    size: int = 224,
    test_fraction: float = 0.2,
    split_file: str = "",
    workers: int = 0,
) -> Dataset:
    """ImageNet-R: 30,000 renditions of 200 ImageNet classes, ``imagenet-r/<wnid>/*.jpg``.

    There is no official split: within each class (sorted paths), the samples are shuffled by
    ``numpy_rng(seed, "imagenet-r-split")`` and the first ``round(n * test_fraction)`` form the test
    split (80/20 by default, as in the pre-trained continual-learning literature).

    Args:
        root: ``imagenet-r/`` or the folder holding it.
        seed: Root seed of the split.
        download: Download and extract the official tar (2.1 GB) when it is missing.
        size: Side of the stored square images (shorter side resized, centre crop).
        test_fraction: Fraction of each class in the test split, in ``(0, 1)``.
        split_file: A JSON file ``{"train": [...], "test": [...]}`` of paths relative to ``imagenet-r/``:
            read when it exists (``seed`` and ``test_fraction`` are then ignored), written with the
            drawn split when it does not. Empty: the split lives only in the seed.
        workers: Decoding threads (``0``: ``min(8, cpu_count)``).

    Returns:
        The ``imagenet-r`` dataset; class names are WordNet ids.

    Raises:
        DataError: The files are missing, or the split file disagrees with them.
    """
    _check_size("imagenet-r", size, workers)
    _check_fraction("imagenet-r", test_fraction)
    root = Path(root).expanduser()
    base = _imagenet_r_base(root)
    if base is None and download:
        _download_and_extract("ImageNet-R", IMAGENET_R_URL, root)
        base = _imagenet_r_base(root)
    if base is None:
        raise DataError(one_line(
            f"ImageNet-R not found under {root} (expected {root}/imagenet-r/<wnid>/*.jpg); download "
            f"{IMAGENET_R_URL} and extract it into {root}, or set data.download=true on a machine with internet"
        ))
    folders = {c: ps for c, ps in _class_folders(base).items() if _WNID.match(c)}
    empty = [c for c, ps in folders.items() if not ps]
    if empty:
        raise DataError(f"ImageNet-R under {base}: class folder(s) {empty[:3]} hold no images")
    class_names = sorted(folders)
    if len(class_names) != 200:
        logger.warning("ImageNet-R under %s has %d classes (the full set has 200)", base, len(class_names))
    paths, labels = _labelled(folders, class_names)
    rel = [p.relative_to(base).as_posix() for p in paths]
    split_path = Path(split_file).expanduser() if split_file else None
    if split_path is not None and split_path.is_file():
        train_rel, test_rel = _read_split_file(split_path, base, class_names, known=set(rel))
        logger.info("ImageNet-R split read from %s (seed and test_fraction ignored)", split_path)
        position = {r: i for i, r in enumerate(rel)}
        train_idx = np.asarray(sorted(position[r] for r in train_rel), dtype=np.int64)
        test_idx = np.asarray(sorted(position[r] for r in test_rel), dtype=np.int64)
    else:
        train_idx, test_idx = _split_by_class(labels, test_fraction, seed, "imagenet-r")
        if split_path is not None:
            try:
                split_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(f"cannot create the folder of split_file {split_path}: {e.strerror or e}") from None
            doc = {"dataset": "imagenet-r", "seed": seed, "test_fraction": test_fraction,
                   "train": [rel[i] for i in train_idx], "test": [rel[i] for i in test_idx]}
            atomic_write_text(split_path, json.dumps(doc, indent=0))
            logger.info("ImageNet-R split (seed %d) written to %s", seed, split_path)
    train = Split(decode_images([paths[i] for i in train_idx], size, workers=workers), labels[train_idx])
    test = Split(decode_images([paths[i] for i in test_idx], size, workers=workers), labels[test_idx])
    return Dataset(name="imagenet-r", train=train, test=test, class_names=class_names)


# --------------------------------------------------------------------------------------------------
# Omniglot
# --------------------------------------------------------------------------------------------------


def _omniglot_characters(source: Path) -> dict[tuple[str, str], list[tuple[str, ImageSource]]]:
    """``{(alphabet, character): [(file name, source)]}`` of one part (a zip or an extracted folder)."""
    chars: dict[tuple[str, str], list[tuple[str, ImageSource]]] = {}
    if source.suffix == ".zip":
        try:
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    parts = Path(info.filename).parts
                    if info.is_dir() or len(parts) < 3 or not _is_image(Path(parts[-1])):
                        continue
                    alphabet, character = parts[-3], parts[-2]
                    chars.setdefault((alphabet, character), []).append((parts[-1], zf.read(info)))
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"Omniglot archive {source} is unreadable ({one_line(exc)}); download it again") from None
    else:
        top = source / source.name if (source / source.name).is_dir() else source
        for path in _images_under(top):
            rel = path.relative_to(top).parts
            if len(rel) >= 3:
                chars.setdefault((rel[-3], rel[-2]), []).append((path.name, path))
    return {k: sorted(v, key=lambda item: item[0]) for k, v in chars.items()}


def _omniglot_part(root: Path, part: str) -> Path | None:
    for folder in (root, root / "omniglot-small", root / "omniglot"):
        if (folder / part).is_dir():
            return folder / part
        if (folder / f"{part}.zip").is_file():
            return folder / f"{part}.zip"
    return None


@DATASETS.register("omniglot")
def load_omniglot(
    root: str | Path,
    *,
    seed: int,
    download: bool = False,
    size: int = 105,
    test_fraction: float = 0.25,
    parts: Sequence[str] = OMNIGLOT_PARTS,
    workers: int = 0,
) -> Dataset:
    """Omniglot handwritten characters, one class per character (242 in the two small background sets).

    Each part is read from ``ROOT/<part>.zip`` or an extracted ``ROOT/<part>/`` folder laid out
    ``Alphabet/characterNN/*.png``. A character present in several parts (Greek and Latin are in both
    small sets, with identical drawings) is taken once, from the first part. Class ids follow the sorted
    ``"Alphabet/characterNN"`` names. Each class's drawings (20) are split by
    ``numpy_rng(seed, "omniglot-split")``: ``round(20 * test_fraction)`` to the test split.

    Args:
        root: The folder holding the zips or folders (or its ``omniglot-small/`` or ``omniglot/`` subfolder).
        seed: Root seed of the split.
        download: Download missing part zips from the Omniglot repository.
        size: Side of the stored images (default: the native 105).
        test_fraction: Fraction of each character's drawings in the test split, in ``(0, 1)``.
        parts: Which archives to read, e.g. ``[images_background, images_evaluation]`` for the full 1,623
            characters.
        workers: Decoding threads (``0``: ``min(8, cpu_count)``).

    Returns:
        The ``omniglot`` dataset (white background, black strokes, grayscale replicated to RGB).

    Raises:
        DataError: A part is missing or unreadable.
    """
    _check_size("omniglot", size, workers)
    _check_fraction("omniglot", test_fraction)
    if isinstance(parts, str) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise DataError(f"omniglot: parts must be a non-empty list of archive names, got {parts!r}")
    root = Path(root).expanduser()
    characters: dict[tuple[str, str], list[tuple[str, ImageSource]]] = {}
    for part in parts:
        source = _omniglot_part(root, part)
        if source is None and download:
            url = OMNIGLOT_URL.format(part=part)
            try:
                _fetch(url, root / f"{part}.zip")
            except (OSError, ValueError) as exc:
                raise _download_error(f"Omniglot {part}", url, root, exc) from None
            source = _omniglot_part(root, part)
        if source is None:
            raise DataError(one_line(
                f"Omniglot {part} not found under {root} (expected {root}/{part}.zip or the extracted "
                f"{root}/{part}/<Alphabet>/<characterNN>/*.png); download {OMNIGLOT_URL.format(part=part)} "
                f"into {root}, or set data.download=true on a machine with internet"
            ))
        for key, files in _omniglot_characters(source).items():
            if key in characters:
                if [f for f, _ in characters[key]] != [f for f, _ in files]:
                    logger.warning("omniglot: %s/%s differs between parts; keeping the first", *key)
                continue
            characters[key] = files
    if not characters:
        raise DataError(f"Omniglot under {root}: the parts {list(parts)} hold no Alphabet/characterNN/*.png images")
    keys = sorted(characters)
    class_names = [f"{a}/{c}" for a, c in keys]
    sources: list[ImageSource] = []
    names: list[str] = []
    labels: list[int] = []
    for label, key in enumerate(keys):
        for fname, src in characters[key]:
            sources.append(src)
            names.append(f"{class_names[label]}/{fname}")
            labels.append(label)
    label_arr = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = _split_by_class(label_arr, test_fraction, seed, "omniglot")
    splits = [
        Split(decode_images([sources[i] for i in idx], size, names=[names[i] for i in idx], workers=workers),
              label_arr[idx])
        for idx in (train_idx, test_idx)
    ]
    return Dataset(name="omniglot", train=splits[0], test=splits[1], class_names=class_names)
