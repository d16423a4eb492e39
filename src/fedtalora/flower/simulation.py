"""``engine=flower-sim``: the run through Flower's simulation runtime (Ray), in this process's driver.

:func:`run` starts ``flwr.simulation.run_simulation`` with ``fed.num_clients`` virtual SuperNodes (node
``i`` gets ``partition-id=i``) and a ServerApp whose ``main`` runs the task x round loop
(:func:`fedtalora.fed.loop.run_loop`) with a :class:`~fedtalora.flower.grid.GridTransport` over the simulation's Grid. The ServerApp runs in a
thread of this process (so it reuses what :func:`fedtalora.fed.build.prepare` built and reports progress);
the ClientApps run in Ray actor processes and share nothing with it but Flower messages and the
partition manifest file.

**Start-up.** Ray is started by :class:`RayCluster`, not by Flower, to cut the fixed cost before the
first round:

* no job-wide ``runtime_env`` (Flower passes one to ``ray.init`` only to set ``PYTHONPATH``, which the
  workers inherit anyway when it is in this process's environment): with one, the ``ClientAppActor`` s
  wait for new worker processes; without, they take over the ones Ray pre-starts at ``ray.init``;
* those pre-started workers import the ClientApp's modules (torch, timm, peft, flwr, fedtalora) as they
  start (Ray's ``preload_python_modules``), not when the first message arrives;
* the workers run at the driver's priority (Ray's ``worker_niceness`` is 15 by default: on a busy
  machine the actors, which do the clients' training, starved behind every other process);
* :func:`prestart` starts Ray in a background thread *before* :func:`fedtalora.fed.build.prepare` loads the
  data and builds the model, so Ray's start, the workers' imports and the driver's build overlap (the
  CLI does this).

**Stopping.** Every process started for the run is recorded (:class:`~fedtalora.flower.procs.ProcessRecorder`)
and ended when the run ends, however it ends: after ``ray.shutdown()``, Ray's runtime-env agent and
actors can survive, re-parented to init. SIGTERM and SIGINT interrupt the run: the ServerApp thread
stops waiting for replies (the run directory keeps the last completed round's checkpoint, so
``fedtalora resume`` continues it), the ``ClientAppActor`` processes are killed (their training in
flight is lost anyway), Flower's simulation winds down by itself, and then :class:`KeyboardInterrupt`
reaches the caller. (Raising it inside ``run_simulation`` instead left Flower's worker threads blocked
in ``ray.get`` after ``ray.shutdown()``: the process never exited. A second signal still raises at
once.)
"""

from __future__ import annotations

import atexit
import copy
import importlib.util
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FedTaLoRAError
from .procs import ProcessRecorder, interrupt_on_signals

if TYPE_CHECKING:
    from ..fed.build import Setup
    from ..fed.loop import Emit, RunResult

logger = logging.getLogger(__name__)


def total_cpus(cfg: Any) -> int:
    return int(cfg.flower.sim_cpus or os.cpu_count() or 1)


def backend_config(cfg: Any) -> dict[str, Any]:
    """Flower's backend config: per client CPUs/GPUs (Ray itself is started by :class:`RayCluster`)."""
    return {
        "client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": cfg.flower.client_gpus},
        "init_args": ray_init_args(cfg),
    }


PRELOAD = ("fedtalora.flower.client_app", "timm", "peft")
"""Modules every Ray worker imports when it starts (Ray's ``preload_python_modules`` system config)."""


