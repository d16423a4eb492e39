"""The Flower engines (``engine=flower-sim`` / ``flower``) against the in-process engine.

* unit: the residual catch-up on the wire reproduces the server's base bit for bit; methods whose
  clients would need server-side state are refused; the engine does not change config fingerprints;
* an in-memory Grid (no Ray, no network; relies on Flower's private ``TaskIdentity``) runs the real
  ServerApp transport and ClientApp: partial participation, injected crashes, the prototype classifier's
  end-of-task feature queries, factored and dense catch-ups -- and the numbers of ``engine=inprocess``;
* ``flower-sim`` end to end on Ray (2 tasks x 2 rounds, 3 clients) matches ``inprocess``; a client that
  crashes mid-round is dropped, logged and counted, the run goes on;
* a loopback deployment: a SuperLink and 3 SuperNodes as subprocesses on 127.0.0.1, ``fedtalora run
  ... engine=flower`` through ``flwr run``; every process is stopped afterwards, also on failure.

Every test here needs ``flwr`` (``pip install 'fedtalora[flower]'``) and is skipped without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedtalora.api import prepare, run  # noqa: E402
from fedtalora.config import resolve  # noqa: E402
from fedtalora.core.aggregation import aggregate_lora, normalize_weights  # noqa: E402
from fedtalora.errors import ConfigError  # noqa: E402
from fedtalora.fed.build import method_context  # noqa: E402
from fedtalora.fed.loop import run_loop  # noqa: E402
from fedtalora.fed.rundir import config_fingerprint  # noqa: E402
from fedtalora.flower import protocol as P  # noqa: E402
from fedtalora.flower.client_app import app as client_app  # noqa: E402
from fedtalora.flower.grid import GridTransport, short_error  # noqa: E402
from fedtalora.flower.procs import ProcessRecorder, interrupt_on_signals, start_time  # noqa: E402
from fedtalora.methods import METHODS  # noqa: E402

ROUNDING_BOUND = 2.0
"""The error of the global model, per round and since the start, in units of one float32 rounding of the
weight (``u ||W||``): with the exact base it is float32 resolution and nothing more."""
EXACT = ("train_loss", "aggregation_error", "aggregation_error_rounding", "aggregation_error_accumulated",
         "aggregation_error_accumulated_rounding", "naive_aggregation_loss")
"""Round fields the engines reproduce bit for bit on one machine: the clients compute on the same bits (the
exact base's catch-up) and the server measures the same model."""


def tiny(tiny_overrides: list[str], *extra: str):  # noqa: ANN201
    return resolve("tiny-vit", [*tiny_overrides, *extra])


def assert_same_numbers(a: dict[str, Any], b: dict[str, Any], *, exact: bool = True) -> None:
    """Same accuracy matrix, training losses and per-round errors of the global model (bit for bit), same round
    bookkeeping; with ``exact`` (a method with the exact residual) the errors at float32 resolution."""
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert len(a["rounds"]) == len(b["rounds"])
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for key in ("clients", "aggregated", "num_samples", "dropped", "skipped", "uplink_bytes", "downlink_bytes",
                    *EXACT):
            assert ra[key] == rb[key], (ra["task"], ra["round"], key)
        if ra["aggregation_error"] is not None and exact:
            for key in ("aggregation_error_rounding", "aggregation_error_accumulated_rounding"):
                assert 0 <= ra[key] <= ROUNDING_BOUND, key
    for key in ("max_aggregation_error_rounding", "max_aggregation_error_accumulated_rounding"):
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
        assert not exact or 0 <= a[key] <= ROUNDING_BOUND, key


# --- unit ---------------------------------------------------------------------------------------------


def test_catch_up_on_the_wire_reproduces_the_servers_base_bit_for_bit(make_tiny_model) -> None:
    """Three residual rounds added into the server's exact base vs. the same rounds sent as factors (and as a
    dense accumulator) and applied by a client model built from the same seed: base weights and accumulators
    equal bit for bit, and a factored catch-up after a dense one stays so."""
    server, client, late = make_tiny_model(), make_tiny_model(), make_tiny_model()
    for m in (server, client, late):
        m.enable_exact_base()
    pairs = server.lora_pairs()
    keys = list(server.lora_parameters())
    g = torch.Generator().manual_seed(0)
    history = []
    for v in range(1, 5):
        updates = [{k: torch.randn(t.shape, generator=g) * 0.1 for k, t in server.trainable_state(keys).items()}
                   for _ in range(3)]
        agg = aggregate_lora(updates, normalize_weights([5, 3, 2]), pairs, residual=True, exact=True)
        assert set(agg.factors) == set(agg.residuals)
        server.add_to_base(agg.residuals)
        history.append((v, agg.factors))
        if v == 3:  # the late client: a dense catch-up (D) to version 3, then the factors of round 4
            P.apply_catch_up(late, P.decode_catch_up(P.catch_up_record(
                {p.layer: server.exact_base.acc[p.layer] for p in pairs})))
    plan = {p.layer: [(v, f[p.layer]) for v, f in history] for p in pairs}
    decoded = P.decode_catch_up(P.catch_up_record(plan))
    assert list(decoded) == [p.layer for p in pairs]
    P.apply_catch_up(client, decoded)
    P.apply_catch_up(late, P.decode_catch_up(P.catch_up_record({p.layer: plan[p.layer][-1:] for p in pairs})))
    for p in pairs:
        for m in (client, late):
            assert torch.equal(m.base_weight(p.layer), server.base_weight(p.layer)), p.layer
            assert torch.equal(m.exact_base.acc[p.layer], server.exact_base.acc[p.layer]), p.layer
    with pytest.raises(ValueError, match="float64"):  # a float32 base is not an accumulator
        P.apply_catch_up(late, {pairs[0].layer: server.base_weight(pairs[0].layer).detach()})
    # The wire carries at least the payload, and not much more.
    record = P.catch_up_record(plan)
    payload = sum(t.numel() * t.element_size() for t in P.from_record(record).values())
    assert payload <= P.wire_nbytes(record) <= 1.3 * payload + 4096


def test_packed_tensors_hand_example_and_round_trip() -> None:
    """One packed array per record: an 8-byte header length, a JSON header, the raw bytes."""
    buf = P.pack_tensors({"a": torch.tensor([1.0])})
    header = b'[["a", "float32", [1]]]'
    assert buf.tobytes() == len(header).to_bytes(8, "little") + header + bytes([0, 0, 0x80, 0x3F])
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(3, 5, generator=g), "i": torch.arange(7, dtype=torch.int64).reshape(7, 1),
        "h": torch.randn(4, generator=g).to(torch.bfloat16), "s": torch.tensor(2.5, dtype=torch.float64),
        "e": torch.zeros(0, 3), "t": torch.randn(6, 4, generator=g).t(),  # not contiguous
        "b": torch.tensor([True, False]),
    }
    record = P.to_record(state)
    assert list(record.keys()) == [P.PACKED]
    back = P.from_record(record)
    assert list(back) == list(state)  # key order kept
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    back["w"] += 1  # writable, owns its memory
    assert not torch.equal(back["w"], state["w"])
    assert P.from_record(P.to_record({})) == {}
    # A record of one array per tensor (another app, an older fedtalora) still reads.
    from flwr.app import Array, ArrayRecord

    plain = ArrayRecord({"x": Array.from_torch_tensor(torch.ones(2))})
    assert torch.equal(P.from_record(plain)["x"], torch.ones(2))
    for bad in (buf[:-1], np.concatenate([buf, np.zeros(1, np.uint8)]), buf[:5]):
        with pytest.raises(ValueError, match="malformed packed"):
            P.unpack_tensors(bad)


