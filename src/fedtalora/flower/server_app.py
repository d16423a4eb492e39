"""The fedtalora ``ServerApp``: runs the engine's task x round loop with Flower clients.

Why no ``flwr.serverapp.strategy.Strategy.start`` loop: ``Strategy.start`` owns a flat loop of
``num_rounds`` rounds over one ``ArrayRecord`` and expects every reply to carry exactly one
``ArrayRecord`` plus ``num-examples`` (FedAvg raises on anything else). A Fed-TaLoRA run is a loop over
tasks and rounds with per-task evaluation, update screening (a bad update is rejected and logged, not
an exception), round checkpoints and resume, a per-client residual catch-up that depends on when each
client last synchronised, and end-of-task queries. Re-implementing that inside a Strategy would be a
second copy of :func:`fedtalora.fed.loop.run_loop`. Instead the ServerApp's ``main`` calls that very function
with a :class:`~fedtalora.flower.grid.GridTransport`: the Grid carries the messages, the loop (and
the method hooks and pure ResWU functions it calls) does everything else, once.

Run config (``[tool.flwr.app.config]`` of the Flower app, ``flwr run --run-config``):

``config``     a fedtalora preset name or YAML path (a run's ``config.yaml`` works);
``overrides``  space-separated ``key=value`` overrides, as on the ``fedtalora run`` command line;
``run-dir``    the run directory on the server (default ``output.dir/output.name``);
``partitions`` the partition manifest path the clients read (default ``RUN_DIR/partitions.json``);
``resume``     continue ``run-dir`` from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import ConfigError
from ..runlock import RunLock

logger = logging.getLogger(__name__)

app = ServerApp()


def _log_to_stderr() -> None:
    """Show the loop's log lines in the ServerApp's output (``flwr run --stream``, ``flwr log``)."""
    root = logging.getLogger("fedtalora")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FEDTALORA_LOG_LEVEL", "INFO").upper())


def config_from_run_config(run_config: dict[str, Any]) -> tuple[Any, Path, str, bool]:
    """``(RunConfig, run directory, partitions path, resume)`` from the Flower run config."""
    from ..config import resolve

    source = str(run_config.get("config", "") or "")
    if not source:
        raise ConfigError("the Flower run config has no 'config' (a fedtalora preset name or YAML path): "
                          "flwr run ... --run-config \"config='tiny-vit'\"")
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    cfg = resolve(source, [*overrides, "engine=flower"])
    run_dir = str(run_config.get("run-dir", "") or "")
    if not run_dir:
        name = cfg.output.name or f"flower-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = str(Path(cfg.output.dir) / name)
    return cfg, Path(run_dir).expanduser(), str(run_config.get("partitions", "") or ""), \
        bool(run_config.get("resume", False))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployment entry point (``engine=flower``): resolve the config, run the loop over ``grid``."""
    from ..fed.build import prepare, torch_threads
    from ..fed.loop import run_loop
    from .grid import GridTransport

    _log_to_stderr()
    cfg, run_dir, partitions, resume = config_from_run_config(dict(context.run_config))
    with torch_threads(cfg.train.threads):
        setup = prepare(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("fedtalora ServerApp: run directory %s", run_dir)
        transport = GridTransport(grid, engine="flower", partitions=partitions or None, run_dir=run_dir)
        with RunLock(run_dir):  # the one writer of run_dir (the submitting command does not hold it)
            result = run_loop(setup, run_dir, None, transport, resume=resume)
    logger.info("fedtalora ServerApp: done, final average accuracy %.4f, metrics in %s",
                result.history.final_average_accuracy, run_dir / "metrics.json")
