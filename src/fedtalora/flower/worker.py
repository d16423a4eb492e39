"""A warm ClientApp executor: one long-lived process runs every ClientApp task of a SuperNode.

Flower 1.42 runs the ClientApp of every message in a fresh ``flwr-clientapp`` process: a SuperNode in
its default ``--isolation subprocess`` mode starts ``flower-superexec``, which starts one
``flwr-clientapp`` per task, and that process exits after one reply. Each pays Python's start, the
imports (torch, timm, peft, flwr) and fedtalora's data and model build: 7-18 s per client per round on
the development machine, whatever the model size. (Flower's own "warm executors" are single-use
pre-started Kubernetes pods; none serves more than one task.)

With ``flower-supernode --isolation process`` the SuperNode starts no executor: any process that can
reach its Runtime API claims its pending tasks (``AcquireTask``), pulls each task's message, context and
FAB with the task's token, runs the ClientApp and pushes the reply and the updated context -- what
``flwr-clientapp`` does once. :class:`WarmExecutor` does it in a loop, in its own process, so the
imported modules and what :func:`fedtalora.flower.client_app.build_client_side` cached (the decoded or
tokenised data, the built model) survive across messages, rounds and runs. The node's state (its base
weights and their version) still lives in the Flower ``Context``, so a restarted executor loses nothing
but the cache.

Only the apps in ``allowed_apps`` run (default: fedtalora's ``ClientApp``): a long-lived process must not
execute whatever component a FAB names, and every app shares the process's modules.

Use :mod:`fedtalora.flower.node` (a SuperNode and this executor in one command); standalone::

    flower-supernode --isolation process --port 9094 ...     # its Runtime API on 127.0.0.1:9094
    python -m fedtalora.flower.worker --runtime-api-address 127.0.0.1:9094

This relies on Flower 1.42's Runtime API functions (``flwr.supernode.runtime.run_clientapp``), the
ones ``flwr-clientapp`` itself calls; ``fedtalora[flower]`` pins that version.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_APP = "fedtalora.flower.client_app:app"


def clientapp_ref(fab_content: bytes) -> str:
    """The ``[tool.flwr.app.components] clientapp`` reference of a FAB (its zipped ``pyproject.toml``)."""
    from flwr.common.config import get_fab_config

    try:
        return str(get_fab_config(fab_content)["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"the FAB names no ClientApp ({e})") from None


def load_clientapp(ref: str) -> Any:
    """Import ``module:attribute`` (modules stay imported: that is the point of a warm executor)."""
    from flwr.clientapp import ClientApp

    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    if not isinstance(obj, ClientApp):
        raise TypeError(f"{ref} is not a flwr ClientApp")
    return obj


def pull_task_input(client: Any, *, backoff: float = 0.02, backoff_cap: float = 0.2) -> tuple[Any, Any, Any, Any]:
    """The claimed task's ``(message, context, run, fab)`` from the Runtime API, as ``flwr-clientapp`` pulls
    them, but with a short retry for the message's objects.

    A SuperNode creates the task as soon as the message's header arrives and only then fetches its
    objects (arrays) from the SuperLink; ``flwr-clientapp`` starts seconds later and rarely notices, a
    warm executor claims the task at once. Flower's default retry for an object not there yet starts at
    1 s and doubles (up to 10 s), which made a warm task wait 1-7 s; this one starts at 20 ms and stays
    below 0.2 s."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id  # Message() needs the task's identity (as in flwr-clientapp)
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's Runtime API returned no message for the task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=backoff_cap)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def error_reason(ex: BaseException) -> str:
    """The reason text ``flwr-clientapp`` puts in an error reply (``<class 'X'>:<'message'>``)."""
    return f"{type(ex)}:<'{ex}'>"


