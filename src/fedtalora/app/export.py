"""Export a run's final global model in two standard forms (``fedtalora export RUN_DIR``).

``OUT/`` (default ``RUN_DIR/export``) receives:

``model.safetensors``
    one merged weight file: the state dict of ``timm.create_model(backbone, num_classes=C, **timm_kwargs)``
    with, in every adapted layer, ``W = W_base + s B A`` (base with all residuals folded in, plus the
    LoRA product; the exact ``W0 + D + s B A`` rounded once when the model keeps the exact base) and the
    trained linear head as timm's ``head``.
``base_model.safetensors`` and ``adapter/``
    the same timm classifier with the residual-merged base weights (no LoRA), and a peft adapter folder
    (LoRA factors; the head as ``modules_to_save``) that ``PeftModel.from_pretrained`` loads on it.
``export.json``
    how to rebuild: backbone name, timm kwargs, number of classes, input size and normalisation, and
    the class order (head output ``i`` is original class ``class_order[i]``).

Loading, with ``info = json.load(open("OUT/export.json"))``::

    net = timm.create_model(info["backbone"], pretrained=False, **info["timm_kwargs"])
    net.load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"))         # merged, or:
    net.load_state_dict(safetensors.torch.load_file("OUT/base_model.safetensors"))
    net = peft.PeftModel.from_pretrained(net, "OUT/adapter")

Before returning, the export checks that both forms reproduce the run's final model's logits.

Nothing is written until the model is known to be usable (a final model with a NaN or an infinity, or
weights that overflow when merged, is refused first), and the files are written into a temporary folder
beside ``OUT``, self-checked there, and only then renamed to ``OUT``: a failed export leaves no half-written
folder, and a previous export in ``OUT`` stays until the new one is complete. ``OUT`` may be missing, empty,
or a previous export (only the files above); anything else in it is refused, never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import ConfigError, FedTaLoRAError, ModelError
from ..fed.history import load_history
from ..fed.rundir import load_final, run_config

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig
    from ..model import FedModel

logger = logging.getLogger(__name__)

FORMAT = "fedtalora-export-1"
MERGED = "model.safetensors"
BASE = "base_model.safetensors"
ADAPTER = "adapter"
INFO = "export.json"
CHECK_TOL = 1e-4
"""Relative and absolute tolerance of the self-check on logits (merging reorders float sums)."""


@dataclass
class Exported:
    """Paths written by :func:`export` and the self-check's largest logit difference per form."""

    out: Path
    merged: Path
    base: Path
    adapter: Path
    info: Path
    max_diff: dict[str, float]


