"""Fed-TaLoRA on Flower 1.42: ``engine=flower-sim`` (simulation on Ray) and ``engine=flower`` (deployment).

Layout:

* :mod:`.protocol`   -- message types, record names, tensor codecs, the residual catch-up encoding;
* :mod:`.grid`       -- :class:`~.grid.GridTransport`, the server side: the engine's loop
  (:func:`fedtalora.fed.loop.run_loop`, the single task x round loop) reaches its clients through it;
* :mod:`.server_app` -- the ``ServerApp`` of a deployment (and why it is not a ``Strategy.start`` loop);
* :mod:`.client_app` -- the ``ClientApp``: one client, training with the in-process engine's function;
* :mod:`.simulation` -- ``engine=flower-sim`` via ``flwr.simulation.run_simulation`` (Ray started by
  fedtalora: early, lean, every process stopped at the end);
* :mod:`.deployment` -- ``engine=flower``: the Flower app directory, ``flwr run`` (``flwr stop`` when
  interrupted), and a local SuperLink + nodes for tests and benchmarks (optionally TLS + node auth);
* :mod:`.worker`     -- a warm ClientApp executor for SuperNodes in ``--isolation process`` mode;
* :mod:`.node`       -- ``python -m fedtalora.flower.node``: a SuperNode and its warm executor, one command;
* :mod:`.procs`      -- recording and stopping every process a run starts; SIGTERM as KeyboardInterrupt;
* :mod:`.tls`        -- a CA, a SuperLink certificate and node key pairs (``cryptography``).

Install with ``pip install 'fedtalora[flower]'`` (``flwr[simulation]==1.42.0``). See ``docs/flower.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLWR_VERSION", "INSTALL_HINT"]


def __getattr__(name: str) -> Any:
    """``FLWR_VERSION`` and ``INSTALL_HINT`` on first use: importing a light submodule (:mod:`.procs`, which
    the CLI uses before anything heavy) must not import torch through :mod:`fedtalora.fed.build`."""
    if name in __all__:
        from ..fed import build

        return build.FLWR_VERSION if name == "FLWR_VERSION" else build.FLOWER_INSTALL_HINT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
