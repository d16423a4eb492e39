"""Guarded reading of the files a user hands us, short values in messages, and one atomic write.

Every text, JSON or YAML document fedtalora reads back (presets, overrides, run configs, grids,
``metrics.json``, checkpoint JSON, dataset index files) goes through this module, so that hostile or
broken input is one line naming the file, never a hang, a flood or a traceback:

* **only regular files** are opened, and without blocking (a FIFO named ``x.yaml`` is refused at once);
* **size**: a file or text longer than a limit is refused before it is parsed;
* **encoding**: text must be UTF-8 (a byte-order mark is allowed); otherwise one line with the offset;
* **depth**: JSON and YAML nested deeper than :data:`MAX_DEPTH` are refused, without ever reaching
  Python's recursion limit;
* **YAML expansion**: aliases are counted with the size of what they expand to, from the parser's
  event stream, *before* any Python object is built; a document that expands to more than
  :data:`MAX_YAML_NODES` nodes (an alias bomb of a few hundred bytes can expand to 10^9) or that
  refers to itself is refused in milliseconds.

Error messages show values through :func:`short`, a bounded ``repr`` that never builds the full
representation of a huge value first.

This is also the project's one home of atomic writes: :func:`atomic_write_bytes` / :func:`atomic_write_text` are the one way files are replaced: a temporary
file with a unique name in the same folder (so two writers never share it), ``fsync``, ``os.replace``,
and an ``fsync`` of the folder; the temporary file is removed on any failure. A reader sees either
the old content or the new, never a torn file.

This module imports only the standard library, PyYAML and :mod:`fedtalora.errors`.
"""

from __future__ import annotations

import json
import os
import reprlib
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import FedTaLoRAError, OutputError, clip, one_line

__all__ = [
    "MAX_DEPTH",
    "MAX_JSON_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "LimitError",
    "SHORT",
    "atomic_write_bytes",
    "atomic_write_text",
    "clip",
    "decode_utf8",
    "exists",
    "is_file",
    "load_yaml",
    "nesting_depth",
    "one_line",
    "parse_json",
    "parse_yaml",
    "read_bytes",
    "read_json",
    "read_text",
    "read_yaml",
    "short",
    "temp_name",
    "yaml_shape",
]

MAX_TEXT_BYTES = 64 * 2**20
"""Default size limit of a text file (dataset index files such as ``wnids.txt``)."""
MAX_JSON_BYTES = 256 * 2**20
"""Default size limit of a JSON file (``metrics.json`` and ``partitions.json`` of a big run are a few MB)."""
MAX_YAML_BYTES = 2**20
"""Default size limit of a YAML document (a preset or a grid is a few KB)."""
MAX_DEPTH = 64
"""Default nesting limit of JSON and YAML documents (fedtalora's own documents nest at most ~6 deep)."""
MAX_YAML_NODES = 10_000
"""Default limit on the nodes a YAML document expands to, aliases expanded (a run config has ~150)."""
SHORT = 200
"""Default length of a value shown in an error message."""

ErrorFactory = Callable[[str], Exception]


# --------------------------------------------------------------------------------------------------
# Values in messages
# --------------------------------------------------------------------------------------------------


def _repr_limits() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel = 3
    r.maxdict = r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 6
    r.maxstring = 120
    r.maxlong = 60
    r.maxother = 120
    return r


_REPR = _repr_limits()


