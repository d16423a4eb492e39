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

__all__ = ["METHODS", "Method", "TaskData", "UpdateBuffer"]
