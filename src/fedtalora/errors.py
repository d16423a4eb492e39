"""Exceptions raised at the library's boundaries.

Every error a user can cause by what they hand us (a config, a path, a file, a client update) is a
:class:`FedTaLoRAError`. The CLI prints its message as one line and exits with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedTaLoRAError(Exception):
    """Base class of user-facing errors: the message is one line that names the problem."""


class ConfigError(FedTaLoRAError, ValueError):
    """A configuration key, value or preset is invalid."""


class DataError(FedTaLoRAError):
    """A dataset is missing, malformed or cannot satisfy the requested scenario."""


class PartitionError(DataError, ValueError):
    """A partition request cannot be satisfied (e.g. alpha above the classes of a task)."""


class ModelError(FedTaLoRAError):
    """A backbone, checkpoint or pretrained weight cannot be built or loaded."""


class AggregationError(FedTaLoRAError, ValueError):
    """Client updates do not agree on keys or shapes, or weights are invalid."""


class CheckpointError(FedTaLoRAError):
    """A run directory or checkpoint cannot be resumed: missing, corrupted, or from another config."""


class OutputError(FedTaLoRAError):
    """A file or folder cannot be written (missing or unwritable folder, a directory in the way, disk full)."""


MESSAGE_LIMIT = 2000
"""Default length of a message that reaches the user."""


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"... ({len(text)} more characters)"), 0)
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``str(text)`` with every whitespace run (newlines included) collapsed to one space, clipped to ``limit``
    characters: the form in which a message reaches the user."""
    return clip(" ".join(str(text).split()), limit)