def test_process_recorder_ends_orphans_and_processes_that_ignore_sigterm() -> None:
    """What Ray leaves behind: a child re-parented to init once its parent exits, one that ignores SIGTERM."""
    script = "trap '' TERM; (trap '' TERM; exec sleep 300) & sleep 300 & sleep 1.5; exit 0"
    with ProcessRecorder(interval=0.05) as rec:
        parent = subprocess.Popen(["sh", "-c", script], start_new_session=True)
        parent.wait(timeout=30)
    assert len(rec.procs) >= 3  # sh and its two sleeps
    orphans = rec.alive()
    assert len(orphans) == 2 and all(start_time(p) == rec.procs[p] for p in orphans)
    killed = rec.stop_all(grace=0.5)
    assert killed and set(killed) <= set(orphans)  # the one ignoring SIGTERM needed SIGKILL
    assert rec.alive() == []
    # A recorded pid whose start time differs (the pid was reused) is left alone: here, this process.
    rec.procs[os.getpid()] = (start_time(os.getpid()) or 0) + 1
    assert rec.stop_all(grace=0.1) == [] and rec.alive() == []


def test_interrupt_on_signals_raises_once_and_restores_the_handlers() -> None:
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interrupt_on_signals(stop) as received:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread
    assert stop.is_set() and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before
    stop.clear()
    with interrupt_on_signals(stop) as received:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal only sets the event (cleanups run on)
        time.sleep(0.1)
    assert received == [signal.SIGINT, signal.SIGINT]


def test_the_warm_executor_runs_only_the_fedtalora_app() -> None:
    from fedtalora.flower.deployment import APP_PYPROJECT
    from fedtalora.flower.worker import DEFAULT_APP, clientapp_ref, load_clientapp

    fab = BytesIO()
    with zipfile.ZipFile(fab, "w") as z:
        z.writestr("pyproject.toml", APP_PYPROJECT)
    assert clientapp_ref(fab.getvalue()) == DEFAULT_APP == "fedtalora.flower.client_app:app"
    assert load_clientapp(DEFAULT_APP) is client_app
    with pytest.raises(TypeError, match="not a flwr ClientApp"):
        load_clientapp("fedtalora.flower.protocol:PACKED")


