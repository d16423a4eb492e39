"""The library's entry point for a whole run: :func:`run` picks the engine; nothing below it does.

::

    import fedtalora
    cfg = fedtalora.config.resolve("tiny-vit", ["fed.residual=false"])
    result = fedtalora.run(cfg, run_dir=Path("runs/x"))
    result.history.final_average_accuracy, result.metrics   # typed record / metrics.json as a dict

``engine=inprocess`` runs the task x round loop (:func:`fedtalora.fed.loop.run_loop`) here with clients as
direct calls; ``flower-sim`` starts Flower's simulation, whose ServerApp runs the same loop with Flower
clients; ``flower`` submits the run to a Flower deployment (``flwr run``) and reads its results.
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .fed.build import Setup, prepare, torch_threads
from .fed.loop import Emit, RunResult, run_loop
from .fed.transport import InProcessTransport

__all__ = ["RunResult", "Setup", "prepare", "run", "torch_threads"]


def run(cfg: RunConfig | Setup, run_dir: Path | None = None, progress: Emit | None = None, *,
        resume: bool = False) -> RunResult:
    """Run one experiment end to end on the configured engine and return what it measured.

    Args:
        cfg: a validated config, or what :func:`prepare` built from one (so that input errors can be
            raised before the run directory is created).
        run_dir: where to write the run's files (None: nowhere; ``engine=flower`` needs one).
        progress: called with the loop's event dicts (``start``, ``client``, ``round``, ``task``, ``end``).
        resume: continue ``run_dir`` from its latest checkpoint; the result is identical to an uninterrupted
            run except for timing fields.

    Raises:
        FedTaLoRAError: bad input (config, data, model, checkpoint), one line each.
    """
    config = cfg.cfg if isinstance(cfg, Setup) else cfg
    with torch_threads(config.train.threads):
        setup = cfg if isinstance(cfg, Setup) else prepare(cfg)
        if config.engine == "flower":  # the run happens on the deployment's SuperLink
            from .flower.deployment import submit

            return submit(config, run_dir, resume=resume)
        if config.engine == "flower-sim":
            from .flower.simulation import run as run_simulation

            return run_simulation(setup, run_dir, progress, resume=resume)
        return run_loop(setup, run_dir, progress, InProcessTransport(), resume=resume)
