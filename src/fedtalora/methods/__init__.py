"""The method registry: Fed-TaLoRA and the methods it is compared against, one small module each.

``from fedtalora.methods import METHODS, Method``; ``METHODS.get(name)`` gives a method's class,
``fedtalora methods`` lists the implemented and the planned ones. The hooks are documented in
:mod:`fedtalora.methods.base`; each module's docstring names the paper it follows and where it departs.
"""

from __future__ import annotations

from . import fedlora, fedprox, fedtalora, ffa_lora, finetune, head_only, pilora, prompt, target, lander  # noqa: F401  (registration)
from .base import METHODS, Method, TaskData, UpdateBuffer

__all__ = ["METHODS", "Method", "TaskData", "UpdateBuffer"]

for _name, _note in {
    "glfc": "GLFC (CVPR 2022): gradient compensation, relation distillation; needs an exemplar memory (opt-in)",
}.items():
    METHODS.plan(_name, _note)
