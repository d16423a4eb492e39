"""The server side of the Flower engines: the loop's :class:`~fedtalora.fed.transport.Transport` over a Flower Grid.

The fedtalora ServerApp runs :func:`fedtalora.fed.loop.run_loop` -- the same task x round loop as
``engine=inprocess`` -- with a :class:`GridTransport`. Where the in-process transport calls
:func:`~fedtalora.fed.transport.client_round` directly, this one sends each sampled client a ``train``
message and waits for the replies; screening, aggregation (the method hooks and the pure ResWU
functions of :mod:`fedtalora.core.aggregation`), evaluation, metrics and checkpoints stay in the loop.

It also keeps what the wire needs: which node holds which partition (``query.hello`` at the start),
the base version each client has, the factors of the recent residual rounds (the live clients' own factors
and weights, :class:`~fedtalora.core.aggregation.ResidualFactors`: enough to catch any client up bit for bit;
older rounds are dropped once the dense accumulator ``D`` of the exact base is smaller), and the bytes of every message
and reply as Flower serialises them (``wire_*`` fields of each round in ``metrics.json``).

A client that fails (an exception, an injected crash, no reply within ``flower.round_timeout``)
returns no update: the round aggregates the others, the failure is logged and listed in the round's
``client_errors`` and counted in ``metrics.json`` (``reliability.dropped_clients``, ``client_errors``).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..core.aggregation import ResidualFactors
from ..core.comm import dense_catch_up_nbytes
from ..errors import FedTaLoRAError
from ..fed.client import ClientResult
from ..fed.transport import ClientOutcome, RoundJob, Transport
from ..methods import TaskData
from . import protocol as P

if TYPE_CHECKING:
    from ..core.aggregation import Aggregate
    from ..fed.build import Setup
    from ..fed.history import History

logger = logging.getLogger(__name__)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_error(reason: str, limit: int = 300) -> str:
    """The gist of a Flower error reason: the client's exception message without Ray's traceback."""
    text = _ANSI.sub("", str(reason))
    plain = re.fullmatch(r"<class '([^']+)'>:<'(.*)'>", text.strip(), re.S)  # a SuperNode's ClientApp error
    if plain and "Message:" not in text:
        text = f"{plain.group(1).rsplit('.', 1)[-1]}: {plain.group(2)}"
    marker = "Message:"
    if marker in text:
        text = text[text.rindex(marker) + len(marker):]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"^"}]
    text = lines[-1] if lines else text.strip()
    text = text.rstrip("'>").strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GridTransport(Transport):
    """Clients are Flower nodes reached through ``grid`` (simulation or deployment).

    Args:
        grid: the ServerApp's Grid.
        engine: ``flower-sim`` or ``flower`` (recorded in ``metrics.json``).
        partitions: the manifest path the clients are told (they may override it with their node or run
            config); None: the run directory's ``partitions.json``, or a temporary copy without one.
        run_dir: the run directory (its ``partitions.json``).
        stop: an event another thread sets to interrupt the run: the wait for replies (or for nodes at the
            start) raises :class:`KeyboardInterrupt`, so the loop stops after the last completed round's
            checkpoint (``flower-sim`` on SIGTERM/SIGINT).
    """

    def __init__(self, grid: Grid, *, engine: str, partitions: str | Path | None = None,
                 run_dir: Path | None = None, stop: threading.Event | None = None) -> None:
        self.grid = grid
        self.stop = stop
        """Set by another thread to interrupt the run (waiting for replies raises KeyboardInterrupt)."""
        self.name = engine
        self.partitions = str(partitions) if partitions else ""
        self.run_dir = run_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.setup: Setup | None = None
        self.nodes: dict[int, int] = {}
        """Partition id -> node id."""
        self.version = 0
        """Residual rounds applied to the server's base in this session (0: the base as built)."""
        self.history: dict[int, dict[str, ResidualFactors]] = {}
        """Version ``v`` -> per layer the factors of the residual that made ``v`` from ``v - 1``."""
        self.client_version: dict[int, int | None] = {}
        """The base version each client has (None: unknown, it gets the dense base)."""
        self.client_method: dict[int, str | None] = {}
        """The digest of the method state each client holds (``""``: none; None: unknown, it gets it)."""
        self._generation = 0
        """The server's exact base's change counter when :attr:`version` was last updated."""
        self._method: tuple[str, Any, Any] = ("", None, None)
        """The method's client state as records (:func:`~.protocol.method_state_records`), for this exchange."""
        self.dense_nbytes: dict[str, int] = {}
        self._stats = self._zero_stats()

    # --- start ------------------------------------------------------------------------------------

    def open(self, setup: Setup, *, resumed: bool) -> None:
        self.setup = setup
        cfg = setup.cfg
        model = setup.model
        exact = model.exact_base is not None  # a dense catch-up is its float64 accumulator D
        self.dense_nbytes = {p.layer: dense_catch_up_nbytes(model.base_weight(p.layer).shape, exact=exact)
                             for p in model.lora_pairs()}
        self.version = 1 if resumed else 0  # a restored base is not the one the clients build
        self._generation = model.exact_base.generation if exact else 0  # type: ignore[union-attr]
        if not self.partitions:
            if self.run_dir is not None and (self.run_dir / "partitions.json").is_file():
                self.partitions = str((self.run_dir / "partitions.json").resolve())
            else:
                import json

                self._tmp = tempfile.TemporaryDirectory(prefix="fedtalora-flower-")
                path = Path(self._tmp.name) / "partitions.json"
                path.write_text(json.dumps(setup.exp.partitions_json()))
                self.partitions = str(path)
        self._connect(cfg.fed.num_clients, cfg.flower.connect_timeout)
        fingerprint = P.frozen_fingerprint(model, setup.method.trainable_keys(model))
        self._hello(setup, fingerprint)

    def _connect(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt("the run was interrupted while waiting for its clients")
            have = len(list(self.grid.get_node_ids()))
            if have >= n:
                return
            if time.monotonic() > deadline:
                raise FedTaLoRAError(f"only {have} of fed.num_clients={n} Flower nodes connected within "
                                     f"flower.connect_timeout={timeout:g} s (start one SuperNode per client)")
            time.sleep(0.5)

    def _hello(self, setup: Setup, fingerprint: str) -> None:
        cfg = setup.cfg
        n = cfg.fed.num_clients
        content = RecordDict({P.CONFIG: ConfigRecord({"config": cfg.to_yaml(), "partitions": self.partitions})})
        node_ids = sorted(self.grid.get_node_ids())
        msgs = [Message(content, dst_node_id=node, message_type=P.HELLO, group_id="hello") for node in node_ids]
        replies = self._send_and_receive(msgs, cfg.flower.connect_timeout)
        errors, nodes = [], {}
        for reply in replies:
            src = reply.metadata.src_node_id
            if reply.has_error():
                errors.append(f"node {src}: {short_error(reply.error.reason)}")
                continue
            cr = reply.content.config_records[P.CONFIG]
            k = int(cr["partition-id"])
            if k in nodes:
                raise FedTaLoRAError(f"two Flower nodes ({nodes[k]} and {src}) claim partition-id={k}")
            if str(cr["fingerprint"]) != fingerprint:
                raise FedTaLoRAError(f"the client of partition {k} (node {src}) built a model with other frozen "
                                     "weights than the server's (other pretrained weights or library versions?)")
            nodes[k] = src
            version = int(cr["version"])
            self.client_version[k] = version if version == self.version == 0 else None
            self.client_method[k] = str(cr.get("method-digest", ""))
        missing = [k for k in range(n) if k not in nodes]
        if missing:
            why = ("; ".join(errors[:3])) if errors else f"{len(replies)} of {len(node_ids)} nodes answered"
            raise FedTaLoRAError(f"no Flower client for partition(s) {missing[:10]} of fed.num_clients={n}: {why}")
        extra = sorted(set(nodes) - set(range(n)))
        if extra:
            logger.warning("ignoring Flower nodes with partition ids %s (fed.num_clients=%d)", extra, n)
        self.nodes = {k: nodes[k] for k in range(n)}
        logger.info("%s: %d clients ready (partition -> node %s)", self.name, n, self.nodes)

    # --- rounds -----------------------------------------------------------------------------------

    def _setup(self) -> Setup:
        if self.setup is None:
            raise RuntimeError("transport used before open()")
        return self.setup

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {"wire_downlink_bytes": 0, "wire_residual_bytes": 0, "wire_method_bytes": 0, "wire_uplink_bytes": 0,
                "client_errors": []}

    def _catch_up(self, k: int) -> tuple[int, P.ArrayRecord | None]:
        """Client ``k``'s catch-up to the current base: (its assumed version or -1, record or None)."""
        have = self.client_version.get(k)
        if have == self.version:
            return have, None
        model = self._setup().model
        plan: dict[str, Any] = {}
        missed = range((have if have is not None else -1) + 1, self.version + 1)
        known = have is not None and all(v in self.history for v in missed)
        for layer, dense in self.dense_nbytes.items():
            if known:
                items = [(v, self.history[v][layer]) for v in missed]
                if sum(f.nbytes for _, f in items) <= dense:
                    plan[layer] = items
                    continue
            plan[layer] = model.exact_base.acc[layer].detach()  # type: ignore[union-attr]  (residuals: exact base)
        if not known:
            return -1, P.catch_up_record(plan)
        return int(have), P.catch_up_record(plan)  # type: ignore[arg-type]

    def _prepare_exchange(self) -> None:
        """Before messages go out: notice a base change made outside aggregation (a method's task-start
        hook: PILoRA's merge) -- a new version that only the dense base reaches -- and take the method's
        current client state."""
        setup = self._setup()
        exact = setup.model.exact_base
        if exact is not None and exact.generation != self._generation:
            self.version += 1
            self.history.clear()  # no factors lead to this version
            self._generation = exact.generation
        self._method = P.method_state_records(*setup.method.client_state())

    def _message(self, kind: str, k: int, t: int, r: int, global_record: P.ArrayRecord,
                 extra: dict[str, Any] | None = None) -> Message:
        exp = self._setup().exp
        frm, residual = self._catch_up(k)
        method_digest, method_arrays, method_meta = self._method
        cr = ConfigRecord({"task": t, "round": r, "client": k, "indices": P.indices_digest(exp.partitions[t][k]),
                           "base-from": frm, "base-to": self.version, "method-digest": method_digest,
                           **(extra or {})})
        content = RecordDict({P.CONFIG: cr, P.GLOBAL: global_record})
        if residual is not None:
            content[P.RESIDUAL] = residual
            self._stats["wire_residual_bytes"] += P.wire_nbytes(residual)
        if method_digest and self.client_method.get(k) != method_digest:
            content[P.METHOD] = method_arrays
            content[P.METHOD_META] = method_meta
            self._stats["wire_method_bytes"] += P.wire_nbytes(method_arrays) + P.wire_nbytes(method_meta)
        self._stats["wire_downlink_bytes"] += P.wire_nbytes(content)
        return Message(content, dst_node_id=self.nodes[k], message_type=kind, group_id=f"{t}.{r}")

    def _send_and_receive(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """``Grid.send_and_receive`` with a short poll: the deployment Grid's own polls every 3 s, which
        adds up to 3 s to every round; this one polls after 50 ms, doubling up to 0.2 s."""
        t0 = time.perf_counter()
        pending = set(self.grid.push_messages(msgs))
        logger.debug("pushed %d messages in %.3f s", len(msgs), time.perf_counter() - t0)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = 0.05
        while pending:
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt("the run was interrupted while waiting for its clients")
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if got:
                logger.debug("%d replies after %.3f s", len(got), time.perf_counter() - t0)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait)
            wait = min(2 * wait, 0.2)
        return replies

    def _exchange(self, msgs: dict[int, Message]) -> dict[int, Message | str]:
        """Send, wait (``flower.round_timeout``), return per client its reply or why there is none."""
        timeout = self._setup().cfg.flower.round_timeout or None
        replies = self._send_and_receive(list(msgs.values()), timeout)
        by_node = {m.metadata.src_node_id: m for m in replies}
        out: dict[int, Message | str] = {}
        for k in msgs:
            reply = by_node.get(self.nodes[k])
            if reply is None:
                out[k] = f"no reply within flower.round_timeout={timeout:g} s" if timeout else "no reply"
            elif reply.has_error():
                out[k] = f"client error: {short_error(reply.error.reason)}"
            else:
                out[k] = reply
                self._stats["wire_uplink_bytes"] += P.wire_nbytes(reply.content)
                try:
                    self.client_version[k] = int(reply.content.config_records[P.CONFIG]["version"])
                    self.client_method[k] = str(reply.content.config_records[P.CONFIG]["method-digest"])
                except (KeyError, TypeError, ValueError):
                    self.client_version[k] = self.client_method[k] = None
            if not isinstance(out[k], Message):
                self.client_version[k] = None  # it may or may not have applied the catch-up
                self.client_method[k] = None
        return out

    def _fail(self, k: int, t: int, r: int, why: str, injected: bool) -> None:
        self._stats["client_errors"].append({"client": k, "error": why, "injected": injected})
        if not injected:
            logger.error("[task %d | round %d] client %d failed: %s", t + 1, r + 1, k, why)

    def train(self, job: RoundJob) -> Iterator[ClientOutcome]:
        t, r = job.task.index, job.round
        global_record = P.to_record(job.global_state)
        self._prepare_exchange()
        msgs = {}
        for k in job.clients:
            fault = job.faults.get(k)
            crash = bool(fault is not None and fault.dropped)
            msgs[k] = self._message(P.TRAIN, k, t, r, global_record, {"crash": crash})
        replies = self._exchange(msgs)
        for k in job.clients:
            reply = replies[k]
            fault = job.faults.get(k)
            injected = bool(fault is not None and fault.dropped)
            if injected and isinstance(reply, Message):
                reply = "told to crash (faults.client_dropout) but replied; update discarded"
            if not isinstance(reply, Message):
                self._fail(k, t, r, reply, injected)
                yield ClientOutcome(k, None, "injected fault" if injected else reply)
                continue
            try:
                state = P.from_record(reply.content.array_records[P.UPDATE])
                met = reply.content.metric_records[P.METRICS]
                report = json.loads(str(reply.content.config_records[P.CONFIG].get(P.METHOD_REPORT, "{}")))
                if not isinstance(report, dict):
                    raise ValueError("the method report is not a JSON object")
                result = ClientResult(client=k, state=state, num_samples=met["num-samples"],  # type: ignore[arg-type]
                                      loss=float(met["loss"]), steps=int(met["steps"]),  # type: ignore[arg-type]
                                      report=report)
            except (KeyError, TypeError, ValueError) as e:
                why = f"malformed reply: {type(e).__name__}: {e}"
                self._fail(k, t, r, why, False)
                yield ClientOutcome(k, None, why)
                continue
            yield ClientOutcome(k, result)

    def after_round(self, agg: Aggregate | None) -> None:
        if agg is None or not agg.residuals:
            return
        if self._setup().model.exact_base is None or not all(isinstance(f, ResidualFactors)
                                                             for f in agg.factors.values()):
            raise FedTaLoRAError("the Flower engines carry the residual of an exact base only "
                                 "(FedModel.enable_exact_base; fed.build.build_components enables it)")
        self.version += 1
        self.history[self.version] = {
            layer: ResidualFactors(B=f.B.detach().cpu(), A=f.A.detach().cpu(), weights=f.weights.detach().cpu())
            for layer, f in agg.factors.items()}
        self._generation = self._setup().model.exact_base.generation  # type: ignore[union-attr]
        if set(self.history[self.version]) != set(self.dense_nbytes):  # no factors: only the dense base can sync
            self.history.clear()
        self._prune()

    def _prune(self) -> None:
        """Drop the factors no client can use any more: older than the point where, for every layer, the
        factors since are larger than the dense base."""
        total = dict.fromkeys(self.dense_nbytes, 0)
        keep_from = self.version + 1
        for v in sorted(self.history, reverse=True):
            for layer, f in self.history[v].items():
                total[layer] += f.nbytes
            if all(total[layer] > self.dense_nbytes[layer] for layer in total):
                break
            keep_from = v
        for v in [v for v in self.history if v < keep_from]:
            del self.history[v]

    def task_data(self, t: int, clients: list[int]) -> TaskData:
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        setup = self._setup()
        dim = setup.model.spec.num_features

        def features(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            if not cache:  # ask every reporting client at once
                global_record = P.to_record(setup.model.trainable_state(setup.method.trainable_keys(setup.model)))
                self._prepare_exchange()
                msgs = {j: self._message(P.FEATURES, j, t, -1, global_record) for j in clients}
                for j, reply in self._exchange(msgs).items():
                    try:
                        if not isinstance(reply, Message):
                            raise ValueError(reply)
                        rec = P.from_record(reply.content.array_records[P.FEATURES_RECORD])
                        cache[j] = (rec["features"], rec["targets"].long())
                    except (KeyError, TypeError, ValueError) as e:
                        self._fail(j, t, -1, f"features: {e}", False)
                        cache[j] = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
            return cache[k]

        stats_cache: dict[int, dict[str, torch.Tensor]] = {}

        def statistics(k: int) -> dict[str, torch.Tensor]:
            if not stats_cache:  # every reporting client computes its classifier statistics on its node
                global_record = P.to_record(setup.model.trainable_state(setup.method.trainable_keys(setup.model)))
                msgs = {j: self._message(P.FEATURES, j, t, -1, global_record, {"reply": P.REPLY_STATISTICS})
                        for j in clients}
                for j, reply in self._exchange(msgs).items():
                    try:
                        if not isinstance(reply, Message):
                            raise ValueError(reply)
                        stats_cache[j] = P.from_record(reply.content.array_records[P.STATISTICS_RECORD])
                    except (KeyError, TypeError, ValueError) as e:
                        self._fail(j, t, -1, f"statistics: {e}", False)
                        stats_cache[j] = {}
            return stats_cache[k]

        work_cache: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

        def method_work(k: int, kind: str) -> dict[str, torch.Tensor]:
            if kind not in work_cache:  # every reporting client does the method's work on its node
                work_cache[kind] = {}
                global_record = P.to_record(setup.model.trainable_state(setup.method.trainable_keys(setup.model)))
                self._prepare_exchange()
                msgs = {j: self._message(P.FEATURES, j, t, -1, global_record,
                                         {"reply": P.REPLY_METHOD_WORK, "work": kind}) for j in clients}
                for j, reply in self._exchange(msgs).items():
                    try:
                        if not isinstance(reply, Message):
                            raise ValueError(reply)
                        work_cache[kind][j] = P.from_record(reply.content.array_records[P.METHOD_WORK_RECORD])
                    except (KeyError, TypeError, ValueError) as e:
                        self._fail(j, t, -1, f"method work {kind!r}: {e}", False)
                        work_cache[kind][j] = {}
            return work_cache[kind][k]

        return TaskData(clients=clients, features=features, statistics=statistics, method_work=method_work)

    def round_stats(self) -> dict[str, Any]:
        stats, self._stats = self._stats, self._zero_stats()
        return stats

    def finish(self, history: History) -> None:
        rounds = history.rounds
        history.extra["engine"] = self.name
        history.extra["wire"] = {
            key: sum(int(r_.extra.get(f"wire_{key}", 0) or 0) for r_ in rounds)
            for key in ("downlink_bytes", "residual_bytes", "method_bytes", "uplink_bytes")
        }
        if history.reliability is None:
            history.reliability = {}
        history.reliability["client_errors"] = sum(len(r_.extra.get("client_errors", [])) for r_ in rounds)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
