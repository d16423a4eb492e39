"""Folder datasets on small generated copies in their real on-disk layouts.

Every image of class ``c`` is filled with a colour that encodes ``c`` (see :func:`colour`), so a test
can check that each stored image carries the label of the folder it came from.
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedtalora.data import DATASETS, load_dataset
from fedtalora.data import images as image_data
from fedtalora.errors import ConfigError, DataError


def colour(c: int) -> tuple[int, int, int]:
    """A colour far from the others for up to 8 classes (JPEG keeps it within a few levels)."""
    return (40 + 200 * (c & 1), 40 + 200 * ((c >> 1) & 1), 40 + 200 * ((c >> 2) & 1))


def save(path: Path, c: int, size: tuple[int, int] = (64, 64), mode: str = "RGB", mark: int = -1) -> None:
    """An image of class ``c``; ``mark >= 0`` adds a thin black bar whose height position tells drawings apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour(c))
    if mark >= 0:
        top = (mark * 9) % (size[1] - 4)
        img.paste((0, 0, 0), (0, top, size[0] // 4, top + 3))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def assert_labels_match_colours(images: torch.Tensor, labels: np.ndarray) -> None:
    means = images.float().mean(dim=(2, 3)).numpy()  # (N, 3)
    want = np.array([colour(int(c)) for c in labels], dtype=np.float64)
    assert np.abs(means - want).max() < 12, "an image carries another class's colour"


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def test_folder_datasets_are_registered() -> None:
    for name in ("tiny-imagenet", "imagenet-r", "imagefolder", "omniglot", "cifar100", "digits"):
        assert name in DATASETS


# --------------------------------------------------------------------------------------------------
# decode_images


def test_decode_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # 30x10: red | green | red thirds. Fit to 10x10 keeps the green middle third only.
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))
    img.save(tmp_path / "wide.png")
    out = image_data.decode_images([tmp_path / "wide.png"], 10)
    assert out.shape == (1, 3, 10, 10) and out.dtype == torch.uint8
    centre = out[0, :, 2:8, 2:8].float()
    assert centre[1].min() > 240 and centre[0].max() < 15


def test_decode_grayscale_and_bytes_sources(tmp_path: Path) -> None:
    Image.new("L", (7, 7), 200).save(tmp_path / "g.png")
    raw = (tmp_path / "g.png").read_bytes()
    out = image_data.decode_images([tmp_path / "g.png", raw], 7, workers=2)
    assert out.shape == (2, 3, 7, 7)
    assert torch.equal(out[0], out[1]) and int(out.min()) == 200 == int(out.max())


def test_decode_threads_give_the_same_tensor(tmp_path: Path) -> None:
    paths = []
    for i in range(80):  # above the serial threshold
        save(tmp_path / f"{i:03d}.png", i % 8, size=(9 + i % 5, 11))
        paths.append(tmp_path / f"{i:03d}.png")
    assert torch.equal(image_data.decode_images(paths, 8, workers=1), image_data.decode_images(paths, 8, workers=3))


def test_decode_unreadable_file_is_one_line_data_error(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg") as info:
        image_data.decode_images([tmp_path / "broken.jpg"], 8)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# tiny-imagenet

TINY_WNIDS = ["n02124075", "n01443537", "n04067472"]  # wnids.txt order is not sorted


def make_tiny_imagenet(root: Path, n_train: int = 4, n_val: int = 2, order_seed: int = 0) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(TINY_WNIDS)))
    label = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}
    for w in shuffled(TINY_WNIDS, order_seed):
        for i in shuffled(list(range(n_train)), order_seed):
            save(base / "train" / w / "images" / f"{w}_{i}.JPEG", label[w])
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for j in range(n_val * len(TINY_WNIDS)):
        w = TINY_WNIDS[j % len(TINY_WNIDS)]
        save(base / "val" / "images" / f"val_{j}.JPEG", label[w])
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(shuffled(lines, order_seed)) + "\n")
    save(base / "test" / "images" / "test_0.JPEG", 0)  # unlabelled: never read
    return root


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "a")
    ds = load_dataset("tiny-imagenet", root, seed=0)
    assert ds.name == "tiny-imagenet" and ds.num_classes == 3
    assert ds.class_names == sorted(TINY_WNIDS)
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert ds.train.inputs.shape == (12, 3, 64, 64) and ds.train.inputs.dtype == torch.uint8
    assert np.bincount(ds.train.labels).tolist() == [4, 4, 4]
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    assert_labels_match_colours(ds.train.inputs, ds.train.labels)
    assert_labels_match_colours(ds.test.inputs, ds.test.labels)


