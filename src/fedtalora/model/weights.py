"""Local weight files of a backbone: read safely, loaded strictly.

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` files with
``torch.load(weights_only=True)``, so no arbitrary code runs (a file holding pickled objects is refused
without the usual advice to set ``weights_only=False``). Every tensor read must be finite. Loading checks
every key and shape and says in one line what does not fit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..core.integrity import nonfinite_message
from ..errors import ModelError, one_line

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weight file, unwrapped.

    ``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` files with
    ``torch.load(weights_only=True)`` (no arbitrary code runs). A ``state_dict`` or ``model`` entry
    holding the tensors is unwrapped, and a ``module.`` prefix on every key (DistributedDataParallel)
    is removed.

    Raises:
        ModelError: The file is missing, of an unknown type, unreadable, holds no tensors, or holds a tensor
            with a NaN or an infinity.
    """
    import pickle
    from pathlib import Path

    source = f"model.checkpoint={path!r}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{source} does not exist")
    suffix = p.suffix.lower()
    if suffix not in _CHECKPOINT_SUFFIXES:
        raise ModelError(f"{source}: unsupported file type {suffix or '(no suffix)'}; "
                         f"use one of {', '.join(_CHECKPOINT_SUFFIXES)}")
    if not os.access(p, os.R_OK):
        raise ModelError(f"{source} is not a readable regular file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            # torch's message ends by suggesting weights_only=False, i.e. running the file's code: not here
            raise ModelError(f"{source} holds pickled Python objects besides tensors, which fedtalora never "
                             "unpickles (that could run code from the file); save the weights as .safetensors "
                             "or as a plain state dict of tensors") from None
        raise ModelError(f"cannot read {source}: not a PyTorch weight file ({_first_line(e)})") from None
    except Exception as e:  # torch.load or safetensors on a file that is something else (text, truncated...)
        raise ModelError(f"cannot read {source}: not a valid {suffix} weight file "
                         f"({type(e).__name__}: {one_line(_strip_ansi(str(e)), 200)})") from None
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k in ("state_dict", "model", "module") if isinstance(state.get(k), Mapping)]
        if not inner:
            break
        state = state[inner[0]]
    if not isinstance(state, Mapping):
        raise ModelError(f"{source} holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{source} holds no tensors (keys: {', '.join(map(str, list(state)[:5]))})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    bad = nonfinite_message(tensors, source)
    if bad is not None:
        raise ModelError(bad)
    return tensors


def _first_line(e: BaseException) -> str:
    return one_line(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 300)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, name: str) -> None:
    """Load a backbone's weights strictly: every key present, nothing extra, every shape equal.

    The timm model family's own ``checkpoint_filter_fn`` runs first when it has one (it converts
    original formats, e.g. official DINO or OpenCLIP files, and resamples position embeddings to the
    model's ``img_size``). Classifier weights in the file are dropped when the model has no classifier
    (``num_classes=0``).

    Args:
        model: The freshly built timm model.
        state: Its weights (see :func:`read_checkpoint`).
        source: How the user named the file, for messages.
        name: The model name, for messages.

    Raises:
        ModelError: One line listing a few missing, unexpected and mis-shaped keys.
    """
    import importlib

    state = dict(state)
    family = importlib.import_module(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state = dict(filter_fn(state, model))
        except Exception as e:  # timm's converter on tensors it does not expect (e.g. a 1-D pos_embed)
            raise ModelError(f"{source} does not fit {name}: timm's converter failed "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    expected = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if getattr(model, "num_classes", None) == 0 and classifier:
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        dropped = [k for k in state if k not in expected and any(k.startswith(f"{h}.") for h in heads)]
        for k in dropped:
            del state[k]
        if dropped:
            logger.info("%s: ignoring classifier weights %s (the backbone has no classifier)", source, dropped)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} shape mismatch(es) ({_few(mis_shaped, 2)})")
        raise ModelError(f"{source} does not fit {name}: {'; '.join(problems)}; check model.backbone and "
                         "model.kwargs against the model the file was saved from")
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s into %s", len(state), source, name)
