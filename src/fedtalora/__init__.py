"""fedtalora: federated class-incremental learning of pre-trained transformers with task-agnostic
LoRA and exact residual aggregation (Fed-TaLoRA, arXiv 2505.12318)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "RunConfig", "resolve", "run"]


def __getattr__(name: str):  # lazy: `import fedtalora` stays cheap (no torch import)
    if name in ("RunConfig", "resolve"):
        from . import config

        return getattr(config, name)
    if name == "run":
        from .engine import run

        return run
    raise AttributeError(name)