def test_tiny_imagenet_root_may_be_the_dataset_folder_and_size_is_an_option(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path)
    ds = load_dataset("tiny-imagenet", root / "tiny-imagenet-200", seed=0, size=16, workers=1)
    assert ds.train.inputs.shape == (12, 3, 16, 16)
    assert_labels_match_colours(ds.test.inputs, ds.test.labels)


def test_tiny_imagenet_mapping_is_stable_across_copies_and_runs(tmp_path: Path) -> None:
    a = load_dataset("tiny-imagenet", make_tiny_imagenet(tmp_path / "a", order_seed=1), seed=0)
    b = load_dataset("tiny-imagenet", make_tiny_imagenet(tmp_path / "b", order_seed=2), seed=5)
    c = load_dataset("tiny-imagenet", tmp_path / "a", seed=0)
    for other in (b, c):
        assert other.class_names == a.class_names
        assert np.array_equal(other.train.labels, a.train.labels)
        assert np.array_equal(other.test.labels, a.test.labels)
        assert torch.equal(other.train.inputs, a.train.inputs)


def test_tiny_imagenet_missing_names_url_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("tiny-imagenet", tmp_path / "nothing", seed=0)
    msg = str(info.value)
    assert "\n" not in msg
    assert image_data.TINY_IMAGENET_URL in msg and str(tmp_path / "nothing") in msg


def test_tiny_imagenet_unknown_val_class_and_missing_val_image(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path)
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_99.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n00000000"):
        load_dataset("tiny-imagenet", root, seed=0)
    ann.write_text(good + f"val_99.JPEG\t{TINY_WNIDS[0]}\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_99.JPEG"):
        load_dataset("tiny-imagenet", root, seed=0)


def test_tiny_imagenet_download_from_a_local_archive(tmp_path: Path, monkeypatch) -> None:
    src = make_tiny_imagenet(tmp_path / "src")
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((src / "tiny-imagenet-200").rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    monkeypatch.setattr(image_data, "TINY_IMAGENET_URL", archive.as_uri())
    ds = load_dataset("tiny-imagenet", tmp_path / "dest", seed=0, download=True)
    assert ds.num_classes == 3 and len(ds.train) == 12
    assert (tmp_path / "dest" / "tiny-imagenet-200" / "wnids.txt").is_file()


# --------------------------------------------------------------------------------------------------
# imagenet-r

R_WNIDS = ["n01443537", "n01833805", "n02007558"]


def make_imagenet_r(root: Path, per_class: int = 10, order_seed: int = 0) -> Path:
    for c, w in enumerate(R_WNIDS):
        for i in shuffled(list(range(per_class)), order_seed + c):
            kind = ["art", "cartoon", "sketch"][i % 3]
            save(root / "imagenet-r" / w / f"{kind}_{i}.jpg", c, size=(40 + 7 * i, 30 + 3 * c))
    (root / "imagenet-r" / "README.txt").write_text("not a class")
    return root


def test_imagenet_r_layout_and_seeded_split(tmp_path: Path) -> None:
    root = make_imagenet_r(tmp_path)
    ds = load_dataset("imagenet-r", root, seed=0, size=16)
    assert ds.class_names == R_WNIDS and ds.num_classes == 3
    assert len(ds.train) == 24 and len(ds.test) == 6  # 80/20 within each class
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    assert ds.train.inputs.shape == (24, 3, 16, 16)
    assert_labels_match_colours(ds.train.inputs, ds.train.labels)
    assert_labels_match_colours(ds.test.inputs, ds.test.labels)
    again = load_dataset("imagenet-r", root / "imagenet-r", seed=0, size=16)
    assert torch.equal(again.test.inputs, ds.test.inputs) and np.array_equal(again.train.labels, ds.train.labels)
    # Which files form the test split: same seed, same files; another seed, other files.
    tests = {}
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        load_dataset("imagenet-r", root, seed=seed, size=8, split_file=str(tmp_path / f"{name}.json"))
        tests[name] = json.loads((tmp_path / f"{name}.json").read_text())["test"]
    assert tests["a"] == tests["b"] and tests["a"] != tests["c"]
    quarter = load_dataset("imagenet-r", root, seed=0, size=16, test_fraction=0.3)
    assert len(quarter.test) == 9


def test_imagenet_r_split_does_not_depend_on_listing_order(tmp_path: Path) -> None:
    a = load_dataset("imagenet-r", make_imagenet_r(tmp_path / "a", order_seed=3), seed=7, size=8)
    b = load_dataset("imagenet-r", make_imagenet_r(tmp_path / "b", order_seed=9), seed=7, size=8)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.inputs, b.test.inputs)
    assert np.array_equal(a.train.labels, b.train.labels)