def ray_init_args(cfg: Any) -> dict[str, Any]:
    """``ray.init`` arguments: the CPUs, no dashboard, Flower's log settings, no ``runtime_env``, and the
    ClientApp's modules preloaded by the worker processes Ray starts with it (the actors take them over)."""
    return {"num_cpus": total_cpus(cfg), "include_dashboard": False, "logging_level": "WARNING",
            "log_to_driver": True, "_system_config": {
                "preload_python_modules": list(PRELOAD),
                # Ray runs its workers 15 steps nicer than the driver (background work); here they are the
                # clients' training, the run's real work: on a busy machine nice-15 actors starve
                "worker_niceness": 0,
                # a busy machine: the raylet waits this long for its agents instead of crashing (Ray's
                # default gave "Check failed" in WaitForDashboardAgentPorts at a load of 8 on 2 cores)
                "agent_register_timeout_ms": 120_000,
            }}


class RayCluster:
    """A local Ray instance for one simulation, started in a background thread.

    Records every process started from :meth:`start` on (Ray's and the actors'); :meth:`shutdown` calls
    ``ray.shutdown()`` and then ends whatever of them still runs."""

    def __init__(self, init_args: dict[str, Any]) -> None:
        self.init_args = copy.deepcopy(init_args)
        self.recorder = ProcessRecorder()
        self.error: BaseException | None = None
        self.seconds = 0.0
        """How long ``ray.init`` took."""
        self._ready = threading.Event()
        self._released = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> RayCluster:
        self.recorder.start()
        self._thread = threading.Thread(target=self._init, name="fedtalora-ray-init", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)
        return self

    def _init(self) -> None:
        t0 = time.perf_counter()
        try:
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # The workers inherit this process's environment: put its sys.path there (what Flower's own
            # ray.init passes as a runtime_env, which makes actors wait for new worker processes).
            paths = [p for p in sys.path if p]
            if os.environ.get("PYTHONPATH"):
                paths.append(os.environ["PYTHONPATH"])
            os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            ray_worker_log = logging.getLogger("ray._private.worker")
            level = ray_worker_log.level
            ray_worker_log.setLevel(logging.ERROR)  # "SIGTERM handler is not set ...": ours is (run)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator env-var notice
                    import ray

                    if not ray.is_initialized():
                        try:
                            ray.init(**copy.deepcopy(self.init_args))  # (ray.init changes _system_config)
                        except Exception as e:  # noqa: BLE001
                            # On a busy machine the workers' preload can starve Ray's own agents at start
                            # ("node timed out during startup"): clean up, try once more without it.
                            logger.warning("Ray did not start (%s); retrying without preloading the ClientApp "
                                           "modules", str(e).splitlines()[0])
                            ray.shutdown()
                            self.recorder.stop_all(grace=1.0)
                            args = copy.deepcopy(self.init_args)
                            args.get("_system_config", {}).pop("preload_python_modules", None)
                            ray.init(**args)
            finally:
                ray_worker_log.setLevel(level)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self._ready.set()
        # Ray starts its GCS server and raylet with PR_SET_PDEATHSIG: the kernel kills them when the
        # *thread* that started them ends. So this thread lives until the cluster is shut down.
        self._released.wait()

    def wait(self, stop: threading.Event | None = None) -> None:
        """Block until Ray is up; raise what ``ray.init`` raised (:class:`KeyboardInterrupt` if ``stop``
        is set meanwhile)."""
        while not self._ready.wait(0.1):
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt("the run was interrupted while Ray was starting")
        if self.error is not None:
            raise FedTaLoRAError(f"could not start Ray for engine=flower-sim: {self.error}") from self.error

    def end_actors(self) -> list[int]:
        """SIGKILL the ``ClientAppActor`` processes (the clients' training in flight): what the driver's
        threads wait for on them then fails at once instead of when the training ends (or never, once
        Ray is shut down). Returns their pids."""
        return self.recorder.kill_matching("ClientAppActor")

    def shutdown(self, grace: float = 2.0) -> list[int]:
        """``ray.shutdown()``, then end every recorded process still running; returns the pids killed."""
        if self._closed:
            return []
        self._closed = True
        self._ready.wait(60)
        try:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
        except Exception as e:  # noqa: BLE001
            logger.warning("ray.shutdown() failed: %s", e)
        self._released.set()
        self.recorder.stop()
        killed = self.recorder.stop_all(grace)
        if killed:
            logger.debug("ended %d processes that outlived ray.shutdown(): %s", len(killed), killed)
        atexit.unregister(self.shutdown)
        return killed


