"""Alias of :mod:`fedtalora.core.aggregation` (the pure aggregation and residual functions), kept for
scripts written against earlier versions: ``from fedtalora.aggregation import aggregate_lora`` works."""

from .core.aggregation import *  # noqa: F403
from .core.aggregation import __all__  # noqa: F401