def timm_state_dicts(model: FedModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, merged)`` state dicts of the plain timm classifier equivalent to ``model``.

    Keys are those of ``timm.create_model(backbone, num_classes=C)``: peft's wrapper keys are unwrapped
    (``blocks.0.attn.qkv.base_layer.weight`` -> ``blocks.0.attn.qkv.weight``), LoRA factors dropped, and
    the head added as ``head.*``. ``merged`` differs from ``base`` only in the adapted layers' weights,
    which hold ``W_base + s B A`` (:meth:`FedModel.exact_weight`: with the exact base, ``W0 + D + s B A``
    in float64 rounded once to float32).
    """
    layers = {p.layer.removeprefix("backbone."): p.layer for p in model.lora_pairs()}
    base: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for name, t in model.backbone.state_dict().items():
        if ".lora_" in name:
            continue
        key = name
        for short in layers:
            if name.startswith(f"{short}.base_layer."):
                key = f"{short}.{name.removeprefix(f'{short}.base_layer.')}"
        base[key] = t
        merged[key] = t
    for short, full in layers.items():
        merged[f"{short}.weight"] = model.exact_weight(full).to(torch.float32)  # float64, rounded once
    for k, t in model.head.state_dict().items():
        base[f"head.{k}"] = t
        merged[f"head.{k}"] = t

    def plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}

    return plain(base), plain(merged)


def timm_kwargs(cfg: RunConfig, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model`` that rebuild the classifier's architecture."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("img_size", cfg.data.image_size)
    kwargs["num_classes"] = num_classes
    return kwargs


def _require_timm(cfg: RunConfig) -> None:
    import timm

    if not timm.is_model(cfg.model.backbone):
        raise ConfigError(f"export supports timm backbones; model.backbone={cfg.model.backbone!r} is not one")


def _require_linear_head(cfg: RunConfig) -> None:
    from ..methods import METHODS

    if cfg.classifier.kind != "head":
        raise ConfigError(f"export: classifier.kind={cfg.classifier.kind!r} predicts by class prototypes, which a "
                          "plain timm classifier cannot reproduce (export a run with classifier.kind=head)")
    if not METHODS.get(cfg.method).predicts_with_head:
        raise ConfigError(f"export: method {cfg.method!r} computes its logits its own way (not backbone + linear "
                          "head), which a plain timm classifier cannot reproduce")


def build_classifier(cfg: RunConfig, num_classes: int) -> nn.Module:
    """A randomly initialised timm classifier of the run's architecture (weights come from the export)."""
    import timm

    _require_timm(cfg)
    return timm.create_model(cfg.model.backbone, pretrained=False, **timm_kwargs(cfg, num_classes))


def _peft_config(cfg: RunConfig, model: FedModel) -> Any:
    import re

    from peft import LoraConfig

    targets = [p.layer.removeprefix("backbone.") for p in model.lora_pairs()]
    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules="(" + "|".join(re.escape(t) for t in targets) + ")", modules_to_save=["head"])


def _save_adapter(cfg: RunConfig, model: FedModel, base_sd: dict[str, torch.Tensor], folder: Path) -> None:
    """Wrap a fresh classifier (base weights loaded) with peft, copy the run's LoRA and head in, save it."""
    from peft import get_peft_model

    from ..model import ADAPTER as NAME

    net = build_classifier(cfg, model.head.out_features)
    net.load_state_dict(base_sd)
    peft_model = get_peft_model(net, _peft_config(cfg, model), adapter_name=NAME)
    inner = peft_model.base_model.model
    ours = dict(model.backbone.named_modules())
    with torch.no_grad():
        for p in model.lora_pairs():
            short = p.layer.removeprefix("backbone.")
            src, dst = ours[short], inner.get_submodule(short)
            dst.lora_A[NAME].weight.copy_(src.lora_A[NAME].weight)
            dst.lora_B[NAME].weight.copy_(src.lora_B[NAME].weight)
            if float(dst.scaling[NAME]) != p.scaling:
                raise ModelError(f"peft scaling {dst.scaling[NAME]} of {short} differs from the run's {p.scaling}")
        head = inner.get_submodule("head").modules_to_save[NAME]
        head.load_state_dict(model.head.state_dict())
    peft_model.save_pretrained(str(folder))


def read_info(out: Path) -> dict[str, Any]:
    """``OUT/export.json``, read with the guarded reader and checked against its schema.

    Raises:
        ModelError: one line naming the file and the first malformed field.
    """
    from ..schema import EXPORT_INFO, load_checked

    return load_checked(Path(out) / INFO, EXPORT_INFO, error=ModelError)


def load_merged(out: Path) -> nn.Module:
    """The merged classifier of an export folder (timm model, eval mode)."""
    from safetensors.torch import load_file

    info = read_info(out)
    import timm

    net = timm.create_model(info["backbone"], pretrained=False, **info["timm_kwargs"])
    net.load_state_dict(load_file(str(out / MERGED)))
    return net.eval()


