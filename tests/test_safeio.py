"""The guarded reader and the atomic write (:mod:`fedtalora.safeio`): properties over seeded random
documents, and one hand-computed example each."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedtalora import safeio
from fedtalora.errors import ConfigError, FedTaLoRAError, OutputError, clip, one_line

# --- random documents -------------------------------------------------------------------------------


def _random_value(rng: np.random.Generator, depth: int, pool: list[Any]) -> Any:
    """A random JSON/YAML-able value; containers sometimes reuse an earlier one (YAML writes an alias)."""
    kind = rng.integers(0, 6 if depth > 0 else 3)
    if kind == 0:
        return int(rng.integers(-1000, 1000))
    if kind == 1:
        return float(rng.normal())
    if kind == 2:
        return "".join(rng.choice(list("abcxyz _-:[]{}#&*!é"), size=int(rng.integers(0, 8))))
    if kind == 3 and pool:
        return pool[int(rng.integers(0, len(pool)))]  # shared: an anchor and an alias in YAML
    if kind in (3, 4):
        value: Any = [_random_value(rng, depth - 1, pool) for _ in range(int(rng.integers(0, 4)))]
    else:
        value = {f"k{i}": _random_value(rng, depth - 1, pool) for i in range(int(rng.integers(0, 4)))}
    pool.append(value)
    return value


def _expanded_nodes(value: Any) -> int:
    """Nodes of ``value`` with shared parts counted every time they occur (mapping keys count)."""
    if isinstance(value, dict):
        return 1 + sum(1 + _expanded_nodes(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_expanded_nodes(v) for v in value)
    return 1


@pytest.mark.parametrize("seed", range(40))
def test_yaml_shape_counts_the_expanded_document(seed: int) -> None:
    """Property: the node count and depth from the event stream equal those of the built object, aliases
    expanded; and parse_yaml returns what yaml.safe_load returns."""
    rng = np.random.default_rng(seed)
    doc = {"root": _random_value(rng, 5, [])}
    text = yaml.safe_dump(doc, sort_keys=False)
    nodes, depth = safeio.yaml_shape(text)
    assert nodes == _expanded_nodes(doc)
    assert depth == safeio.nesting_depth(doc)
    assert safeio.parse_yaml(text, "doc.yaml") == yaml.safe_load(text)


def test_yaml_shape_hand_example() -> None:
    # a: &x [1, 2]        -> a(1) + list(1) + 1 + 2            = 4
    # b: [*x, *x]         -> b(1) + list(1) + 2 * 3 (expanded)  = 8      + the root mapping: 1
    assert safeio.yaml_shape("a: &x [1, 2]\nb: [*x, *x]\n") == (13, 3)
    assert safeio.yaml_shape("") == (0, 0)
    assert safeio.yaml_shape("7") == (1, 0)


@pytest.mark.parametrize("levels", [3, 6, 9])
def test_an_alias_bomb_is_refused_before_anything_is_built(levels: int) -> None:
    """Each level aliases the previous one ten times: 10^levels nodes from a few hundred bytes. 10^3 is
    fine; 10^6 and 10^9 are refused in milliseconds (the 10^9 one would take minutes and gigabytes)."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    text = "\n".join(lines) + "\n"
    t0 = time.perf_counter()
    if levels == 3:
        assert len(safeio.parse_yaml(text, "ok.yaml")["l2"]) == 10
        return
    with pytest.raises(ConfigError, match="bomb.yaml expands to more than 10,000 nodes") as info:
        safeio.parse_yaml(text, "bomb.yaml", error=ConfigError)
    assert time.perf_counter() - t0 < 1.0
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("text", ["&a [*a]", "a: &a {b: *a}", "&a [1, [2, *a]]"])
def test_a_self_referencing_alias_is_refused(text: str) -> None:
    with pytest.raises(FedTaLoRAError, match="refers to a node containing it"):
        safeio.parse_yaml(text, "x.yaml")


@pytest.mark.parametrize(("depth", "ok"), [(64, True), (65, False), (3000, False)])
def test_yaml_depth_limit(depth: int, ok: bool) -> None:
    flow = "[" * depth + "]" * depth
    block = "".join(" " * (2 * i) + "a:\n" for i in range(depth)) + " " * (2 * depth) + "1\n"
    for text in (flow, block) if depth < 200 else (flow,):
        if ok:
            assert safeio.nesting_depth(safeio.parse_yaml(text, "d.yaml")) == depth
        else:
            with pytest.raises(FedTaLoRAError, match=r"d\.yaml (is nested too deeply|is not valid YAML.*nesting depth)"):
                safeio.parse_yaml(text, "d.yaml")


@pytest.mark.parametrize(("text", "words"), [
    ("a: [1, 2\n", ["(line 2)", "','"]),
    ("a: 1\n---\nb: 2\n", ["single document"]),
    ("!!python/object/apply:os.system ['true']", ["constructor", "python/object"]),
    ("a: *nope", ["undefined alias"]),
    ("a: " + "1" * 5000, ["4300 digits"]),
    ("a: 2020-13-45", ["not valid YAML"]),
])
def test_yaml_errors_are_one_short_line(text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        safeio.parse_yaml(text, "bad.yaml", error=ConfigError)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400 and msg.startswith("bad.yaml ")
    for w in words:
        assert w in msg


@pytest.mark.parametrize("seed", range(20))
def test_json_depth_limit_property(seed: int) -> None:
    """Property: a JSON document parses iff its nesting is within the limit, never a RecursionError."""
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 3000))
    opener = rng.choice(["[", '{"a":'], size=depth)
    closer = ["]" if o == "[" else "}" for o in opener[::-1]]
    text = "".join(opener) + "1" + "".join(closer)
    limit = int(rng.integers(1, 100))
    if depth <= limit:
        assert safeio.nesting_depth(safeio.parse_json(text, "x.json", max_depth=limit)) == depth
    else:
        with pytest.raises(FedTaLoRAError, match="x.json is nested too deeply"):
            safeio.parse_json(text, "x.json", max_depth=limit)


