"""Fed-TaLoRA on Flower 1.42: ``engine=flower-sim`` (simulation on Ray) and ``engine=flower`` (deployment).

Layout:

* :mod:`.protocol`   -- message types, record names, tensor codecs, the residual catch-up encoding;
* :mod:`.transport`  -- :class:`~.transport.GridTransport`, the server side: the engine's loop
  (:func:`fedtalora.engine.run`, the single task x round loop) reaches its clients through it;
* :mod:`.server_app` -- the ``ServerApp`` of a deployment (and why it is not a ``Strategy.start`` loop);
* :mod:`.client_app` -- the ``ClientApp``: one client, training with the in-process engine's function;
* :mod:`.simulation` -- ``engine=flower-sim`` via ``flwr.simulation.run_simulation``;
* :mod:`.deployment` -- ``engine=flower``: the Flower app directory, ``flwr run``, and a local
  SuperLink + SuperNodes for tests and benchmarks.

Install with ``pip install 'fedtalora[flower]'`` (``flwr[simulation]==1.42.0``). See ``docs/flower.md``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..engine import ProgressFn, RunResult, Setup
    from ..methods import Method

INSTALL_HINT = "pip install 'fedtalora[flower]'"
FLWR_VERSION = "1.42.0"


def unsupported_reason(method: Method) -> str | None:
    """Why ``method`` cannot run with Flower clients (None when it can).

    A Flower client rebuilds the method from the config and receives only the global trainable state
    and the base residuals. A method that changes the model outside aggregation (``on_task_start``,
    ``apply``) or keeps server-side state its clients' loss needs (``checkpoint_state``) would diverge.
    """
    from ..methods import Method as Base

    inner = getattr(method, "inner", method)  # classifier.kind=prototype wraps the method
    for hook in ("on_task_start", "apply", "checkpoint_state", "set_class_names", "replay", "on_round_end"):
        if getattr(type(inner), hook) is not getattr(Base, hook):
            return f"it overrides {hook}, so its clients would need server-side state that Flower messages do not carry"
    return None


def check_engine(cfg: RunConfig, method: Method) -> None:
    """Raise :class:`ConfigError` unless ``cfg.engine`` can run here with ``method``."""
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(f"engine={cfg.engine} needs Flower {FLWR_VERSION}: {INSTALL_HINT}")
    if cfg.engine == "flower-sim" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"engine=flower-sim needs Flower's simulation extra (Ray): {INSTALL_HINT}")
    why = unsupported_reason(method)
    if why is not None:
        raise ConfigError(f"method={cfg.method!r} cannot run with engine={cfg.engine}: {why}; use engine=inprocess")


def run_engine(setup: Setup, run_dir: Path | None, progress: ProgressFn | None, *, resume: bool) -> RunResult:
    """``engine.run`` for ``engine=flower-sim`` / ``flower`` (called when no transport was given)."""
    if setup.cfg.engine == "flower-sim":
        from .simulation import run as run_sim

        return run_sim(setup, run_dir, progress, resume=resume)
    from .deployment import submit

    return submit(setup.cfg, run_dir, resume=resume)