def load_adapter(out: Path) -> nn.Module:
    """The base classifier of an export folder with its peft adapter loaded (eval mode)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    info = read_info(out)
    import timm

    net = timm.create_model(info["backbone"], pretrained=False, **info["timm_kwargs"])
    net.load_state_dict(load_file(str(out / BASE)))
    return PeftModel.from_pretrained(net, str(out / ADAPTER)).eval()


def _class_order(run_dir: Path) -> list[int] | None:
    try:
        history = load_history(run_dir / "metrics.json")
        return [int(c) for task in history.tasks for c in task.classes]
    except FedTaLoRAError:
        return None


@torch.no_grad()
def _max_diff(reference: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    a, b = reference(x), other(x)
    if a.shape != b.shape:
        raise ModelError(f"export self-check: logits of shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if not torch.allclose(a, b, rtol=CHECK_TOL, atol=CHECK_TOL):
        raise ModelError(f"export self-check failed: logits differ by up to {(a - b).abs().max().item():.3g}")
    return float((a - b).abs().max())


def export(run_dir: Path, out: Path | None = None) -> Exported:
    """Write the merged file, the base + peft adapter and ``export.json`` for ``run_dir``'s final model.

    Raises:
        ConfigError: not a run directory, or a backbone that is not a timm model.
        ModelError: the run has no final model, or an exported form fails the self-check.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    cfg = run_config(run_dir)
    _require_timm(cfg)  # before the heavy work
    _require_linear_head(cfg)
    _check_out(out)
    model = load_final(run_dir)  # refuses a final model with non-finite weights
    C = model.head.out_features
    base_sd, merged_sd = timm_state_dicts(model)
    _check_finite(merged_sd, f"{run_dir}: the merged weights (W_base + s B A)")
    final, out = out, _staging(out)
    save_file(merged_sd, str(out / MERGED), metadata={"format": FORMAT, "fedtalora": __version__})
    save_file(base_sd, str(out / BASE), metadata={"format": FORMAT, "fedtalora": __version__})
    _save_adapter(cfg, model, base_sd, out / ADAPTER)
    info = {
        "format": FORMAT,
        "fedtalora": __version__,
        "run_dir": str(run_dir),
        "backbone": cfg.model.backbone,
        "timm_kwargs": timm_kwargs(cfg, C),
        "num_classes": C,
        "image_size": cfg.data.image_size,
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "class_order": _class_order(run_dir),
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "layers": [p.layer.removeprefix("backbone.")
                                                                           for p in model.lora_pairs()]},
        "files": {"merged": MERGED, "base": BASE, "adapter": ADAPTER},
    }
    try:
        (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
        x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(0))
        diffs = {"merged": _max_diff(model, load_merged(out), x), "adapter": _max_diff(model, load_adapter(out), x)}
        _publish(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the staging folder (gone already once published)
    out = final
    logger.info("exported %s to %s (self-check: max logit difference %s)", run_dir, out, diffs)
    return Exported(out, out / MERGED, out / BASE, out / ADAPTER, out / INFO, diffs)


_EXPORT_NAMES = (MERGED, BASE, ADAPTER, INFO)


def _check_out(out: Path) -> None:
    """``out`` is missing, an empty folder or a previous export (:class:`ConfigError` otherwise)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} exists and is not a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_NAMES)
        if other:
            raise ConfigError(f"export folder {out} holds {other[0]!r}, which an export does not write; choose "
                              "another --out (nothing there is replaced)")


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    from ..core.integrity import nonfinite_message

    why = nonfinite_message(tensors, source)
    if why is not None:
        raise ModelError(why)


def _staging(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same file system, so it can be renamed into place)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot create export folder {out}: {e.strerror or e}") from None
    return tmp


def _publish(staged: Path, out: Path) -> None:
    """Rename the checked export ``staged`` to ``out``, replacing a previous export there."""
    old = out.parent / f".{out.name}.{os.getpid()}.old.tmp"
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(staged, out)
    except OSError as e:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous export back
        raise ConfigError(f"cannot write export folder {out}: {e.strerror or e}") from None
    shutil.rmtree(old, ignore_errors=True)
