"""Processes the Flower engines start, and stopping every one of them (Linux ``/proc``).

A Flower run starts process trees fedtalora does not control: Ray's GCS server, raylet, dashboard and
runtime-env agents and ``ClientAppActor`` workers (``flower-sim``); a SuperLink's SuperExec and
``flwr-serverapp``, SuperNodes and their executors (``flower``). Some outlive their parent: Ray's
runtime-env agent ignores SIGTERM once idle (ray-project/ray#59162) and its actors are re-parented to
init when the raylet goes. Ending "the process tree" after the fact therefore misses processes; here:

* :class:`ProcessRecorder` notes every process that appears below this one while it is active (a
  background thread scanning ``/proc``), with its start time, so a pid reused later is never confused
  with it; :meth:`~ProcessRecorder.stop_all` sends SIGTERM to those still alive, then SIGKILL;
* :func:`interrupt_on_signals` turns SIGTERM and SIGINT into :class:`KeyboardInterrupt` in the main
  thread (so ``finally`` blocks run: a plain SIGTERM ends Python without them) and sets an event that
  other threads poll (the ServerApp thread's message loop);
* :func:`descendants`, :func:`kill_tree` for trees whose root pids are known.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the command name), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it does not exist."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None = None) -> bool:
    """``pid`` runs (not a zombie) and, if ``started`` is given, is the process that started then."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def cmdline(pid: int) -> str:
    """The process's command line (arguments joined by spaces; Ray workers show their actor class
    there, e.g. ``ray::ClientAppActor``), "" if it does not exist."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None:
            out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` and every process below them (children that detached into their own sessions included)."""
    tree = _children()
    seen: list[int] = []
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(tree.get(pid, []))
    return seen


def terminate(procs: dict[int, int | None], grace: float = 5.0) -> list[int]:
    """SIGTERM every ``pid -> start time`` still alive, SIGKILL what is left after ``grace`` seconds;
    returns the pids that had to be killed."""
    def living() -> list[int]:
        return [p for p, t in procs.items() if alive(p, t)]

    for pid in living():
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while living() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = living()
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5.0
    while living() and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def kill_tree(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids`` and all their descendants (also those that appear meanwhile), then SIGKILL what is
    left after ``grace`` seconds."""
    procs: dict[int, int | None] = {}
    for _ in range(3):  # a dying parent may start children: collect again
        procs.update({p: start_time(p) for p in descendants(pids) if p not in procs})
        terminate(procs, grace)
        if not any(alive(p) for p in descendants(pids)):
            break


class ProcessRecorder:
    """Records every process that appears below this process (or below ``roots``) while active.

    Use as a context manager around the code that starts them; :meth:`stop_all` ends the recorded ones
    still running (started-time checked), also those re-parented to init since."""

    def __init__(self, interval: float = 0.25, roots: Iterable[int] | None = None) -> None:
        self.interval = interval
        self.roots = list(roots) if roots is not None else [os.getpid()]
        self.procs: dict[int, int | None] = {}
        """pid -> start time of every process recorded."""
        self._before: set[tuple[int, int | None]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def scan(self) -> None:
        """Record the processes below the roots now (also called by the background thread)."""
        me = os.getpid()
        with self._lock:
            for pid in descendants(self.roots):
                if pid == me or pid in self.roots or pid in self.procs:
                    continue
                started = start_time(pid)
                if started is not None and (pid, started) not in self._before:
                    self.procs[pid] = started

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()

    def start(self) -> ProcessRecorder:
        self._before = {(p, start_time(p)) for p in descendants(self.roots)}
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fedtalora-process-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop recording (after a last scan)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.scan()

    def alive(self) -> list[int]:
        """Recorded processes still running."""
        return [p for p, t in self.procs.items() if alive(p, t)]

    def stop_all(self, grace: float = 5.0) -> list[int]:
        """End the recorded processes still running (SIGTERM, SIGKILL after ``grace`` s); returns the killed."""
        self.scan()
        return terminate(dict(self.procs), grace)

    def kill_matching(self, text: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the recorded processes still running whose command line contains ``text``;
        returns their pids."""
        with self._lock:
            procs = dict(self.procs)
        hit = [p for p, t in procs.items() if alive(p, t) and text in cmdline(p)]
        for pid in hit:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return hit

    def __enter__(self) -> ProcessRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def interrupt_on_signals(stop: threading.Event | None = None,
                         signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), *,
                         defer: bool = False,
                         on_signal: Callable[[int], None] | None = None) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT set ``stop`` and raise :class:`KeyboardInterrupt` in the main
    thread (once; later signals only set ``stop``). Yields the list of signals received. Outside the main
    thread it only yields (Python delivers signals to the main thread only).

    ``on_signal(signum)`` is called first, on every signal. With ``defer=True`` the first signal does not
    raise: the block is expected to notice ``stop`` and wind down by itself (its threads end, which a
    :class:`KeyboardInterrupt` in the middle of code that joins them may prevent); the
    :class:`KeyboardInterrupt` is raised when the block ends, unless it raised already. A second signal
    raises at once (the user insists)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        if stop is not None:
            stop.set()
        if on_signal is not None:
            on_signal(signum)
        if len(received) == (2 if defer else 1):
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if defer and received:
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name}")