def test_json_hand_examples() -> None:
    assert safeio.parse_json('{"a": [1, {"b": NaN}]}', "m.json")["a"][0] == 1
    with pytest.raises(FedTaLoRAError, match="not allowed"):
        safeio.parse_json('{"a": NaN}', "m.json", allow_nan=False)
    with pytest.raises(FedTaLoRAError, match=r"m.json is not valid JSON \(Expecting .* line 1 column 2\)"):
        safeio.parse_json("{not json", "m.json")
    with pytest.raises(FedTaLoRAError, match="4300 digits"):
        safeio.parse_json("1" * 5000, "m.json")
    with pytest.raises(FedTaLoRAError, match=r"not UTF-8 text \(byte 0xff at offset 2\)"):
        safeio.parse_json(b'{"\xff": 1}', "m.json")


def test_nesting_depth_hand_examples() -> None:
    assert safeio.nesting_depth(3) == 0
    assert safeio.nesting_depth([]) == 1
    assert safeio.nesting_depth({"a": [1, {"b": []}]}) == 4
    assert safeio.nesting_depth([[[[]]]], limit=2) == 3  # stops early: limit + 1
    x: list[Any] = []
    x.append(x)
    assert safeio.nesting_depth(x, limit=10) == 11
    with pytest.raises(ValueError, match="contains itself"):
        safeio.nesting_depth(x)


# --- values in messages -----------------------------------------------------------------------------


def _shared_giant() -> list[Any]:
    x: list[Any] = [0]
    for _ in range(9):
        x = [x] * 10  # 10^9 leaves, all shared: a full repr would never finish
    return x


@pytest.mark.parametrize("value", [
    "x" * 100_000, list(range(1_000_000)), {str(i): i for i in range(100_000)}, 10**4000 // 7,
    _shared_giant(), b"\x00" * 10**6, {"a": {"b": {"c": {"d": {"e": 1}}}}},
])
def test_short_is_bounded_and_fast(value: Any) -> None:
    t0 = time.perf_counter()
    text = safeio.short(value)
    assert time.perf_counter() - t0 < 0.5
    assert len(text) <= safeio.SHORT and "\n" not in text


def test_short_and_clip_hand_examples() -> None:
    assert safeio.short([1, 2, 3]) == "[1, 2, 3]"
    assert safeio.short("a\nb") == "'a\\nb'"
    assert safeio.short("x" * 300, limit=10) == "'xxxxxx..."
    assert clip("abcdefghij" * 10, 40) == "abcdefghijabcde... (85 more characters)"
    assert clip("short", 40) == "short"
    assert one_line("a\n  b\tc") == "a b c"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert safeio.short(Broken()).startswith("<Broken")


# --- reading files ----------------------------------------------------------------------------------


def test_read_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def read() -> None:
        try:
            safeio.read_text(fifo, error=ConfigError)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert isinstance(done[0], ConfigError) and "not a regular file" in str(done[0])


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.txt does not exist"):
        safeio.read_text(tmp_path / "nope.txt", error=ConfigError)
    with pytest.raises(FedTaLoRAError, match="is a directory"):
        safeio.read_text(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * 101)
    with pytest.raises(FedTaLoRAError, match=r"too large \(101 bytes; at most 100"):
        safeio.read_text(big, max_bytes=100)
    assert safeio.read_text(big, max_bytes=101) == "a" * 101
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("fed: {num_clients: 3}  # café\n".encode("latin-1"))
    with pytest.raises(FedTaLoRAError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at offset 28\)"):
        safeio.read_yaml(latin)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffa: 1\n".encode())
    assert safeio.read_yaml(bom) == {"a": 1}
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        with pytest.raises(FedTaLoRAError, match="cannot read .*Permission denied"):
            safeio.read_text(locked)
    assert not safeio.exists("x" * 5000) and not safeio.is_file("x" * 5000) and not safeio.is_file("a\0b")
    assert safeio.is_file(big) and not safeio.is_file(tmp_path)


# --- the atomic write -------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    safeio.atomic_write_text(path, "old")
    safeio.atomic_write_text(path, json.dumps({"a": 1}))
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # like open(), not mkstemp's 0600


def test_atomic_write_failures_are_one_line_and_leave_no_temp(tmp_path: Path) -> None:
    (tmp_path / "partitions.json").mkdir()
    with pytest.raises(OutputError, match="cannot write .*partitions.json: Is a directory"):
        safeio.atomic_write_text(tmp_path / "partitions.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partitions.json"]
    with pytest.raises(OutputError, match="cannot write .*no/such/dir/x.json: No such file"):
        safeio.atomic_write_bytes(tmp_path / "no" / "such" / "dir" / "x.json", b"{}")
    with pytest.raises(ConfigError):
        safeio.atomic_write_bytes(tmp_path / "partitions.json", b"{}", error=ConfigError)


def test_concurrent_writers_never_share_a_temp_file(tmp_path: Path) -> None:
    """Two writers of one path (the cause of the "shared config.yaml.tmp" traceback): every write
    succeeds and the file ends as one writer's complete text."""
    path = tmp_path / "config.yaml"
    texts = [f"seed: {i}\n" + "x" * 100_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(20):
                safeio.atomic_write_text(path, text, fsync=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    names = {safeio.temp_name(path).name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("config.yaml.") and n.endswith(".tmp") for n in names)
    assert len(safeio.temp_name(tmp_path / ("n" * 255)).name) <= 255
