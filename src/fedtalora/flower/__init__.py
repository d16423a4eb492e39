"""Fed-TaLoRA on Flower 1.42: ``engine=flower-sim`` (simulation on Ray) and ``engine=flower`` (deployment).

Layout:

* :mod:`.protocol`   -- message types, record names, tensor codecs, the residual catch-up encoding;
* :mod:`.grid`       -- :class:`~.grid.GridTransport`, the server side: the engine's loop
  (:func:`fedtalora.fed.loop.run_loop`, the single task x round loop) reaches its clients through it;
* :mod:`.server_app` -- the ``ServerApp`` of a deployment (and why it is not a ``Strategy.start`` loop);
* :mod:`.client_app` -- the ``ClientApp``: one client, training with the in-process engine's function;
* :mod:`.simulation` -- ``engine=flower-sim`` via ``flwr.simulation.run_simulation``;
* :mod:`.deployment` -- ``engine=flower``: the Flower app directory, ``flwr run``, and a local
  SuperLink + SuperNodes for tests and benchmarks.

Install with ``pip install 'fedtalora[flower]'`` (``flwr[simulation]==1.42.0``). See ``docs/flower.md``.
"""

from __future__ import annotations

from ..fed.build import FLOWER_INSTALL_HINT as INSTALL_HINT
from ..fed.build import FLWR_VERSION

__all__ = ["FLWR_VERSION", "INSTALL_HINT"]