class WarmExecutor:
    """Claims and runs the ClientApp tasks of one SuperNode (or several), in this process, until stopped.

    Serving several SuperNodes of one machine (a simulation of many clients, a host with many data
    partitions), one process holds the modules, the data and the model once for all of them, as a Ray
    actor of ``flower-sim`` does; their tasks run one at a time. Each node's own state stays in its
    Context.

    Args:
        runtime_api_address: the SuperNode's Runtime API (``--host``/``--port`` of ``flower-supernode``),
            or a list of them.
        insecure: plain HTTP to the Runtime API (the SuperNode's default); else TLS verified against
            ``root_certificates`` (a PEM path).
        allowed_apps: ClientApp references this executor runs; a task of another app is answered with an
            error reply.
        poll: seconds between ``AcquireTask`` calls while idle.
    """

    def __init__(self, runtime_api_address: str | Sequence[str], *, insecure: bool = True,
                 root_certificates: str | None = None, allowed_apps: Sequence[str] = (DEFAULT_APP,),
                 poll: float = 0.05) -> None:
        self.addresses = [runtime_api_address] if isinstance(runtime_api_address, str) else list(runtime_api_address)
        if not self.addresses:
            raise ValueError("no Runtime API address")
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.allowed_apps = tuple(allowed_apps)
        self.poll = poll
        self.tasks_done = 0
        self.tasks_failed = 0
        self._apps: dict[str, Any] = {}
        self._clients: dict[str, Any] = {}
        self._next = 0

    def _http_client(self, address: str, token: str | None) -> Any:
        """A Runtime API client; with a task token, retrying transient failures for up to a minute.

        (Not Flower's ``make_simple_http_retry_invoker``: on a 401 it sends SIGINT to its own process,
        right for a one-task ``flwr-clientapp``, fatal for an executor that outlives the task.)"""
        import httpx
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import RetryInvoker, exponential
        from flwr.supercore.runtime import RuntimeHttpClient

        def giveup(e: Exception) -> bool:
            return isinstance(e, httpx.HTTPStatusError) and e.response.status_code not in (429, 502, 503, 504)

        retry = RetryInvoker(lambda: exponential(max_delay=5), (httpx.TransportError, httpx.HTTPStatusError),
                             max_tries=None, max_time=60, should_giveup=giveup) if token else None

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=address, insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=interceptors, retry_invoker=retry)

    def preload(self) -> None:
        """Import the allowed apps now (torch & co.), not when the first message arrives."""
        for ref in self.allowed_apps:
            self._app(ref)

    def _app(self, ref: str) -> Any:
        if ref not in self._apps:
            self._apps[ref] = load_clientapp(ref)
        return self._apps[ref]

    def acquire(self) -> tuple[str, str] | None:
        """Claim a pending ClientApp task of the next node that has one (round robin): ``(address, token)``,
        or None when no node has one. Raises ``httpx.TransportError`` if a node does not answer."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        n = len(self.addresses)
        for i in range(n):
            address = self.addresses[(self._next + i) % n]
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = self._http_client(address, None)
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception:
                client.close()
                del self._clients[address]
                raise
            if res.HasField("task") and res.token:
                self._next = (self._next + i + 1) % n
                return address, str(res.token)
        return None

    def run_task(self, token: str, address: str | None = None) -> bool:
        """Run one claimed task (pull, run the ClientApp, push reply and context); True on success."""
        import httpx
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._http_client(address or self.addresses[0], token)
        lost = threading.Event()

        def heartbeat() -> bool:  # the SuperNode expires a task whose heartbeats stop
            try:
                if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    lost.set()  # the run was stopped or the task expired: the reply would be refused
            except httpx.TransportError:
                return False
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (503, 504):
                    return False
                lost.set()
            return True

        sender = HeartbeatSender(heartbeat)
        message = context = reply = None
        ok, details = False, "ClientApp task failed"
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        try:
            sender.start()
            message, context, run, fab = pull_task_input(client)
            times["pull"] = time.perf_counter() - t0
            ref = clientapp_ref(fab.content)
            if ref not in self.allowed_apps:
                raise PermissionError(f"this warm executor runs only {', '.join(self.allowed_apps)}; the run's FAB "
                                      f"names {ref} (start the SuperNode without --isolation process for other apps)")
            reply = self._app(ref)(message=message, context=context)
            times["app"] = time.perf_counter() - t0
            ok, details = True, ""
        except Exception as ex:  # noqa: BLE001 - as flwr-clientapp: any ClientApp exception is an error reply
            logger.error("ClientApp task failed: %s", ex, exc_info=logger.isEnabledFor(logging.DEBUG))
            details = error_reason(ex)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None and not lost.is_set():
                    push_message(client, reply, context)
                times["reply"] = time.perf_counter() - t0
                # the node's state changes only when its ClientApp succeeded
                push_task_output(client=client, context=context if ok else None,
                                 sub_status=SubStatus.COMPLETED if ok else SubStatus.FAILED, details=details)
            except Exception as ex:  # noqa: BLE001
                logger.error("could not push the task's reply: %s", ex)
                ok = False
            sender.stop()
            client.close()
        self.tasks_done += ok
        self.tasks_failed += not ok
        logger.info("task %s in %.2f s (%s; %d done, %d failed)", "done" if ok else "failed", time.perf_counter() - t0,
                    ", ".join(f"{k} by {v:.2f} s" for k, v in times.items()), self.tasks_done, self.tasks_failed)
        return ok

    def serve(self, stop: threading.Event) -> None:
        """Run tasks until ``stop`` is set (the task in progress finishes first)."""
        import httpx

        while not stop.is_set():
            try:
                claimed = self.acquire()
            except httpx.TransportError as e:  # a SuperNode is starting (or gone: the caller decides)
                logger.debug("Runtime API not reachable: %s", e)
                stop.wait(max(self.poll, 0.2))
                continue
            if claimed is None:
                stop.wait(self.poll)
                continue
            self.run_task(claimed[1], claimed[0])

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT: set ``stop``; a second signal raises :class:`KeyboardInterrupt` (abandons a task)."""

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedtalora.flower.worker",
                                description="A warm ClientApp executor for a SuperNode started with --isolation process")
    p.add_argument("--runtime-api-address", action="append", default=None,
                   help="a SuperNode's Runtime API (repeatable: one executor for several nodes; default "
                        "127.0.0.1:9094)")
    p.add_argument("--root-certificates", default=None,
                   help="CA of the Runtime API's TLS certificate (default: plain HTTP, the SuperNode's default)")
    p.add_argument("--app", action="append", default=None,
                   help=f"ClientApp reference allowed to run (repeatable; default {DEFAULT_APP})")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between task polls while idle")
    p.add_argument("--no-preload", action="store_true", help="import the app on the first task, not at start")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per Runtime API poll
    executor = WarmExecutor(args.runtime_api_address or ["127.0.0.1:9094"], insecure=args.root_certificates is None,
                            root_certificates=args.root_certificates, allowed_apps=args.app or (DEFAULT_APP,),
                            poll=args.poll)
    stop = threading.Event()
    install_stop_handlers(stop)
    if not args.no_preload:
        t0 = time.perf_counter()
        executor.preload()
        logger.info("ClientApp modules loaded in %.2f s; serving %s", time.perf_counter() - t0,
                    ", ".join(executor.addresses))
    try:
        executor.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
