"""The method registry: Fed-TaLoRA and the methods it is compared against, one small module each.

``from fedtalora.methods import METHODS, Method``; ``METHODS.get(name)`` gives a method's class,
``fedtalora methods`` lists the implemented and the planned ones. The hooks are documented in
:mod:`fedtalora.methods.base`; each module's docstring names the paper it follows and where it departs.
"""

from __future__ import annotations

from . import (  # noqa: F401  (registration)
    fedlora,
    fedprox,
    fedtalora,
    ffa_lora,
    finetune,
    glfc,
    head_only,
    lander,
    pilora,
    prompt,
    target,
)
from .base import METHODS, Method, TaskData, UpdateBuffer

__all__ = ["METHODS", "SMOKE_OPTIONS", "Method", "TaskData", "UpdateBuffer"]

SMOKE_OPTIONS: dict[str, tuple[str, ...]] = {
    "target": ("method_options.gen_steps=30", "method_options.gen_batch=32", "method_options.syn_batch=16",
               "method_options.adv_warmup=10"),
    "lander": ("method_options.gen_steps=30", "method_options.gen_batch=32", "method_options.syn_batch=16",
               "method_options.adv_warmup=10"),
    "glfc": ("method_options.proto_steps=5", "method_options.recon_iters=4", "method_options.recon_evals=3",
             "method_options.recon_images=3"),
}
"""Small server budgets (``method_options`` overrides) of the methods that optimise on the server (TARGET's and
LANDER's generator, GLFC's proxy inversions), for smoke runs on tiny models: the test suite and
``benchmarks/flower_methods.py``. Not for accuracy results."""
