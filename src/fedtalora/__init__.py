"""fedtalora: federated class-incremental learning of pre-trained transformers with task-agnostic
LoRA and exact residual aggregation (Fed-TaLoRA, arXiv 2505.12318).

The public API (each name is imported on first use, so ``import fedtalora`` stays cheap)::

    fedtalora.run(cfg, run_dir)          # a whole run on the configured engine (fedtalora.api)
    fedtalora.config.resolve(preset, overrides)  -> RunConfig
    fedtalora.core.aggregation           # the pure FedAvg / residual functions (alias: fedtalora.aggregation)
    fedtalora.build_model(...)           # FedModel: base_weight, lora_pairs, trainable_state, effective_weight
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["FedModel", "RunConfig", "__version__", "build_model", "resolve", "run"]

_LAZY = {"RunConfig": ("config", "RunConfig"), "resolve": ("config", "resolve"), "run": ("api", "run"),
         "build_model": ("model", "build_model"), "FedModel": ("model", "FedModel")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in ("api", "config", "core", "data", "fed", "flower", "methods", "model", "app", "aggregation"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fedtalora' has no attribute {name!r}")