def short(value: Any, limit: int = SHORT) -> str:
    """A ``repr`` of ``value`` for an error message: at most ``limit`` characters, on one line.

    Containers show their first few items and nesting is cut at a few levels (``reprlib``), so the cost
    does not depend on the size of ``value``: a list of 10^9 shared elements is shown as quickly as a
    short one. Self-referencing containers are shown with ``...``.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a foreign object whose __repr__ fails: show its type
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _label(path: str | os.PathLike[str], what: str | None) -> str:
    return what if what is not None else str(path)


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` exists; False for any name the OS refuses (too long, NUL, ...), never raising."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def is_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file (symlinks followed); False for anything else, never raising."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bytes(path: str | os.PathLike[str], *, what: str | None = None, max_bytes: int = MAX_TEXT_BYTES,
               error: ErrorFactory = FedTaLoRAError) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    The file is opened without blocking and checked with ``fstat`` on the open descriptor, so a FIFO,
    socket or device under an innocent name is refused at once instead of hanging the reader.

    Args:
        path: The file.
        what: How to name it in messages (default: the path).
        max_bytes: Refuse a larger file.
        error: Builds the exception raised (e.g. :class:`~fedtalora.errors.ConfigError`).

    Raises:
        The ``error`` exception, one line: missing, not a regular file, unreadable, or too large.
    """
    label = _label(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{label} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{label} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{label} is not a regular file (a FIFO, socket or device); refusing to read it")
        if st.st_size > max_bytes:
            raise error(f"{label} is too large ({st.st_size:,} bytes; at most {max_bytes:,} are read)")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while we read it
                raise error(f"{label} is too large (over {max_bytes:,} bytes)")
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def decode_utf8(data: bytes, source: str, error: ErrorFactory = FedTaLoRAError) -> str:
    """``data`` decoded as UTF-8 (an optional byte-order mark is dropped); one line naming the offset
    of the first invalid byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1].hex()
        raise error(f"{source} is not UTF-8 text (byte 0x{bad} at offset {e.start}); save it as UTF-8") from None


def read_text(path: str | os.PathLike[str], *, what: str | None = None, max_bytes: int = MAX_TEXT_BYTES,
              error: ErrorFactory = FedTaLoRAError) -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_bytes` for the checks)."""
    return decode_utf8(read_bytes(path, what=what, max_bytes=max_bytes, error=error), _label(path, what), error)


def _children(node: Any) -> list[Any]:
    items = node.values() if isinstance(node, dict) else node
    return [c for c in items if isinstance(c, (dict, list, tuple))]


def nesting_depth(value: Any, limit: int | None = None) -> int:
    """Nesting depth of lists, tuples and dicts in ``value`` (a scalar is 0, ``[]`` is 1).

    Iterative (no recursion limit) and linear in the number of *distinct* containers: a shared
    sub-container is measured once, so ``[[x] * 10] * 10 ...`` costs nothing however much it expands.
    With ``limit``, returns ``limit + 1`` for anything deeper (a container that contains itself
    included); without, such a cycle raises ``ValueError``.
    """
    if not isinstance(value, (dict, list, tuple)):
        return 0
    below: dict[int, int] = {}  # id -> depth of that container (itself included)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            on_path.discard(key)
            below[key] = 1 + max((below[id(c)] for c in _children(node)), default=0)
            if limit is not None and below[key] > limit:
                return limit + 1
            continue
        if key in below:
            continue
        if key in on_path:  # a container that contains itself: infinitely deep
            if limit is not None:
                return limit + 1
            raise ValueError("the value contains itself")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))
    return below[id(value)]


def parse_json(text: str | bytes, source: str, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_JSON_BYTES,
               allow_nan: bool = True, error: ErrorFactory = FedTaLoRAError) -> Any:
    """Parse a JSON document with size and depth limits; one-line ``error`` naming ``source`` otherwise.

    Args:
        allow_nan: Accept ``NaN`` and ``Infinity`` (Python's json writes them for non-finite floats).
    """
    if isinstance(text, bytes):
        text = decode_utf8(text, source, error)
    if len(text) > max_bytes:
        raise error(f"{source} is too large ({len(text):,} characters; at most {max_bytes:,})")

    def constant(name: str) -> float:
        if not allow_nan:
            raise ValueError(f"{name} is not allowed here")
        return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}[name])

    try:
        data = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise error(f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{source} is nested too deeply (more than {max_depth} levels)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{source} is not valid JSON ({one_line(e, SHORT)})") from None
    if nesting_depth(data, max_depth) > max_depth:
        raise error(f"{source} is nested too deeply (more than {max_depth} levels)")
    return data


def read_json(path: str | os.PathLike[str], *, what: str | None = None, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_DEPTH, allow_nan: bool = True, error: ErrorFactory = FedTaLoRAError) -> Any:
    """The JSON document in the regular file ``path``, with the checks of :func:`read_bytes` and
    :func:`parse_json`."""
    data = read_bytes(path, what=what, max_bytes=max_bytes, error=error)
    return parse_json(data, _label(path, what), max_depth=max_depth, max_bytes=max_bytes, allow_nan=allow_nan,
                      error=error)


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader


class LimitError(ValueError):
    """A document exceeds a limit of this module (depth, expanded size) or refers to itself."""


def yaml_shape(text: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES) -> tuple[int, int]:
    """``(nodes, depth)`` of the YAML text with every alias expanded, from the parser's events alone.

    No Python object is built, and the work is linear in the length of ``text``: each anchor remembers
    the expanded size and depth of its node, and an alias adds them (memoisation). Counting stops as
    soon as a limit is exceeded.

    Raises:
        LimitError: the expansion exceeds ``max_nodes`` or ``max_depth`` (the message says which),
            or an alias refers to a node that contains it (infinite expansion).
        yaml.YAMLError: the text does not parse.
    """
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, depth of its node)
    frames: list[list[Any]] = []  # open collections, outermost first: [anchor, nodes so far, deepest child]
    open_anchors: set[str] = set()
    total = deepest_all = 0

    def add(nodes: int, depth: int) -> None:
        """A finished node (``nodes`` expanded nodes, ``depth`` levels) joins the innermost open collection."""
        nonlocal total, deepest_all
        if frames:
            top = frames[-1]
            top[1] = min(top[1] + nodes, max_nodes + 1)  # capped: no big integers, however deep the bomb
            top[2] = max(top[2], depth)
        else:
            total = min(total + nodes, max_nodes + 1)
        deepest_all = max(deepest_all, len(frames) + depth)
        if deepest_all > max_depth:
            raise LimitError(f"is nested too deeply (more than {max_depth} levels, aliases expanded)")
        if total + sum(f[1] for f in frames) > max_nodes:
            raise LimitError(f"expands to more than {max_nodes:,} nodes (aliases expanded): an alias bomb?")

    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise LimitError(f"has an alias *{event.anchor} that refers to a node containing it (infinite expansion)")
            add(*anchors.get(event.anchor, (1, 0)))  # an undefined alias: the loader reports it
        elif isinstance(event, yaml.ScalarEvent):
            add(1, 0)
            if event.anchor is not None:
                anchors[event.anchor] = (1, 0)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            frames.append([event.anchor, 1, 0])
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            if len(frames) > max_depth:
                raise LimitError(f"is nested too deeply (more than {max_depth} levels)")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, nodes, deepest = frames.pop()
            if anchor is not None:
                open_anchors.discard(anchor)
                anchors[anchor] = (nodes, deepest + 1)
            add(nodes, deepest + 1)
    return total, deepest_all


