"""Tests of fedtalora.data: the digits and CIFAR-100 loaders and the batch image transform."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fedtalora.data import (
    DATASETS,
    Dataset,
    ImageTransform,
    Split,
    load_cifar100,
    load_dataset,
    per_class_subset,
    subset_dataset,
)
from fedtalora.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", "/nonexistent", seed=0)


def test_registry_lists_datasets() -> None:
    assert {"digits", "cifar100"} <= set(DATASETS.names())


def test_unknown_dataset_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("no-such-dataset", ".", seed=0)


def test_digits_sizes_and_stratification(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.modality == "image"
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(len(digits.test) / 1797 - 0.25) < 0.01
    all_labels = np.concatenate([digits.train.labels, digits.test.labels])
    for cls in range(10):
        n_cls = int((all_labels == cls).sum())
        n_test = int((digits.test.labels == cls).sum())
        assert n_test > 0 and (digits.train.labels == cls).sum() > 0
        assert abs(n_test - n_cls / 4) <= 1


def test_digits_dtype_shape_values(digits: Dataset) -> None:
    for split in (digits.train, digits.test):
        assert split.inputs.dtype == torch.uint8
        assert split.inputs.shape == (len(split), 3, 8, 8)
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (len(split),)
        assert torch.equal(split.inputs[:, 0], split.inputs[:, 1])
        assert torch.equal(split.inputs[:, 0], split.inputs[:, 2])
    assert int(digits.train.inputs.max()) == 255
    assert int(digits.train.inputs.min()) == 0


def test_digits_match_sklearn_scaling(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images
    expected = {np.rint(raw[i] * 255 / 16).astype(np.uint8).tobytes() for i in range(len(raw))}
    got = {img[0].numpy().tobytes() for img in digits.test.inputs}
    assert got <= expected


def test_digits_split_is_seeded(digits: Dataset) -> None:
    again = load_dataset("digits", "/nonexistent", seed=0)
    assert np.array_equal(again.train.labels, digits.train.labels)
    assert np.array_equal(again.test.labels, digits.test.labels)
    assert torch.equal(again.test.inputs, digits.test.inputs)

    other = load_dataset("digits", "/nonexistent", seed=1)
    assert len(other.test) == len(digits.test)
    assert not torch.equal(other.test.inputs, digits.test.inputs)


def test_split_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        Split(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), np.zeros(2, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# CIFAR-100 on a tiny fixture in the real format
# --------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _make_batch(rng: np.random.Generator, n: int, name: str) -> dict[str, object]:
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "fine_labels": [int(v) for v in rng.integers(0, 100, size=n)],
        "coarse_labels": [int(v) for v in rng.integers(0, 20, size=n)],
        "filenames": [f"{name}_{i}.png" for i in range(n)],
        "batch_label": f"{name} batch",
    }


@pytest.fixture()
def cifar_fixture(
    tmp_path: Path,
) -> tuple[Path, dict[str, dict[str, object]], type[torchvision.datasets.CIFAR100]]:
    root = tmp_path / "data"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    batches = {"train": _make_batch(rng, 7, "training"), "test": _make_batch(rng, 4, "testing")}
    for name, batch in batches.items():
        _write_pickle(folder / name, batch)
    meta = {
        "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    }
    _write_pickle(folder / "meta", meta)

    class TinyCIFAR100(torchvision.datasets.CIFAR100):
        train_list = [["train", _md5(folder / "train")]]
        test_list = [["test", _md5(folder / "test")]]
        meta = {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")}

    return root, batches, TinyCIFAR100


def test_cifar100_fixture_loads(cifar_fixture) -> None:
    root, batches, cls = cifar_fixture
    ds = load_dataset("cifar100", root, seed=0, dataset_cls=cls)
    assert ds.name == "cifar100"
    assert ds.num_classes == 100
    assert ds.class_names[:2] == ["fine_00", "fine_01"] and ds.class_names[-1] == "fine_99"
    assert len(ds.train) == 7 and len(ds.test) == 4
    for split, batch in ((ds.train, batches["train"]), (ds.test, batches["test"])):
        assert split.inputs.dtype == torch.uint8
        assert split.inputs.shape == (len(split), 3, 32, 32)
        assert split.labels.dtype == np.int64
        assert split.labels.tolist() == batch["fine_labels"]
        data = batch["data"]
        assert isinstance(data, np.ndarray)
        # CHW row order: byte c*1024 + y*32 + x of row i is pixel (c, y, x) of image i.
        for i, c, y, x in ((0, 0, 0, 0), (1, 1, 5, 17), (2, 2, 31, 3), (3, 0, 12, 31)):
            assert int(split.inputs[i, c, y, x]) == int(data[i, c * 1024 + y * 32 + x])
        assert np.array_equal(split.inputs.reshape(len(split), -1).numpy(), data)


def test_cifar100_loader_accepts_str_root(cifar_fixture) -> None:
    root, _, cls = cifar_fixture
    ds = load_cifar100(str(root), seed=3, dataset_cls=cls)
    assert len(ds.train) == 7


def test_cifar100_missing_is_one_line_data_error(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", root, seed=0)
    message = str(info.value)
    assert "cifar-100-python.tar.gz" in message
    assert str(root) in message
    assert "\n" not in message
    assert "not found" in message


def test_cifar100_corrupted_is_data_error(cifar_fixture) -> None:
    root, _, cls = cifar_fixture
    (root / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", root, seed=0, dataset_cls=cls)
    message = str(info.value)
    assert "corrupted" in message and "cifar-100-python.tar.gz" in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------------
# ImageTransform
# --------------------------------------------------------------------------------------------------

MEAN = (0.5, 0.25, 0.125)
STD = (0.5, 0.25, 0.5)


def _images(n: int = 16, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("in_size,out_size", [(8, 8), (8, 24), (32, 16)])
def test_transform_shape_dtype(in_size: int, out_size: int) -> None:
    tf = ImageTransform(out_size, MEAN, STD)
    out = tf(_images(4, in_size), train=False)
    assert out.dtype == torch.float32
    assert out.shape == (4, 3, out_size, out_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("out_size", [8, 20, 4])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "area"])
def test_transform_normalises_constant_image(out_size: int, interpolation: str) -> None:
    value = 51  # 0.2 after scaling
    images = torch.full((2, 3, 8, 8), value, dtype=torch.uint8)
    out = ImageTransform(out_size, MEAN, STD, interpolation)(images, train=False)
    for c in range(3):
        expected = (value / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], expected), atol=1e-5)


def test_transform_without_resize_is_exact() -> None:
    images = _images(3, 8)
    out = ImageTransform(8, MEAN, STD)(images, train=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-6)


def test_transform_flip_is_deterministic_given_generator() -> None:
    tf = ImageTransform(8, MEAN, STD)
    images = _images(32)
    a = tf(images, train=True, generator=torch.Generator().manual_seed(7))
    b = tf(images, train=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_transform_no_flip_at_eval() -> None:
    tf = ImageTransform(8, MEAN, STD)
    images = _images(32)
    plain = tf(images, train=False)
    again = tf(images, train=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain, again)


def test_transform_flips_some_images_in_training() -> None:
    tf = ImageTransform(8, MEAN, STD)
    images = _images(64)
    plain = tf(images, train=False)
    out = tf(images, train=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], plain[i].flip(-1)) for i in range(len(images))]
    kept = [torch.equal(out[i], plain[i]) for i in range(len(images))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 8 < sum(flipped) < 56
    assert sum(kept) > 8
    other = tf(images, train=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_transform_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        ImageTransform(8, MEAN, STD)(torch.zeros(1, 3, 8, 8), train=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transform_on_cuda_matches_cpu() -> None:
    tf = ImageTransform(16, MEAN, STD)
    images = _images(8)
    cpu = tf(images, train=True, generator=torch.Generator().manual_seed(3))
    gpu = tf(images.cuda(), train=True, generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Per-class subsets (data.train_per_class / data.test_per_class)


def test_per_class_subset_hand_example() -> None:
    """Classes 0 (4 samples), 1 (1 sample), 2 (3 samples); at most 2 each -> 2 + 1 + 2, sorted."""
    labels = np.array([0, 2, 0, 1, 2, 0, 2, 0])
    idx = per_class_subset(labels, 2, np.random.default_rng(0))
    assert list(idx) == sorted(idx)
    assert np.bincount(labels[idx]).tolist() == [2, 1, 2]
    assert set(idx) <= set(range(len(labels)))
    assert list(per_class_subset(labels, 0, np.random.default_rng(0))) == list(range(8))
    assert list(per_class_subset(labels, 10, np.random.default_rng(0))) == list(range(8))


@pytest.mark.parametrize("seed", range(3))
def test_per_class_subset_is_seeded_and_uniform_within_a_class(seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 5, size=200)
    a = per_class_subset(labels, 7, np.random.default_rng(seed))
    b = per_class_subset(labels, 7, np.random.default_rng(seed))
    c = per_class_subset(labels, 7, np.random.default_rng(seed + 10))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a], minlength=5).tolist() == [min(7, int((labels == k).sum())) for k in range(5)]


def test_subset_dataset_keeps_inputs_with_their_labels(digits: Dataset) -> None:
    text = Dataset("t", Split([f"s{i}" for i in range(12)], np.arange(12) % 3),
                   Split([f"q{i}" for i in range(6)], np.arange(6) % 3), ["a", "b", "c"], modality="text")
    sub = subset_dataset(text, seed=0, train_per_class=2)
    assert len(sub.train) == 6 and sub.test is text.test
    assert all(int(s[1:]) % 3 == y for s, y in zip(sub.train.inputs, sub.train.labels, strict=True))
    img = subset_dataset(digits, seed=1, train_per_class=5, test_per_class=3)
    assert np.bincount(img.train.labels).tolist() == [5] * 10 and np.bincount(img.test.labels).tolist() == [3] * 10
    pos = [int(np.flatnonzero((digits.train.inputs == x).flatten(1).all(1))[0]) for x in img.train.inputs[:4]]
    assert [int(digits.train.labels[p]) for p in pos] == img.train.labels[:4].tolist()
    again = subset_dataset(digits, seed=1, train_per_class=5, test_per_class=3)
    assert torch.equal(again.train.inputs, img.train.inputs)
    assert subset_dataset(digits, seed=1) is digits


def test_experiment_uses_the_subset_and_bad_values_are_refused(tmp_path: Path) -> None:
    from fedtalora.app.cli import main
    from fedtalora.config import resolve
    from fedtalora.fed.build import Experiment

    cfg = resolve("tiny-vit", ["data.train_per_class=6", "data.test_per_class=2", "partition.kind=iid"])
    exp = Experiment.build(cfg)
    assert len(exp.dataset.train) == 60 and len(exp.dataset.test) == 20
    assert sum(len(ix) for parts in exp.partitions for ix in parts) == 60
    with pytest.raises(ConfigError, match="data.train_per_class"):
        resolve("tiny-vit", ["data.train_per_class=-1"])
    assert main(["run", "tiny-vit", "data.test_per_class=-3", f"output.dir={tmp_path}"]) == 2
