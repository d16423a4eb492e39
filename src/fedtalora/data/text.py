"""Text classification datasets, and tokenised inputs that batch like image tensors.

Registered in :data:`~fedtalora.data.types.DATASETS`:

* ``banking77``: the CSV layout of PolyAI's Banking77 (``train.csv`` and ``test.csv`` with columns
  ``text,category``), 77 intents;
* ``clinc150``: the official ``data_full.json`` of CLINC150 (lists of ``[text, intent]`` under
  ``train``, ``val`` and ``test``; the out-of-scope lists are ignored), 150 intents;
* ``text-csv``: any CSV with a text and a label column (``data.options``: ``text_column``,
  ``label_column``); ``data.root`` is a folder with ``train.csv`` and ``test.csv``, or one ``.csv``
  file from which a stratified test split is drawn with the seed (``test_fraction``).

A loader returns raw strings (``Split.inputs`` is a ``list[str]``, ``Dataset.modality == "text"``).
The run's builder tokenises them once, with the backbone's own tokenizer, into
:class:`~fedtalora.data.transforms.Tokens`, which index
and move to a device like a tensor, so the client loop is the same for images and text.
Class ids are the sorted label names: stable across runs and machines.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import safeio
from ..errors import DataError
from ..seeding import numpy_rng
from .types import DATASETS, Dataset, Split, stratified_split

logger = logging.getLogger(__name__)

__all__ = ["load_banking77", "load_clinc150", "load_text_csv"]

BANKING77_URL = "https://github.com/PolyAI-LDN/task-specific-datasets/tree/master/banking_data"
CLINC150_URL = "https://github.com/clinc/oos-eval/raw/master/data/data_full.json"


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _label_ids(train_labels: Sequence[str], test_labels: Sequence[str], source: str) -> tuple[list[str], np.ndarray,
                                                                                           np.ndarray]:
    names = sorted(set(train_labels))
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(test_labels) - set(names))
    if unseen:
        raise DataError(f"{source}: test labels not in the training data: {', '.join(unseen[:5])}")
    return (names, np.array([index[n] for n in train_labels], dtype=np.int64),
            np.array([index[n] for n in test_labels], dtype=np.int64))


def _text_dataset(name: str, train: tuple[list[str], list[str]], test: tuple[list[str], list[str]],
                  source: str) -> Dataset:
    if not train[0]:
        raise DataError(f"{source}: no training samples")
    if not test[0]:
        raise DataError(f"{source}: no test samples")
    names, y_train, y_test = _label_ids(train[1], test[1], source)
    return Dataset(name=name, train=Split(train[0], y_train), test=Split(test[0], y_test),
                   class_names=names, modality="text")


def _read_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in (text_column, label_column) if c not in fields]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(fields) or 'none'})")
            texts, labels = [], []
            for line, row in enumerate(reader, start=2):
                text, label = row.get(text_column), row.get(label_column)
                if text is None or label is None or not label.strip():
                    raise DataError(f"{path}:{line}: missing {text_column!r} or {label_column!r} value")
                texts.append(text)
                labels.append(label.strip())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return texts, labels


@DATASETS.register("banking77")
def load_banking77(root: str | Path, *, seed: int, download: bool = False) -> Dataset:
    """Banking77 (Casanueva et al., 2020): ``root/train.csv`` and ``root/test.csv``, columns ``text,category``."""
    del seed
    root = Path(root)
    files = [root / "train.csv", root / "test.csv"]
    if not all(f.is_file() for f in files):
        hint = " (this loader never downloads)" if download else ""
        raise DataError(f"banking77 not found in {root}: download train.csv and test.csv from {BANKING77_URL} "
                        f"into {root} (data.root){hint}")
    return _text_dataset("banking77", _read_csv(files[0], "text", "category"),
                         _read_csv(files[1], "text", "category"), "banking77")


def _clinc_pairs(data: dict[str, Any], key: str, path: Path) -> tuple[list[str], list[str]]:
    rows = data.get(key)
    if not isinstance(rows, list):
        raise DataError(f"{path}: no list {key!r} of [text, intent] pairs (not the data_full.json layout)")
    texts, labels = [], []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
            raise DataError(f"{path}: {key}[{i}] is not a [text, intent] pair of strings")
        texts.append(row[0])
        labels.append(row[1])
    return texts, labels


@DATASETS.register("clinc150")
def load_clinc150(root: str | Path, *, seed: int, download: bool = False, use_val: bool = False) -> Dataset:
    """CLINC150 (Larson et al., 2019): ``root/data_full.json`` (or ``root`` itself as the file).

    Args:
        use_val: Add the ``val`` list to the training data (default: ignored, like the ``oos_*`` lists).
    """
    del seed
    root = Path(root)
    path = root if root.suffix == ".json" else root / "data_full.json"
    if not path.is_file():
        hint = " (this loader never downloads)" if download else ""
        raise DataError(f"clinc150 not found: download data_full.json from {CLINC150_URL} to {path}{hint}")
    data = safeio.read_json(path, error=DataError)  # regular file, UTF-8, size and depth limits
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with train/val/test lists")
    train = _clinc_pairs(data, "train", path)
    if use_val:
        val = _clinc_pairs(data, "val", path)
        train = (train[0] + val[0], train[1] + val[1])
    return _text_dataset("clinc150", train, _clinc_pairs(data, "test", path), "clinc150")


@DATASETS.register("text-csv")
def load_text_csv(root: str | Path, *, seed: int, download: bool = False, text_column: str = "text",
                  label_column: str = "label", test_fraction: float = 0.2) -> Dataset:
    """Any CSV text classification data.

    ``root`` is a folder holding ``train.csv`` and ``test.csv``, or a single ``.csv`` file, split per
    class into train and test with ``numpy_rng(seed, "text-csv-split")`` (``test_fraction`` of each class
    goes to the test split).
    """
    del download
    root = Path(root)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"text-csv: test_fraction must be in (0, 1), got {test_fraction}")
    if root.is_file():
        texts, labels = _read_csv(root, text_column, label_column)
        y = np.array(labels, dtype=object)
        train_idx, test_idx = stratified_split(np.unique(y, return_inverse=True)[1], test_fraction,
                                                numpy_rng(seed, "text-csv-split"))
        train = ([texts[i] for i in train_idx], [labels[i] for i in train_idx])
        test = ([texts[i] for i in test_idx], [labels[i] for i in test_idx])
    elif (root / "train.csv").is_file() and (root / "test.csv").is_file():
        train = _read_csv(root / "train.csv", text_column, label_column)
        test = _read_csv(root / "test.csv", text_column, label_column)
    else:
        raise DataError(f"text-csv: {root} is neither a .csv file nor a folder with train.csv and test.csv "
                        "(set data.root)")
    return _text_dataset("text-csv", train, test, f"text-csv {root}")