def load_yaml(text: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load(text)`` after :func:`yaml_shape` has checked the expanded size and depth.

    The low-level form of :func:`parse_yaml`, for callers that treat syntax errors themselves.

    Raises:
        yaml.YAMLError: the text is not valid YAML (syntax, undefined alias, a tag with no safe constructor).
        LimitError: a limit is exceeded (a ``ValueError``).
        ValueError: a value cannot be built (e.g. an integer of over 4300 digits, a date with month 13).
    """
    yaml_shape(text, max_depth=max_depth, max_nodes=max_nodes)
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a safe loader
    except RecursionError:  # pragma: no cover - yaml_shape bounds the depth first
        raise LimitError(f"is nested too deeply (more than {max_depth} levels)") from None


def yaml_error_text(e: yaml.YAMLError) -> str:
    """One line for a PyYAML error: ``(line N): context, problem``."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    why = ", ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)])) or str(e)
    return f"{where}: {one_line(why, SHORT)}"


def parse_yaml(text: str | bytes, source: str, *, max_bytes: int = MAX_YAML_BYTES, max_depth: int = MAX_DEPTH,
               max_nodes: int = MAX_YAML_NODES, error: ErrorFactory = FedTaLoRAError) -> Any:
    """Parse one YAML document safely (``yaml.safe_load`` semantics: no tags that build Python objects).

    The size, then the expanded shape (:func:`yaml_shape`), are checked before any object is built.

    Raises:
        The ``error`` exception, one line naming ``source`` (and the line, for syntax errors).
    """
    if isinstance(text, bytes):
        text = decode_utf8(text, source, error)
    if len(text) > max_bytes:
        raise error(f"{source} is too large ({len(text):,} characters; at most {max_bytes:,})")
    try:
        return load_yaml(text, max_depth=max_depth, max_nodes=max_nodes)
    except yaml.YAMLError as e:
        raise error(f"{source} is not valid YAML{yaml_error_text(e)}") from None
    except LimitError as e:
        raise error(f"{source} {one_line(e, SHORT)}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits, a date with month 13
        raise error(f"{source} is not valid YAML: {one_line(e, SHORT)}") from None


def read_yaml(path: str | os.PathLike[str], *, what: str | None = None, max_bytes: int = MAX_YAML_BYTES,
              max_depth: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES,
              error: ErrorFactory = FedTaLoRAError) -> Any:
    """The YAML document in the regular file ``path`` (checks of :func:`read_bytes` and :func:`parse_yaml`)."""
    data = read_bytes(path, what=what, max_bytes=max_bytes, error=error)
    return parse_yaml(data, _label(path, what), max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes,
                      error=error)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``NAME.<pid>.<random>.tmp`` (the name part cut so that
    the result stays a valid file name)."""
    return path.with_name(f"{path.name[:180]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True,
                       error: ErrorFactory = OutputError) -> None:
    """Replace ``path`` by ``data`` atomically: a reader sees the old content or all of ``data``.

    The data go to a temporary file of a unique name in the same folder (two writers never share one),
    which is ``fsync``'ed and renamed over ``path``; then the folder is ``fsync``'ed. On any failure the
    temporary file is removed and ``path`` is untouched.

    Raises:
        The ``error`` exception (default :class:`~fedtalora.errors.OutputError`), one line naming
        ``path``: its folder is missing or unwritable, ``path`` is a directory, the disk is full, ...
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise error(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(f"cannot write {path}: {e.strerror or e}") from None
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True,
                      error: ErrorFactory = OutputError) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync, error=error)