def test_certificates_and_node_keys_for_tls_and_supernode_auth(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedtalora.flower.tls import make_certificates, make_node_key

    files = make_certificates(tmp_path / "tls", ("127.0.0.1", "server.example"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["server.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600"
    private, public = make_node_key(tmp_path / "keys" / "node_0")
    key = load_ssh_private_key(private.read_bytes(), None)
    pub = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)  # a NIST curve
    assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]


def test_malformed_catch_up_is_refused(make_tiny_model) -> None:
    layer = make_tiny_model().lora_pairs()[0].layer
    with pytest.raises(ValueError, match="malformed"):
        P.decode_catch_up(P.to_record({f"X1:{layer}": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="lacks B, A or p"):
        P.decode_catch_up(P.to_record({f"B1:{layer}": torch.zeros(2, 2), f"A1:{layer}": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="does not adapt"):
        P.apply_catch_up(make_tiny_model(), {"no.such.layer": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="without the exact base"):
        P.apply_catch_up(make_tiny_model(), {layer: torch.zeros(2, 2, dtype=torch.float64)})


def test_engine_key_is_validated_and_every_flower_method_is_accepted_by_every_engine(tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="engine"):
        tiny(tiny_overrides, "engine=flower-simulation")
    with pytest.raises(ConfigError, match="flower.round_timeout"):
        tiny(tiny_overrides, "flower.round_timeout=-1")
    for method in METHODS.names():
        for engine in ("flower-sim", "flower"):
            if not METHODS.get(method).runs_on_flower:  # (none now) refused in one line
                with pytest.raises(ConfigError, match="Flower messages do not carry"):
                    prepare(tiny(tiny_overrides, f"method={method}", f"engine={engine}"))
                continue
            prepare(tiny(tiny_overrides, f"method={method}", f"engine={engine}",
                         "model.kwargs={patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2}", "lora.blocks=[0]"))


def test_the_engine_does_not_change_what_a_run_computes(tiny_overrides) -> None:
    """A run can be resumed under another engine: the checkpoint fingerprint ignores engine and flower.*."""
    fps = {config_fingerprint(tiny(tiny_overrides, f"engine={e}", "flower.round_timeout=5").to_dict())
           for e in ("inprocess", "flower-sim", "flower")}
    assert len(fps) == 1
    assert config_fingerprint(tiny(tiny_overrides, "seed=1").to_dict()) not in fps


def test_short_error_keeps_the_clients_message() -> None:
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
           "(pid=1)\n   ^^^^\nClientAppException: \nException ClientAppException occurred. Message: boom (x)'>")
    assert short_error(ray) == "boom (x)"
    assert short_error("<class 'fedtalora.flower.client_app.InjectedCrash'>:<'injected crash'>") == \
        "InjectedCrash: injected crash"


def test_flower_app_folder(tmp_path: Path, run_cli, tiny_overrides) -> None:
    rc, out, err = run_cli(["flower-app", str(tmp_path / "app"), "tiny-vit", *tiny_overrides], cwd=tmp_path)
    assert rc == 0, err
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "fedtalora.flower.server_app:app"' in text
    assert 'clientapp = "fedtalora.flower.client_app:app"' in text
    assert "dependencies = []" in text
    assert f'config = "{tmp_path / "app" / "config.yaml"}"' in text
    manifest = json.loads((tmp_path / "app" / "partitions.json").read_text())
    assert manifest["num_clients"] == 3 and len(manifest["tasks"]) == 2
    assert resolve(str(tmp_path / "app" / "config.yaml")).engine == "flower"


# --- an in-memory Grid: the real transport and ClientApp, no Ray ----------------------------------------


class InMemoryGrid(Grid):
    """Delivers each message to ``client_app`` in this process, one Context per node (like a SuperNode:
    the node's ``context.state`` persists only when the ClientApp succeeds). Test-only: it sets Flower's
    private ``TaskIdentity`` so that ``Message`` can be built outside a Flower runtime."""

    def __init__(self, num_nodes: int, node_config: dict[int, dict[str, Any]] | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": i, **(node_config or {}).get(i, {})},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self.node_ids)
        }
        self.log: list[tuple[str, int]] = []
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:  # noqa: D102
        pass

    @property
    def run(self) -> Any:  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's Grids do when pushing
            reply = self.send_and_receive([msg])[0]
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.log.append((msg.metadata.message_type, node))
            ctx = self.contexts[node]
            trial = Context(run_id=1, node_id=node, node_config=ctx.node_config,
                            state=RecordDict(ctx.state.copy()), run_config={})
            for name, rec in ctx.state.config_records.items():  # records are mutable: isolate them
                trial.state[name] = type(rec)(dict(rec))
            try:
                reply = client_app(msg, trial)
            except Exception as e:  # noqa: BLE001 - a SuperNode turns any ClientApp exception into an error
                replies.append(Message(Error(code=0, reason=f"<class '{type(e).__name__}'>:<'{e}'>"), reply_to=msg))
                continue
            ctx.state = trial.state
            replies.append(reply)
        return replies


def run_on_grid(cfg: Any, grid: InMemoryGrid, run_dir: Path | None = None) -> dict[str, Any]:
    transport = GridTransport(grid, engine="flower", run_dir=run_dir)
    return run_loop(prepare(cfg), run_dir, None, transport).metrics


def test_in_memory_grid_matches_inprocess_with_partial_participation_crashes_and_prototypes(tmp_path: Path, tiny_overrides) -> None:
    overrides = ["fed.num_clients=4", "fed.clients_per_round=2", "fed.rounds_per_task=3",
                 "faults.client_dropout=0.25", "classifier.kind=prototype", "partition.min_samples=3"]
    ref = run(tiny(tiny_overrides, *overrides)).metrics
    grid = InMemoryGrid(4)
    got = run_on_grid(tiny(tiny_overrides, *overrides, "engine=flower"), grid, tmp_path / "run")
    assert_same_numbers(ref, got)
    assert got["engine"] == "flower"
    # Injected crashes happened on the clients, were dropped, and are counted.
    assert ref["reliability"]["dropped_clients"] > 0
    assert got["reliability"]["dropped_clients"] == ref["reliability"]["dropped_clients"]
    errors = [e for r in got["rounds"] for e in r["client_errors"]]
    assert len(errors) == got["reliability"]["client_errors"] == ref["reliability"]["dropped_clients"]
    assert all(e["injected"] and "InjectedCrash" in e["error"] for e in errors)
    # End-of-task feature queries reached exactly the clients aggregated in each task's last round.
    feature_nodes = [node for kind, node in grid.log if kind == P.FEATURES]
    last = [r for r in got["rounds"] if r["round"] == 2]
    assert len(feature_nodes) == sum(len(r["aggregated"]) for r in last)
    # The residual really travelled: each round after the first carries one, and every wire count is
    # at least the payload it stands for.
    rounds = got["rounds"]
    assert rounds[0]["wire_residual_bytes"] == 0
    assert all(r["wire_residual_bytes"] > 0 for r in rounds[1:])
    # The wire carries at least the modelled payload (a crashed client gets a dense base; the end-of-task
    # feature queries sync their clients one round early, so compare totals).
    assert got["wire"]["downlink_bytes"] >= got["downlink_bytes_total"]
    for r in rounds:
        if r["round"] < 2:  # (the last round's modelled uplink adds prototype sums, the wire carries features)
            assert r["wire_uplink_bytes"] >= r["uplink_bytes"]
    assert got["wire"]["residual_bytes"] == sum(r["wire_residual_bytes"] for r in rounds)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["wire"] == got["wire"]


def test_in_memory_grid_carries_the_analytic_statistics_not_the_features(tmp_path: Path, tiny_overrides) -> None:
    """classifier.kind=analytic over Flower messages: each reporting node sends its ridge sums (computed on
    the node), never its features; the run computes what the in-process engine computes."""
    overrides = ["fed.num_clients=4", "fed.clients_per_round=3", "classifier.kind=analytic",
                 "classifier.projection_dim=24", "classifier.ridge=auto", "partition.min_samples=3"]
    ref = run(tiny(tiny_overrides, *overrides)).metrics
    grid = InMemoryGrid(4)
    replies: list[Message] = []
    send = grid.send_and_receive

    def spy(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        got = list(send(messages, timeout=timeout))
        replies.extend(got)
        return got

    grid.send_and_receive = spy  # type: ignore[method-assign]
    got = run_on_grid(tiny(tiny_overrides, *overrides, "engine=flower"), grid, tmp_path / "run")
    assert_same_numbers(ref, got)
    end_of_task = [m for m in replies if m.has_content() and P.CONFIG in m.content.config_records
                   and (P.STATISTICS_RECORD in m.content.array_records or P.FEATURES_RECORD in m.content.array_records)]
    last = [r for r in got["rounds"] if r["round"] == 1]
    assert len(end_of_task) == sum(len(r["aggregated"]) for r in last)
    assert all(P.FEATURES_RECORD not in m.content.array_records for m in end_of_task)
    assert all(set(P.from_record(m.content.array_records[P.STATISTICS_RECORD])) == {"gram", "corr", "counts", "classes"}
               for m in end_of_task)
    for r in last:  # the wire carries at least the statistics counted in the round's uplink
        assert r["wire_uplink_bytes"] >= r["uplink_bytes"] - sum(
            x["uplink_bytes"] for x in got["rounds"] if x["task"] == r["task"] and x["round"] == 0)


@pytest.mark.parametrize("method", [*(m for m in METHODS.names() if METHODS.get(m).runs_on_flower), "glfc+memory"])
def test_every_method_gives_the_inprocess_numbers_over_flower_messages(method: str, tmp_path: Path,
                                                                       tiny_overrides, fast_method_options) -> None:
    """Every registered method, with partial participation (clients miss rounds and tasks), through the
    real ClientApp and Flower messages: the same accuracy matrix, losses and exactness as in-process.
    What a client needs beyond the global state travels: method state (PILoRA's earlier A's), base changes
    made outside aggregation (PILoRA's task-start merge: a dense catch-up), prototypes (its head)."""
    memory = ["method_options.memory_per_class=2"] if method == "glfc+memory" else []  # private client state
    method = method.split("+")[0]
    overrides = ["fed.num_clients=4", "fed.clients_per_round=2", f"method={method}", "partition.min_samples=3",
                 *fast_method_options(method), *memory]
    ref = run(tiny(tiny_overrides, *overrides)).metrics
    grid = InMemoryGrid(4)
    got = run_on_grid(tiny(tiny_overrides, *overrides, "engine=flower"), grid, tmp_path / "run")
    assert_same_numbers(ref, got, exact=False)  # (naive methods' errors are what they are, on both engines)
    assert got["accuracy_matrix"] == ref["accuracy_matrix"] and got["complete"]
    assert not any(r["client_errors"] for r in got["rounds"])
    method_bytes = [r["wire_method_bytes"] for r in got["rounds"]]
    state, meta = METHODS.get(method)({}, method_context(tiny(tiny_overrides, *overrides))).client_state()
    if method in ("pilora", "target", "lander", "glfc"):  # task 0: nothing yet; task 1: earlier A's, generator,
        # old model (glfc/target/lander: only to those that do not start from it)
        assert method_bytes[:2] == [0, 0] and sum(method_bytes[2:]) > 0
        assert got["wire"]["method_bytes"] == sum(method_bytes)
        for ra, rb in zip(ref["rounds"], got["rounds"], strict=True):  # the method's own costs, counted alike
            for key in ("method_downlink_bytes", "synthetic_samples_per_client", "memory_samples"):
                assert ra[key] == rb[key], (ra["task"], ra["round"], key)
        assert method in ("pilora", "glfc") or sum(r["synthetic_samples"] for r in got["rounds"]) > 0
    elif not state and not meta:
        assert sum(method_bytes) == 0
    if memory:  # the exemplar memory lives on the nodes (context.state), never in a message
        assert got["rounds"][-1]["memory_samples"] > 0
        held = {k: ctx.state.array_records.get(P.STATE_PRIVATE) for k, ctx in grid.contexts.items()}
        assert sum(len(P.from_record(h)["indices"]) for h in held.values() if h is not None) == \
            got["rounds"][-1]["memory_samples"]


def test_method_state_round_trips_and_is_checked_against_its_digest() -> None:
    tensors = {"previous_A/0/blocks.0.attn.qkv": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    d, arrays, meta = P.method_state_records(tensors, {"temperature": 0.5})
    assert d and arrays is not None and meta is not None
    d2, got, extra = P.method_state_from_records(arrays, meta)
    assert d2 == d and extra == {"temperature": 0.5} and torch.equal(got["previous_A/0/blocks.0.attn.qkv"],
                                                                    tensors["previous_A/0/blocks.0.attn.qkv"])
    assert P.method_state_records({}, {}) == ("", None, None)
    assert P.method_state_records(tensors, {"temperature": 0.25})[0] != d  # the JSON part counts
    tampered = type(meta)(dict(meta))
    tampered["json"] = '{"temperature": 1.0}'
    with pytest.raises(ValueError, match="digest"):
        P.method_state_from_records(arrays, tampered)


def test_catch_up_is_factored_when_smaller_and_dense_otherwise(tmp_path: Path, tiny_overrides) -> None:
    """A client that missed few rounds gets the factors of those rounds; one whose factors would outweigh
    the dense base gets the base. The client's base always equals the server's afterwards."""
    # 6 clients, 2 per round (the residual of one update is zero): most clients miss several rounds.
    overrides = ["fed.num_clients=6", "fed.clients_per_round=2", "fed.rounds_per_task=6", "scenario.num_tasks=1",
                 "partition.min_samples=3", "lora.rank=8"]
    grid = InMemoryGrid(6)
    cfg = tiny(tiny_overrides, *overrides, "engine=flower")
    setup = prepare(cfg)
    transport = GridTransport(grid, engine="flower")
    seen_plans: list[dict[str, Any]] = []
    original = transport._catch_up

    def spy(k: int):  # noqa: ANN202
        frm, record = original(k)
        if record is not None:
            seen_plans.append({"from": frm, "to": transport.version, "plan": P.decode_catch_up(record)})
        return frm, record

    transport._catch_up = spy  # type: ignore[method-assign]
    server_acc: dict[int, dict[str, torch.Tensor]] = {}  # the server's accumulators D at each base version
    after_round = transport.after_round

    def keep(agg):  # noqa: ANN001, ANN202
        after_round(agg)
        server_acc[transport.version] = setup.model.exact_base.state_dict()

    transport.after_round = keep  # type: ignore[method-assign]
    metrics = run_loop(setup, None, None, transport).metrics
    assert_same_numbers(run(tiny(tiny_overrides, *overrides)).metrics, metrics)
    # Per layer, the smaller form: the factors of the missed rounds (the K = 2 live clients' B_k, A_k in
    # float32 and their weights in float64: 4 (d_out + d_in) K r + 8 K bytes each) unless they outweigh the
    # dense float64 accumulator D (or the client's version is unknown).
    r = setup.cfg.lora.rank
    forms = set()
    for seen in seen_plans:
        for layer, item in seen["plan"].items():
            d_out, d_in = setup.model.base_weight(layer).shape
            one_round, dense = (d_out + d_in) * 2 * r * 4 + 8 * 2, d_out * d_in * 8
            if isinstance(item, torch.Tensor):
                forms.add("dense")
                assert item.dtype == torch.float64 and item.shape == (d_out, d_in)
                assert seen["from"] == -1 or (seen["to"] - seen["from"]) * one_round > dense
            else:
                forms.add("factors")
                assert [v for v, _ in item] == list(range(seen["from"] + 1, seen["to"] + 1))
                assert all(f.nbytes == one_round for _, f in item)
                assert len(item) * one_round <= dense
    assert forms == {"dense", "factors"}
    # Every node's stored accumulator is the server's at the node's version, bit for bit.
    checked = 0
    for node, ctx in grid.contexts.items():
        stored = ctx.state.array_records.get(P.STATE_BASE)
        version = int(ctx.state.config_records[P.STATE_CONFIG]["version"])
        if stored is None:
            continue
        for name, t in P.from_record(stored).items():
            assert t.dtype == torch.float64 and torch.equal(t, server_acc[version][name]), (node, version, name)
        checked += 1
    assert checked >= 4


def test_a_client_without_its_partition_or_with_another_manifest_stops_the_run_at_the_start(tmp_path: Path, tiny_overrides) -> None:
    cfg = tiny(tiny_overrides, "engine=flower", "flower.connect_timeout=5")
    with pytest.raises(Exception, match="partition-id"):
        run_on_grid(cfg, InMemoryGrid(3, {1: {"partition-id": "x"}}))
    other = tmp_path / "other.json"
    manifest = prepare(tiny(tiny_overrides, "seed=7")).exp.partitions_json()
    other.write_text(json.dumps(manifest))
    grid = InMemoryGrid(3, {2: {"partitions": str(other)}})
    metrics = run_on_grid(cfg, grid)  # hello succeeds; client 2's samples disagree -> it fails every round
    failed = [e for r in metrics["rounds"] for e in r["client_errors"] if e["client"] == 2]
    assert failed and all("other samples" in e["error"] and not e["injected"] for e in failed)
    assert all(2 in r["dropped"] for r in metrics["rounds"])


# --- Flower's simulation runtime (Ray) ------------------------------------------------------------------


def test_flower_sim_matches_inprocess(tmp_path: Path, tiny_overrides) -> None:
    pytest.importorskip("ray")
    cfg = tiny(tiny_overrides)  # 2 tasks x 2 rounds, 3 clients
    ref = run(cfg).metrics
    got = run(tiny(tiny_overrides, "engine=flower-sim"), tmp_path / "sim").metrics
    assert_same_numbers(ref, got)
    assert got["engine"] == "flower-sim"
    saved = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert saved["complete"] and saved["wire"]["residual_bytes"] > 0
    # Round 2 of each task: every client catches up on one residual round, factored.
    for r_prev, r in zip(got["rounds"], got["rounds"][1:], strict=False):
        assert r["wire_residual_bytes"] >= len(r["clients"]) * r_prev["residual_bytes_factored"]


@pytest.mark.parametrize("partition", [
    ["partition.kind=iid", "fed.num_clients=1", "fed.clients_per_round=1"],
    ["partition.kind=dirichlet", "partition.beta=0.05", "fed.num_clients=10", "fed.clients_per_round=10"],
    ["partition.kind=quantity", "partition.alpha=2", "fed.num_clients=10", "fed.clients_per_round=10"],
])
def test_flower_sim_analytic_equals_inprocess_and_the_frozen_reference(tmp_path: Path, tiny_overrides,
                                                                      partition: list[str]) -> None:
    """Item 6 across engines: a frozen backbone with a fixed lambda gives the same ridge sums (1e-6) and the
    same accuracies on Flower's simulation as in-process, for one client, ten Dirichlet(0.05) or ten
    quantity(2) clients, and the same as the one-client in-process run (the centralized reference of the analytic tests)."""
    pytest.importorskip("ray")
    from fedtalora.fed import rundir

    frozen = ["method=head-only", "fed.rounds_per_task=1", "classifier.kind=analytic", "classifier.ridge=0.5",
              "classifier.projection_dim=40", "partition.min_samples=2"]
    central = run(tiny(tiny_overrides, *frozen, "partition.kind=iid", "fed.num_clients=1", "fed.clients_per_round=1"),
                  tmp_path / "central")
    cfg = tiny(tiny_overrides, *frozen, *partition, "engine=flower-sim")
    got = run(cfg, tmp_path / "sim").metrics
    assert got["engine"] == "flower-sim" and got["complete"]
    assert got["accuracy_matrix"] == central.metrics["accuracy_matrix"]
    a = rundir.load_latest(tmp_path / "sim", cfg.to_dict())
    b = rundir.load_latest(tmp_path / "central", tiny(tiny_overrides, *frozen, "partition.kind=iid",
                                                      "fed.num_clients=1", "fed.clients_per_round=1").to_dict())
    assert a is not None and b is not None
    for key in ("classifier.gram", "classifier.corr"):
        torch.testing.assert_close(a.method_state[key], b.method_state[key], rtol=1e-6, atol=1e-6)
    assert torch.equal(a.method_state["classifier.counts"], b.method_state["classifier.counts"])


def test_flower_sim_survives_a_client_crash_mid_round(tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_overrides) -> None:
    pytest.importorskip("ray")
    extra = ["scenario.num_tasks=1", "faults.client_dropout=0.35", "seed=3"]
    ref = run(tiny(tiny_overrides, *extra)).metrics
    assert ref["reliability"]["dropped_clients"] >= 1 and not any(r["skipped"] for r in ref["rounds"])
    with caplog.at_level(logging.WARNING, logger="fedtalora"):
        got = run(tiny(tiny_overrides, *extra, "engine=flower-sim"), tmp_path / "sim").metrics
    assert got["complete"]
    assert_same_numbers(ref, got)
    crashed = [(r["round"], e["client"]) for r in got["rounds"] for e in r["client_errors"]]
    assert crashed == [(r["round"], k) for r in ref["rounds"] for k in r["dropped"]]
    assert all("injected crash" in e["error"] for r in got["rounds"] for e in r["client_errors"])
    assert got["reliability"]["client_errors"] == got["reliability"]["dropped_clients"] == len(crashed)
    logged = {rec.getMessage() for rec in caplog.records if "dropped out (injected fault)" in rec.getMessage()}
    assert logged == {f"[task 1/1 | round {r + 1}/2] client {k} dropped out (injected fault)" for r, k in crashed}


# --- a loopback deployment: SuperLink + SuperNodes as subprocesses -------------------------------------


def test_loopback_deployment(tmp_path: Path, cli_env, tiny_overrides) -> None:
    from fedtalora.flower.deployment import LocalDeployment

    overrides = [o for o in tiny_overrides if not o.startswith("scenario.num_tasks")]
    overrides += ["scenario.num_tasks=1", "fed.rounds_per_task=2", "flower.round_timeout=300",
                  "flower.connect_timeout=120"]
    dep = LocalDeployment(3, tmp_path / "deployment", env=cli_env)
    try:
        with dep:
            assert len(dep.alive()) >= 4  # SuperLink, its SuperExec, 3 SuperNodes (+ theirs)
            proc = subprocess.run(
                [sys.executable, "-m", "fedtalora", "run", "tiny-vit", *overrides, "engine=flower",
                 f"output.dir={tmp_path}", "output.name=run"],
                env=dep.env, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    finally:
        dep.stop()
    assert dep.alive() == []
    # Warm nodes: each node's one executor process ran its hello and both rounds (no flwr-clientapp).
    for k in range(3):
        node_log = (tmp_path / "deployment" / f"supernode-{k}.log").read_text()
        assert node_log.count("fedtalora.flower.worker: task done") == 3, node_log[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["engine"] == "flower"
    assert [(r["task"], r["round"]) for r in metrics["rounds"]] == [(0, 0), (0, 1)]
    assert all(r["aggregated"] == [0, 1, 2] and not r["client_errors"] for r in metrics["rounds"])
    assert metrics["rounds"][1]["wire_residual_bytes"] >= 3 * metrics["rounds"][0]["residual_bytes_factored"] > 0
    assert 0 < metrics["max_aggregation_error_rounding"] <= ROUNDING_BOUND  # measured, at float32 resolution
    assert len(metrics["accuracy_matrix"]) == 1 and not math.isnan(metrics["final_average_accuracy"])
    ref = run(resolve("tiny-vit", overrides)).metrics
    assert_same_numbers(ref, metrics)


# --- stopping a run: SIGTERM / SIGINT mid-round, every process gone, resume finishes it ---------------


def _wait_for(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _completed_rounds(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _interrupt_mid_round(cmd: list[str], run_dir: Path, sig: int, env: dict[str, str], log: Path, what: str,
                         rounds: int) -> tuple[int, dict[int, str]]:
    """Start ``cmd``, send ``sig`` once its first round is checkpointed (it is then in a later round),
    wait for it to exit; returns its exit status and the processes it started that still run (pid ->
    command line; ended before returning, so a failing test leaks nothing)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    recorder = ProcessRecorder(interval=0.1, roots=[proc.pid]).start()
    try:
        assert _wait_for(lambda: _completed_rounds(run_dir) >= 1, 600, proc), log.read_text()[-3000:]
        recorder.scan()
        started = {p: _cmdline(p) for p in recorder.procs}
        assert any(what in c for c in started.values()), (what, started)
        assert _completed_rounds(run_dir) < rounds, "the run finished before the signal"
        proc.send_signal(sig)
        rc = proc.wait(timeout=180)
        recorder.stop()
        _wait_for(lambda: not recorder.alive(), 15)  # exiting children may take a moment
        leftover = {p: _cmdline(p) for p in recorder.alive()}
    finally:
        if proc.poll() is None:
            proc.kill()
        recorder.stop()
        recorder.stop_all(grace=1)
    return rc, leftover


def _assert_resumable(run_dir: Path, rounds: int) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not metrics["complete"] and 1 <= len(metrics["rounds"]) < rounds
    assert list((run_dir / "checkpoints").glob("*.json")), sorted(p.name for p in run_dir.iterdir())


def interrupted_overrides(tiny_overrides: list[str], rounds: int) -> list[str]:
    """One task of ``rounds`` rounds, long enough to be interrupted in the middle."""
    return [o for o in tiny_overrides if not o.startswith(("scenario.num_tasks", "fed.rounds_per_task"))] + \
        ["scenario.num_tasks=1", f"fed.rounds_per_task={rounds}"]


def test_flower_sim_sigterm_mid_round_ends_every_process_and_resume_finishes_the_run(tmp_path: Path, cli_env,
                                                                                     tiny_overrides) -> None:
    pytest.importorskip("ray")
    run_dir, overrides = tmp_path / "run", [*interrupted_overrides(tiny_overrides, 12), "train.local_epochs=2"]
    cmd = [sys.executable, "-m", "fedtalora", "run", "tiny-vit", "--quiet", *overrides, "engine=flower-sim",
           f"output.dir={tmp_path}", "output.name=run"]
    rc, leftover = _interrupt_mid_round(cmd, run_dir, signal.SIGTERM, cli_env, tmp_path / "run.log",
                                        "ClientAppActor", 12)
    log = (tmp_path / "run.log").read_text()
    assert rc == 130, log[-3000:]
    assert leftover == {}, leftover  # Ray's GCS, raylet, agents and actors included
    assert "fedtalora resume" in log
    _assert_resumable(run_dir, 12)
    with open(tmp_path / "resume.log", "wb") as out, ProcessRecorder(interval=0.1) as rec:
        proc = subprocess.run([sys.executable, "-m", "fedtalora", "resume", str(run_dir), "--quiet"], env=cli_env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert _wait_for(lambda: not rec.alive(), 15), {p: _cmdline(p) for p in rec.alive()}
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["complete"] and got["engine"] == "flower-sim"
    assert_same_numbers(run(resolve("tiny-vit", overrides)).metrics, got)


def test_deployment_sigint_mid_round_stops_the_run_on_the_superlink_and_resume_finishes_it(tmp_path: Path, cli_env,
                                                                                           tiny_overrides) -> None:
    """``fedtalora run ... engine=flower`` interrupted: its ``flwr run`` is gone, the run is stopped on the
    SuperLink (its ServerApp process ends), the nodes stay up for the next run, which resumes it."""
    from fedtalora.flower.deployment import LocalDeployment

    overrides = [*interrupted_overrides(tiny_overrides, 4), "flower.connect_timeout=120"]
    run_dir = tmp_path / "run"
    dep = LocalDeployment(3, tmp_path / "deployment", env=cli_env)
    try:
        with dep:
            nodes = set(dep.alive())
            cmd = [sys.executable, "-m", "fedtalora", "run", "tiny-vit", *overrides, "engine=flower",
                   f"output.dir={tmp_path}", "output.name=run"]
            rc, leftover = _interrupt_mid_round(cmd, run_dir, signal.SIGINT, dep.env, tmp_path / "run.log", "flwr", 4)
            log = (tmp_path / "run.log").read_text()
            assert rc == 130, log[-3000:]
            assert leftover == {}, leftover
            assert "Stopping Flower run" in log or "stopping Flower run" in log, log[-3000:]
            # The ServerApp process of the stopped run ends; the SuperLink and the nodes stay.
            assert _wait_for(lambda: not [p for p in dep.alive() if "flwr-serverapp" in _cmdline(p)], 60), \
                {p: _cmdline(p) for p in dep.alive()}
            assert nodes <= set(dep.alive())
            _assert_resumable(run_dir, 4)
            proc = subprocess.run([sys.executable, "-m", "fedtalora", "resume", str(run_dir)], env=dep.env,
                                  capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    finally:
        dep.stop()
    assert dep.alive() == []
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["complete"] and got["engine"] == "flower"
    assert_same_numbers(run(resolve("tiny-vit", overrides)).metrics, got)


def test_flower_sim_target_equals_inprocess_with_its_costs(tmp_path: Path, tiny_overrides, fast_method_options) -> None:
    """TARGET on Flower's simulation runtime (Ray): the generator and the teacher reach the clients as method
    state, the feature moments are computed on the nodes, the synthetic-sample counts come back in the replies:
    the accuracy matrix, losses, bytes and the method's own costs are those of ``engine=inprocess``."""
    pytest.importorskip("ray")
    overrides = ["method=target", *fast_method_options("target")]
    ref = run(tiny(tiny_overrides, *overrides)).metrics
    got = run(tiny(tiny_overrides, *overrides, "engine=flower-sim"), tmp_path / "sim").metrics
    assert_same_numbers(ref, got)
    assert got["engine"] == "flower-sim" and not any(r["client_errors"] for r in got["rounds"])
    for ra, rb in zip(ref["rounds"], got["rounds"], strict=True):
        for key in ("method_downlink_bytes", "synthetic_samples_per_client", "synthetic_samples"):
            assert ra[key] == rb[key], (ra["task"], ra["round"], key)
    task1 = [r for r in got["rounds"] if r["task"] == 1]
    assert all(r["synthetic_samples"] > 0 for r in task1) and task1[0]["method_downlink_bytes"] > 0
    # the generator (and, from the second round, the teacher) went over the wire: at least what is counted
    assert sum(r["wire_method_bytes"] for r in task1) >= sum(r["method_downlink_bytes"] for r in task1)


# --- deferred interrupt (flower-sim winds down by itself before KeyboardInterrupt) ------------------


def test_deferred_interrupt_lets_the_block_wind_down_then_raises_and_a_second_signal_raises_at_once() -> None:
    stop, calls = threading.Event(), []
    before = signal.getsignal(signal.SIGTERM)
    # A thread that only ends when told, like Flower's workers; the block joins it after the signal.
    worker = threading.Thread(target=lambda: stop.wait(30))
    worker.start()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interrupt_on_signals(stop, defer=True, on_signal=calls.append) as received:
            os.kill(os.getpid(), signal.SIGTERM)
            worker.join(timeout=30)  # not interrupted: the handler set `stop`, so the worker ended
            wound_down = not worker.is_alive()
    assert wound_down and calls == [signal.SIGTERM] and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before
    stop.clear()
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        with interrupt_on_signals(stop, defer=True) as received:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # deferred: no exception yet
            assert stop.is_set() and received == [signal.SIGINT]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the second one raises here
    assert received == [signal.SIGINT, signal.SIGINT]
    with interrupt_on_signals(stop, defer=True) as received:  # no signal: nothing raised
        pass
    assert received == []


def test_process_recorder_kills_only_the_recorded_processes_whose_command_line_matches() -> None:
    with ProcessRecorder(interval=0.05) as rec:
        keep = subprocess.Popen(["sleep", "301"], start_new_session=True)
        hit = subprocess.Popen(["sleep", "302"], start_new_session=True)
        time.sleep(0.3)
    try:
        assert rec.kill_matching("sleep 302") == [hit.pid]
        assert hit.wait(timeout=10) == -signal.SIGKILL
        assert keep.poll() is None and rec.kill_matching("no such command") == []
    finally:
        keep.kill()
        keep.wait()