def test_imagenet_r_split_file_is_written_then_read(tmp_path: Path) -> None:
    root = make_imagenet_r(tmp_path)
    split = tmp_path / "splits" / "imagenet-r-seed3.json"
    first = load_dataset("imagenet-r", root, seed=3, size=8, split_file=str(split))
    doc = json.loads(split.read_text())
    assert doc["seed"] == 3 and len(doc["train"]) == 24 and len(doc["test"]) == 6
    assert not set(doc["train"]) & set(doc["test"])
    # Read back: the seed no longer matters, the file decides.
    second = load_dataset("imagenet-r", root, seed=99, size=8, split_file=str(split))
    assert torch.equal(first.test.inputs, second.test.inputs)
    assert np.array_equal(first.test.labels, second.test.labels)
    # A split file that names files which are gone is a one-line error.
    doc["test"][0] = "n01443537/gone.jpg"
    split.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="gone.jpg"):
        load_dataset("imagenet-r", root, seed=3, size=8, split_file=str(split))


def test_imagenet_r_missing_names_url(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("imagenet-r", tmp_path, seed=0)
    assert image_data.IMAGENET_R_URL in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# imagefolder


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "ant", "bee"), test_dir: str = "test") -> Path:
    for c, name in enumerate(sorted(classes)):
        for i in range(3):
            save(root / "train" / name / f"{i}.png", c, size=(12, 12))
        save(root / "train" / name / "nested" / "deep.png", c, size=(12, 12))
        save(root / test_dir / name / "t.jpg", c, size=(12, 20))
    return root


def test_imagefolder_layout(tmp_path: Path) -> None:
    ds = load_dataset("imagefolder", make_imagefolder(tmp_path), seed=0, size=12)
    assert ds.class_names == ["ant", "bee", "cat"]
    assert len(ds.train) == 12 and len(ds.test) == 3
    assert np.bincount(ds.train.labels).tolist() == [4, 4, 4]
    assert ds.test.labels.tolist() == [0, 1, 2]
    assert_labels_match_colours(ds.train.inputs, ds.train.labels)
    assert_labels_match_colours(ds.test.inputs, ds.test.labels)


def test_imagefolder_accepts_val_and_checks_classes(tmp_path: Path) -> None:
    ds = load_dataset("imagefolder", make_imagefolder(tmp_path / "v", test_dir="val"), seed=0, size=8)
    assert len(ds.test) == 3
    root = make_imagefolder(tmp_path / "x")
    save(root / "test" / "dog" / "0.png", 3)
    with pytest.raises(DataError, match="dog"):
        load_dataset("imagefolder", root, seed=0, size=8)
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset("imagefolder", tmp_path / "empty", seed=0)


def test_unknown_loader_option_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sise"):
        load_dataset("imagefolder", make_imagefolder(tmp_path), seed=0, sise=8)


def test_bad_size_option_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="size"):
        load_dataset("imagefolder", make_imagefolder(tmp_path), seed=0, size=0)


# --------------------------------------------------------------------------------------------------
# omniglot

