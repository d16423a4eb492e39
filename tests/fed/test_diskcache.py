"""Cached frozen activations across runs (``train.feature_cache=disk``, ``fed/diskcache.py``): a second run reads
what the first computed and writes the same metrics; the key follows weights, data and preprocessing; damaged or
hostile files are ignored; the folder stays under its size limit."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtalora.api import prepare, run
from fedtalora.config import resolve
from fedtalora.errors import ConfigError
from fedtalora.fed.diskcache import FORMAT, DiskFeatures, fingerprint, hash_inputs
from fedtalora.fed.history import without_timing


def _run(overrides: list[str]) -> tuple[dict[str, Any], Any]:
    setup = prepare(resolve("tiny-vit", overrides))
    return run(setup).metrics, setup


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


@pytest.mark.parametrize("extra", [
    ["method=head-only"],
    ["method=fedtalora", "lora.blocks=[1]", "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}"],
])
def test_a_second_run_reads_every_activation_from_disk_and_writes_the_same_metrics(extra, tiny_overrides,
                                                                                    tmp_path) -> None:
    # Prepare: an uncached reference run
    base = [*tiny_overrides, *extra]
    plain, _ = _run(base)
    disk = [*base, "train.feature_cache=disk", f"train.feature_cache_dir={tmp_path / 'feats'}"]

    # Execute: two runs with the disk cache
    first, s1 = _run(disk)
    second, s2 = _run(disk)

    # Assert: both equal the uncached run bit for bit; the first computes everything once and writes one file per
    # split, the second computes nothing
    exp = s1.exp
    assert without_timing(first) == without_timing(plain) == without_timing(second)
    assert s1.cache.stats["computed"] == 2 * len(exp.dataset.train) + len(exp.dataset.test)
    assert s1.cache.stats["loaded"] == 0 and len(_files(tmp_path / "feats")) == 2
    assert s2.cache.stats["computed"] == 0
    assert s2.cache.stats["loaded"] == s1.cache.stats["computed"]  # test: one variant (no flips) read back
    assert s2.cache.disk.stats["hits"] == 2 and s2.cache.disk.stats["writes"] == 0


def test_a_text_run_at_a_block_reads_its_activations_back(tiny_bert, write_banking, text_overrides, tmp_path) -> None:
    base = [*text_overrides(tiny_bert, write_banking(tmp_path / "banking")), "lora.blocks=[1]",
            "train.feature_cache=disk", f"train.feature_cache_dir={tmp_path / 'feats'}"]
    first, s1 = _run(base)
    second, s2 = _run(base)
    assert without_timing(first) == without_timing(second)
    assert s1.cache.point == 1 and s1.cache.stats["computed"] > 0
    assert s2.cache.stats["computed"] == 0 and s2.cache.stats["loaded"] == s1.cache.stats["computed"]


def test_the_key_follows_weights_data_and_preprocessing(make_tiny_model) -> None:
    model = make_tiny_model()
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)

    def key(**kw: Any) -> str | None:
        args: dict[str, Any] = dict(frozen=list(model.backbone.named_parameters()), backbone=model.backbone, point=None,
                                    variants=2, transform="T", inputs=x, device=torch.device("cpu"),
                                    precision="fp32", fused_attention=True)
        args.update(kw)
        return fingerprint(**args)

    k0 = key()
    assert k0 is not None and len(k0) == 64 and key() == k0  # deterministic
    others = [key(inputs=x + 1), key(transform="U"), key(point=1), key(variants=1), key(precision="bf16"),
              key(fused_attention=False), key(device=torch.device("meta"))]
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1e-3)
    others.append(key(frozen=list(model.backbone.named_parameters())))
    assert k0 not in others and len(set(others)) == len(others)
    assert key(inputs={"not": "hashable"}) is None


def test_hash_inputs_sees_every_byte_of_token_batches() -> None:
    from fedtalora.data.transforms import Tokens

    def digest(t: Any) -> str:
        h = hashlib.sha256()
        assert hash_inputs(h, t)
        return h.hexdigest()

    ids = torch.tensor([[5, 6, 0], [7, 0, 0]], dtype=torch.int32)
    a = Tokens(ids, (ids > 0).to(torch.int8), torch.tensor([2, 1]))
    b = Tokens(ids.clone(), (ids > 0).to(torch.int8), torch.tensor([2, 1]))
    b.input_ids[1, 0] = 8
    assert digest(a) != digest(b)
    assert digest(["ab", "c"]) != digest(["a", "bc"])  # lengths are hashed, not just the concatenation


def _write(folder: Path, key: str, obj: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = folder / f"{key}.pt"
    path.write_bytes(buf.getvalue())
    return path


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled-object", "other-key", "bad-shape", "nan",
                                    "digest", "fifo"])
def test_a_damaged_or_hostile_file_is_ignored(damage, tmp_path, caplog) -> None:
    # Prepare: a valid file for key K, then damaged
    disk = DiskFeatures(tmp_path, 2**30)
    key = "a" * 64
    values, have = torch.randn(1, 3, 4), torch.tensor([[True, True, False]])
    assert disk.save(key, values, have)
    assert disk.load(key, (1, 3), None) is not None  # the intact file loads
    path = disk.path(key)
    raw = path.read_bytes()
    good = torch.load(io.BytesIO(raw), weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "pickled-object":
        _write(tmp_path, key, {**good, "values": _Evil()})
    elif damage == "other-key":
        _write(tmp_path, key, {**good, "key": "b" * 64})
    elif damage == "bad-shape":
        _write(tmp_path, key, {**good, "have": torch.tensor([[True, True]])})
    elif damage == "nan":
        bad = values.clone()
        bad[0, 0, 0] = float("nan")
        from fedtalora.fed.diskcache import _digest
        _write(tmp_path, key, {**good, "values": bad, "digest": _digest(bad, have)})
    elif damage == "digest":
        _write(tmp_path, key, {**good, "values": values + 1})
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtalora.fed.diskcache"):
        got = disk.load(key, (1, 3), None)

    # Assert: ignored with one warning naming the file; nothing ran
    assert got is None and disk.stats["rejected"] == 1
    assert path.name in caplog.text
    assert good["format"] == FORMAT


def test_the_folder_stays_under_its_limit_least_recently_used_first(tmp_path) -> None:
    disk = DiskFeatures(tmp_path, 2**30)
    keys = [c * 64 for c in "abc"]
    for i, k in enumerate(keys):
        disk.save(k, torch.zeros(1, 256, 64), torch.ones(1, 256, dtype=torch.bool))
        os.utime(disk.path(k), (1000 + i, 1000 + i))
    size = disk.path(keys[0]).stat().st_size
    (tmp_path / "notes.txt").write_text("not a cache file")
    disk.load(keys[0], (1, 256), None)  # a read makes "a" the most recently used

    # Execute: room for two files; a fourth is written
    small = DiskFeatures(tmp_path, 2 * size + size // 2)
    small.save("d" * 64, torch.zeros(1, 256, 64), torch.ones(1, 256, dtype=torch.bool))

    # Assert: the two least recently used ("b", "c") are gone; "a", "d" and the foreign file stay
    assert {p.name[0] for p in _files(tmp_path)} == {"a", "d"}
    assert (tmp_path / "notes.txt").exists() and small.stats["evicted"] == 2


def test_a_file_over_the_limit_is_not_written(tmp_path, caplog) -> None:
    disk = DiskFeatures(tmp_path, 1000)
    with caplog.at_level(logging.WARNING):
        assert not disk.save("e" * 64, torch.zeros(1, 100, 64), torch.ones(1, 100, dtype=torch.bool))
    assert not _files(tmp_path) and "feature_cache_disk_mb" in caplog.text


def test_config_of_the_disk_cache(tiny_overrides) -> None:
    cfg = resolve("tiny-vit", [*tiny_overrides, "train.feature_cache=disk", "train.feature_cache_disk_mb=10"])
    assert cfg.train.feature_cache == "disk" and cfg.train.feature_cache_disk_mb == 10
    with pytest.raises(ConfigError, match="feature_cache_disk_mb"):
        resolve("tiny-vit", [*tiny_overrides, "train.feature_cache_disk_mb=0"])
