"""The final global model of a run on disk: ``RUN_DIR/final_model.safetensors``.

It uses the tensor layout of the round checkpoints (:mod:`fedtalora.checkpoint`):

``global/<key>``
    every tensor of :meth:`FedModel.parameters_by_key` (LoRA factors and head), whichever of them
    the method trained;
``base/<layer>``
    the base weight of every adapted layer, with every residual of the run folded in (the weights
    themselves, not the sum of the residuals, so that reloading is bit-exact).

Methods that train more (:meth:`FedModel.add_trainable`, e.g. full fine-tuning) have those tensors
under ``global/`` too. Everything else in the backbone never changes during a run and is rebuilt from
``config.yaml`` (pretrained weights, or the seeded random init; then :meth:`Method.attach`). The file's
metadata holds a fingerprint of those rebuilt tensors (their sums), checked on loading, so different
pretrained weights or a timm version that initialises differently fail loudly instead of giving
another model.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from . import __version__, safeio
from .errors import ConfigError, ModelError
from .validation import tensor_mismatch

if TYPE_CHECKING:
    from .config import RunConfig
    from .model import FedModel

logger = logging.getLogger(__name__)

FINAL_MODEL = "final_model.safetensors"
FORMAT = "fedtalora-final-1"
FINGERPRINT_RTOL = 1e-5


def _frozen_tensors(model: FedModel) -> dict[str, torch.Tensor]:
    """The backbone tensors a run never changes: all but the stored ones (:func:`final_state`)."""
    stored = {id(p) for p in model.parameters_by_key().values()}
    stored |= {id(model.base_weight(p.layer)) for p in model.lora_pairs()}
    out = {n: p for n, p in model.backbone.named_parameters() if id(p) not in stored}
    out.update(dict(model.backbone.named_buffers()))
    return out


def fingerprint(model: FedModel) -> dict[str, float]:
    """Per-tensor float64 sums of the tensors :func:`save_final` does not store."""
    return {k: float(t.detach().double().sum()) for k, t in sorted(_frozen_tensors(model).items())}


def final_state(model: FedModel) -> dict[str, torch.Tensor]:
    """``global/<key>`` and ``base/<layer>`` tensors of ``model`` (CPU, contiguous copies)."""
    tensors = {f"global/{k}": p for k, p in model.parameters_by_key().items()}
    tensors.update({f"base/{p.layer}": model.base_weight(p.layer) for p in model.lora_pairs()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_final(model: FedModel, path: Path) -> Path:
    """Write the model's final state to ``path`` atomically (safetensors); returns ``path``."""
    meta = {
        "format": FORMAT,
        "fedtalora": __version__,
        "num_classes": str(model.head.out_features),
        "fingerprint": json.dumps(fingerprint(model)),
    }
    safeio.atomic_write_bytes(path, st_save(final_state(model), metadata=meta))
    return path


def read_final(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a final-model file.

    Raises:
        ModelError: the file is missing, not safetensors, or not a fedtalora final model.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path} does not exist (the run did not finish, or an older fedtalora wrote it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a fedtalora final model (format {safeio.short(meta.get('format'))}, "
                         f"expected {FORMAT})")
    from .schema import final_meta_problem

    why = final_meta_problem(meta)
    if why is not None:
        raise ModelError(f"{path} has malformed metadata: {why}")
    return tensors, meta


def load_into(model: FedModel, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: Path) -> None:
    """Load a final state into a freshly built ``model`` after checking that it is the same model."""
    params = model.parameters_by_key()
    bases = {p.layer: model.base_weight(p.layer) for p in model.lora_pairs()}
    expected = {f"global/{k}": v for k, v in params.items()} | {f"base/{k}": v for k, v in bases.items()}
    reason = tensor_mismatch(tensors, expected, check_dtype=False)
    if reason is not None:
        raise ModelError(f"{source} does not match the model built from the run's config: {reason}")
    saved = json.loads(meta.get("fingerprint", "{}"))
    now = fingerprint(model)
    bad = [k for k in now if k not in saved or not math.isclose(now[k], saved[k], rel_tol=FINGERPRINT_RTOL,
                                                                  abs_tol=FINGERPRINT_RTOL)]
    if bad or set(saved) != set(now):
        raise ModelError(f"{source}: the backbone rebuilt from config.yaml differs from the run's (first: "
                         f"{(bad or sorted(set(saved) ^ set(now)))[0]}); other pretrained weights or timm version?")
    with torch.no_grad():
        for layer, w in bases.items():
            w.copy_(tensors[f"base/{layer}"])
        for k, p in params.items():
            p.copy_(tensors[f"global/{k}"])


def run_config(run_dir: Path) -> RunConfig:
    """The resolved config of a run directory (``config.yaml``)."""
    from .config import resolve

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return resolve(str(path), [])


def load_final(run_dir: Path, device: str | torch.device = "cpu") -> FedModel:
    """Rebuild a run's final global model from ``config.yaml`` and ``final_model.safetensors``.

    Raises:
        ConfigError: ``run_dir`` has no readable config.
        ModelError: no final model, a corrupted one, or a backbone that rebuilds differently.
    """
    from .model import build_model

    cfg = run_config(run_dir)
    path = run_dir / FINAL_MODEL
    tensors, meta = read_final(path)
    num_classes = int(meta.get("num_classes", tensors["global/head.weight"].shape[0]))
    model = build_model(cfg.model, cfg.lora, num_classes, cfg.data.image_size, cfg.seed)
    from .methods import METHODS

    METHODS.get(cfg.method)(cfg).attach(model)  # the tensors the method trains beyond LoRA and head
    load_into(model, tensors, meta, path)
    model.eval()
    return model.to(device)