# (part, alphabet, characters): Greek appears in both parts with the same drawings, as in the real zips.
OMNI = [
    ("images_background_small1", "Balinese", 3),
    ("images_background_small1", "Greek", 2),
    ("images_background_small2", "Greek", 2),
    ("images_background_small2", "Tagalog", 2),
]
OMNI_CLASSES = ["Balinese/character01", "Balinese/character02", "Balinese/character03",
                "Greek/character01", "Greek/character02", "Tagalog/character01", "Tagalog/character02"]


def make_omniglot(root: Path, drawings: int = 8, zipped: bool = True) -> Path:
    staging = root / "staging" if zipped else root
    for part, alphabet, n in OMNI:
        for k in range(1, n + 1):
            c = OMNI_CLASSES.index(f"{alphabet}/character{k:02d}")
            for d in range(1, drawings + 1):
                save(staging / part / alphabet / f"character{k:02d}" / f"{c:04d}_{d:02d}.png", c,
                     size=(105, 105), mode="1" if c == 0 else "RGB", mark=d)
    if zipped:
        for part in {p for p, _, _ in OMNI}:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
                for p in sorted((staging / part).rglob("*")):
                    zf.write(p, p.relative_to(staging).as_posix())
    return root


def test_omniglot_from_zips_dedupes_shared_alphabets(tmp_path: Path) -> None:
    ds = load_dataset("omniglot", make_omniglot(tmp_path / "z"), seed=0, size=20)
    assert ds.class_names == OMNI_CLASSES and ds.num_classes == 7
    assert len(ds.train) == 7 * 6 and len(ds.test) == 7 * 2  # 8 drawings: 2 to test at 0.25
    assert np.bincount(ds.test.labels).tolist() == [2] * 7
    assert ds.train.inputs.shape == (42, 3, 20, 20)
    ok = ds.train.labels != 0  # class 0 was saved as 1-bit: black or white, not its colour
    assert_labels_match_colours(ds.train.inputs[torch.from_numpy(ok)], ds.train.labels[ok])


def test_omniglot_folders_equal_zips_and_split_follows_seed(tmp_path: Path) -> None:
    zipped = load_dataset("omniglot", make_omniglot(tmp_path / "z"), seed=4, size=12)
    folders = load_dataset("omniglot", make_omniglot(tmp_path / "f", zipped=False), seed=4, size=12)
    assert folders.class_names == zipped.class_names
    assert torch.equal(folders.train.inputs, zipped.train.inputs)
    assert np.array_equal(folders.test.labels, zipped.test.labels)
    other = load_dataset("omniglot", tmp_path / "z", seed=5, size=12)
    assert np.array_equal(other.test.labels, zipped.test.labels)
    assert not torch.equal(other.test.inputs, zipped.test.inputs)  # another seed, other drawings in test


def test_omniglot_one_part_and_missing_part(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path)
    one = load_dataset("omniglot", root, seed=0, size=8, parts=["images_background_small2"])
    assert one.class_names == OMNI_CLASSES[3:]
    (root / "images_background_small1.zip").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("omniglot", root, seed=0)
    msg = str(info.value)
    assert "images_background_small1" in msg and "github.com/brendenlake/omniglot" in msg and "\n" not in msg


def test_omniglot_real_copy_when_present() -> None:
    """The real background-small zips (only where the project's shared data folder exists)."""
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot-small"
    if not (real / "images_background_small1.zip").is_file():
        pytest.skip("no shared omniglot-small copy on this machine")
    ds = load_dataset("omniglot", real, seed=0, size=28)
    assert ds.num_classes == 242
    assert len(ds.train) == 242 * 15 and len(ds.test) == 242 * 5


def test_omniglot_download_from_a_local_mirror(tmp_path: Path, monkeypatch) -> None:
    mirror = make_omniglot(tmp_path / "mirror")
    monkeypatch.setattr(image_data, "OMNIGLOT_URL", (mirror.as_uri() + "/{part}.zip"))
    ds = load_dataset("omniglot", tmp_path / "dest", seed=0, size=8, download=True)
    assert ds.num_classes == 7 and (tmp_path / "dest" / "images_background_small2.zip").is_file()
    with pytest.raises(DataError, match="could not be downloaded") as info:
        load_dataset("omniglot", tmp_path / "dest2", seed=0, download=True, parts=["images_evaluation"])
    assert "\n" not in str(info.value)
