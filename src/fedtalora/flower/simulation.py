"""``engine=flower-sim``: the run through Flower's simulation runtime (Ray), in this process's driver.

:func:`run` starts ``flwr.simulation.run_simulation`` with ``fed.num_clients`` virtual SuperNodes (node
``i`` gets ``partition-id=i``) and a ServerApp whose ``main`` runs the task x round loop
(:func:`fedtalora.fed.loop.run_loop`) with a :class:`~fedtalora.flower.grid.GridTransport` over the simulation's Grid. The ServerApp runs in a
thread of this process (so it reuses what :func:`fedtalora.fed.build.prepare` built and reports progress);
the ClientApps run in Ray actor processes and share nothing with it but Flower messages and the
partition manifest file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FedTaLoRAError

if TYPE_CHECKING:
    from ..fed.build import Setup
    from ..fed.loop import Emit, RunResult

logger = logging.getLogger(__name__)


def backend_config(cfg: Any) -> dict[str, Any]:
    """Ray resources from ``flower.*``: per client CPUs/GPUs, total CPUs."""
    total = cfg.flower.sim_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": cfg.flower.client_gpus},
        "init_args": {"num_cpus": total, "include_dashboard": False},
    }


def run(setup: Setup, run_dir: Path | None, progress: Emit | None, *, resume: bool) -> RunResult:
    """Run ``setup`` with ``engine=flower-sim``; returns what the ServerApp's loop returned."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from ..fed.loop import run_loop
    from .client_app import app as client_app
    from .grid import GridTransport

    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            transport = GridTransport(grid, engine="flower-sim", run_dir=run_dir)
            outcome["result"] = run_loop(setup, run_dir, progress, transport, resume=resume)
        except BaseException as e:  # re-raised in the caller's thread below
            outcome["error"] = e

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr_logger = logging.getLogger("flwr")
    propagate, flwr_logger.propagate = flwr_logger.propagate, False  # it has its own console handler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator env-var notice
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=setup.cfg.fed.num_clients,
                           backend_config=backend_config(setup.cfg))  # type: ignore[arg-type]
    finally:
        flwr_logger.propagate = propagate
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise FedTaLoRAError("the Flower simulation ended without a result (see the Flower log above)")
    return outcome["result"]