_PRESTARTED: RayCluster | None = None


def prestart(cfg: Any) -> RayCluster | None:
    """Start Ray for ``cfg`` in the background (``engine=flower-sim`` only), to overlap with
    :func:`fedtalora.fed.build.prepare`; :func:`run` takes it over. Idempotent; stopped at exit if unused."""
    global _PRESTARTED
    if cfg.engine != "flower-sim" or importlib.util.find_spec("ray") is None:
        return None  # (without Ray, prepare() says what to install)
    if _PRESTARTED is None or _PRESTARTED._closed:
        _PRESTARTED = RayCluster(ray_init_args(cfg)).start()
    return _PRESTARTED


def _take_cluster(cfg: Any) -> RayCluster:
    global _PRESTARTED
    cluster, _PRESTARTED = _PRESTARTED, None
    if cluster is None or cluster._closed:
        cluster = RayCluster(ray_init_args(cfg)).start()
    elif cluster.init_args != ray_init_args(cfg):
        cluster.shutdown()
        cluster = RayCluster(ray_init_args(cfg)).start()
    return cluster


def run(setup: Setup, run_dir: Path | None, progress: Emit | None, *, resume: bool) -> RunResult:
    """Run ``setup`` with ``engine=flower-sim``; returns what the ServerApp's loop returned."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from ..fed.loop import run_loop
    from .client_app import app as client_app
    from .grid import GridTransport

    outcome: dict[str, Any] = {}
    stop = threading.Event()
    server_started, server_done = threading.Event(), threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        server_started.set()
        try:
            transport = GridTransport(grid, engine="flower-sim", run_dir=run_dir, stop=stop)
            outcome["result"] = run_loop(setup, run_dir, progress, transport, resume=resume)
        except BaseException as e:  # re-raised in the caller's thread below
            outcome["error"] = e
        finally:
            server_done.set()

    cluster = _take_cluster(setup.cfg)
    flwr_logger = logging.getLogger("flwr")
    propagate, flwr_logger.propagate = flwr_logger.propagate, False  # it has its own console handler
    level = flwr_logger.level

    def on_signal(_signum: int) -> None:
        # Flower logs each failed reply of an ended actor with a traceback: not news after a stop
        flwr_logger.setLevel(logging.CRITICAL)
        threading.Thread(target=cluster.end_actors, name="fedtalora-end-actors", daemon=True).start()

    try:
        # A signal stops the run from inside (deferred KeyboardInterrupt): the ServerApp thread stops
        # waiting for replies, the actors' training in flight is ended, Flower's threads notice the
        # stop and the simulation returns; then KeyboardInterrupt. Raised in the middle of
        # run_simulation it would leave Flower's worker threads blocked in ray.get() on replies that
        # never come after ray.shutdown(), and the interpreter waits for them at exit forever.
        with interrupt_on_signals(stop, defer=True, on_signal=on_signal):
            cluster.wait(stop)
            logger.debug("Ray up after %.1f s", cluster.seconds)
            if not stop.is_set():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    run_simulation(server_app=server_app, client_app=client_app,
                                   num_supernodes=setup.cfg.fed.num_clients,
                                   backend_config=backend_config(setup.cfg))  # type: ignore[arg-type]
    finally:
        stop.set()  # the ServerApp thread stops waiting for replies, if it still does
        flwr_logger.propagate = propagate
        flwr_logger.setLevel(level)
        if server_started.is_set() and not server_done.wait(60):
            logger.warning("the ServerApp thread did not stop within 60 s")
        cluster.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise FedTaLoRAError("the Flower simulation ended without a result (see the Flower log above)")
    return outcome["result"]
