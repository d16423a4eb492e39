"""A fedtalora client node: a Flower SuperNode and a warm ClientApp executor, one command.

::

    python -m fedtalora.flower.node --superlink SERVER:9093 --root-certificates ca.crt \\
        --auth-supernode-private-key client_0 --node-config "partition-id=0 data-root='/data'"

takes ``flower-supernode``'s arguments and

1. starts ``flower-supernode ... --isolation process`` as a child process, its Runtime API on
   ``--host``:``--port`` (default ``127.0.0.1`` and a free port), with a shorter idle poll
   (``--poll``, below);
2. runs a :class:`~fedtalora.flower.worker.WarmExecutor` against that Runtime API in this process:
   the ClientApp's modules, data and model stay loaded between messages (the imports happen at start);
3. on SIGTERM or SIGINT stops both (the SuperNode also dies with this process: ``PR_SET_PDEATHSIG``);
   when the SuperNode exits, so does this process, with its exit status.

**The polls.** A Flower 1.42 SuperNode with nothing to do asks the SuperLink for messages every 3 s,
waits for its ClientApp's reply in 0.5-s steps, and retries an object of a message that the SuperLink
does not have yet after 1 s, doubling (the server pushes a message's header before its arrays); all are
constants of ``flwr.supernode.start_client_internal``. Every round then starts 1-4 s late on every node.
The SuperNode child here runs Flower's own ``flower-supernode`` entry point with those waits capped at
``--poll`` seconds (default 0.2; :func:`patch_supernode_polls`). Each idle node then sends ``1/poll``
small requests per second to the SuperLink: mind it for thousands of nodes (``--poll 3`` is Flower's
idle poll).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_POLL = 0.2
_SUPERNODE_CHILD = "--_supernode-child"


class _CappedSleep:
    """``time`` with ``sleep`` capped at ``cap`` seconds (the SuperNode loop's module global)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_supernode_polls(module: Any, poll: float) -> bool:
    """Cap the waits of Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) at ``poll``
    seconds: its idle poll (3 s), its wait for the ClientApp's reply (0.5 s steps) and the retry of a
    message's objects that the SuperLink does not have yet (1 s, doubling to 10 s: the server is still
    pushing them). Returns False (and changes nothing) if the module does not look as expected."""
    pull = getattr(module, "pull_objects", None)
    if getattr(module, "time", None) is not time or not callable(pull):
        return False
    module.time = _CappedSleep(poll)
    module.pull_objects = functools.partial(pull, initial_backoff=min(0.05, poll), backoff_cap=max(poll, 0.05))
    return True


def run_supernode(poll: float, args: Sequence[str]) -> None:
    """``flower-supernode ARGS`` in this process, idle poll capped at ``poll`` seconds."""
    import flwr
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if not patch_supernode_polls(start_client_internal, poll):  # another Flower layout: run it as it is
        logging.getLogger(__name__).warning("flwr %s: cannot shorten the SuperNode's polls", flwr.__version__)
    try:  # timestamps in the SuperNode's log lines, no colour codes (its output usually goes to a file)
        from flwr.supercore.logger import update_console_handler

        update_console_handler(timestamps=True, colored=False)
    except ImportError:
        pass
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def _die_with_parent() -> None:
    """In a child, before exec: receive SIGTERM when the parent dies (Linux), so no SuperNode outlives us."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supernode_command(supernode_args: Sequence[str], *, host: str, port: int, poll: float) -> list[str]:
    """The child's command line: Flower's SuperNode in process isolation, Runtime API on host:port."""
    return [sys.executable, "-m", "fedtalora.flower.node", _SUPERNODE_CHILD, str(poll), *supernode_args,
            "--isolation", "process", "--host", host, "--port", str(port)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedtalora.flower.node",
        description="A Flower SuperNode (--isolation process) with a warm fedtalora ClientApp executor. Every "
                    "argument not listed here goes to flower-supernode (--superlink, --insecure, "
                    "--root-certificates, --auth-supernode-private-key, --node-config, ...).")
    p.add_argument("--host", default="127.0.0.1", help="the SuperNode's Runtime API host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="the SuperNode's Runtime API port (default: a free one)")
    p.add_argument("--poll", type=float, default=DEFAULT_POLL,
                   help=f"idle poll of the SuperNode and the executor, seconds (default {DEFAULT_POLL}; Flower's: 3)")
    p.add_argument("--app", action="append", default=None, help="ClientApp reference the executor runs (repeatable)")
    p.add_argument("--no-executor", action="store_true",
                   help="run only the SuperNode (needs --port); a shared executor serves it "
                        "(python -m fedtalora.flower.worker --runtime-api-address HOST:PORT ...)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_SUPERNODE_CHILD]:
        run_supernode(float(argv[1]), argv[2:])
        return 0
    args, supernode_args = parser().parse_known_args(argv)
    if "--isolation" in supernode_args:
        raise SystemExit("fedtalora.flower.node sets --isolation process itself")
    if args.no_executor:
        if not args.port:
            raise SystemExit("--no-executor needs --port (the executor must know the Runtime API address)")
        run_supernode(args.poll, [*supernode_args, "--isolation", "process", "--host", args.host,
                                  "--port", str(args.port)])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per Runtime API poll
    from .deployment import free_port
    from .worker import DEFAULT_APP, WarmExecutor

    port = args.port or free_port()
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signalled.append(signum)
        if stop.is_set():
            raise KeyboardInterrupt  # second signal: abandon the task in progress
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(supernode_command(supernode_args, host=args.host, port=port, poll=args.poll),
                             preexec_fn=_die_with_parent)  # noqa: PLW1509 - only prctl, async-signal-safe enough
    status = [0]

    def watch() -> None:
        status[0] = child.wait()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    executor = WarmExecutor(f"{args.host}:{port}", allowed_apps=args.app or (DEFAULT_APP,), poll=min(args.poll, 0.05))
    try:
        t0 = time.perf_counter()
        executor.preload()
        logger.info("ClientApp modules loaded in %.2f s; serving the SuperNode at %s:%d", time.perf_counter() - t0,
                    args.host, port)
        executor.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        executor.close()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if signalled:
        return 0
    return status[0] or 0


if __name__ == "__main__":
    sys.exit(main())
