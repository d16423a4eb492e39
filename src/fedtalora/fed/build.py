"""Building a run from its config: the one factory of the server, the Flower clients and model loading.

* :func:`build_method` / :func:`build_classifier` -- the method (its options and a
  :class:`~fedtalora.methods.base.MethodContext`, never the whole config) and the prediction component;
* :func:`build_components` -- model + method (+ what the method attaches) + classifier, on a device: what
  the server, every Flower client and :func:`fedtalora.fed.rundir.load_final` build the same way;
* :func:`input_transform` -- batch preprocessing for the dataset's modality (tokenising text once);
* :class:`Experiment` -- the data, the scenario (class order, tasks) and every client's partition;
* :func:`prepare` -- all of the above for the server (:class:`Setup`); every input error surfaces here,
  before the run directory is written.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import RunConfig
from ..core.partition import class_counts, partition_task
from ..core.scenario import Scenario, make_scenario
from ..data import Dataset, ImageTransform, TextTransform, load_from_config, tokenize_split
from ..errors import ConfigError
from ..methods import METHODS, Method
from ..methods.base import MethodContext
from ..methods.classifier import CLASSIFIERS, Classifier
from ..model import FedModel, build_model
from ..model.prefix import compile_backbone, set_fused_attention
from ..seeding import numpy_rng
from .cache import FeatureCache

__all__ = ["Components", "Experiment", "Setup", "build_classifier", "build_components", "build_method", "check_config",
           "check_engine",
           "environment", "git_commit", "input_transform", "prepare", "resolve_device", "split_validation",
           "torch_threads"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device (``auto``: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def method_context(cfg: RunConfig) -> MethodContext:
    """The run settings a method may read."""
    return MethodContext(train=cfg.train, seed=cfg.seed, residual=cfg.fed.residual, max_length=cfg.data.max_length)


def build_method(cfg: RunConfig) -> Method:
    """The configured method (:class:`ConfigError` for an unknown method or bad ``method_options``)."""
    return METHODS.get(cfg.method)(cfg.method_options, method_context(cfg))


def build_classifier(cfg: RunConfig) -> Classifier:
    """The configured prediction component (``classifier.*``)."""
    return CLASSIFIERS.get(cfg.classifier.kind).from_config(cfg.classifier, seed=cfg.seed)


FLOWER_INSTALL_HINT = "pip install 'fedtalora[flower]'"
FLWR_VERSION = "1.42.0"


def check_engine(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` unless ``cfg.engine`` can run here with ``cfg.method``: Flower (and Ray for
    the simulation) installed (what a method's clients need travels in messages, :mod:`fedtalora.flower.protocol`;
    methods with ``runs_on_flower = False`` are refused)."""
    if cfg.engine == "inprocess":
        return
    if not METHODS.get(cfg.method).runs_on_flower:
        raise ConfigError(f"method={cfg.method} keeps server-side state its clients need that Flower messages "
                          f"do not carry yet; use engine=inprocess")
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(f"engine={cfg.engine} needs Flower {FLWR_VERSION}: {FLOWER_INSTALL_HINT}")
    if cfg.engine == "flower-sim" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"engine=flower-sim needs Flower's simulation extra (Ray): {FLOWER_INSTALL_HINT}")


def check_config(cfg: RunConfig) -> None:
    """What the config's own validation cannot check without the method registry: the method exists and its
    options are valid; the classifier exists (one-line :class:`ConfigError`)."""
    METHODS.get(cfg.method).parse_options(dict(cfg.method_options))
    CLASSIFIERS.get(cfg.classifier.kind)


@dataclass
class Components:
    """What computes: the model (with what the method attaches), the method and the classifier."""

    model: FedModel
    method: Method
    classifier: Classifier


def build_components(cfg: RunConfig, num_classes: int, device: torch.device | str = "cpu",
                     class_names: Sequence[str] | None = None) -> Components:
    """Model from ``model.*``/``lora.*`` with a head over ``num_classes``, the method attached, on ``device``.

    When the method changes the adapted layers' base weights (:attr:`Method.changes_base`: the ResWU residual,
    a merged LoRA) the model keeps them exactly (:meth:`FedModel.enable_exact_base`, ``docs/exactness.md``),
    from the weights as built: the server, every Flower client and a reloaded final model start from the same
    ``W0`` and an empty accumulator, before anything is restored into them.

    ``class_names``: the dataset's class names in head order (:meth:`Method.set_class_names`, before
    :meth:`Method.attach`); None where only the model is rebuilt.
    """
    method = build_method(cfg)
    classifier = build_classifier(cfg)
    model = build_model(cfg.model, cfg.lora, num_classes, cfg.data.image_size, cfg.seed)
    if class_names is not None:
        method.set_class_names(class_names)  # e.g. lander: label-text anchors
    method.attach(model)  # what the method trains beyond LoRA and head
    if method.changes_base:
        model.enable_exact_base()
    set_fused_attention(model.backbone, cfg.train.fused_attention)
    compile_backbone(model.backbone, cfg.train.compile)  # lazy: compiles at the first forward pass
    return Components(model.to(device), method, classifier)


def input_transform(cfg: RunConfig, dataset: Dataset, model: FedModel,
                    splits: tuple[str, ...] = ("train", "test")) -> Callable[..., Any]:
    """The batch preprocessing of ``dataset`` for ``model``; text ``splits`` are tokenised in place, once."""
    modality = dataset.modality
    if modality != model.spec.modality:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} is {modality} data but model.backbone="
                          f"{cfg.model.backbone!r} is a{'n' if model.spec.modality == 'image' else ''} "
                          f"{model.spec.modality} model")
    if modality == "text":
        tokenizer = model.backbone.tokenizer
        for name in splits:
            setattr(dataset, name, tokenize_split(getattr(dataset, name), tokenizer, cfg.data.max_length))
        return TextTransform()
    return ImageTransform(cfg.data.image_size, model.spec.mean, model.spec.std)


@dataclass
class Experiment:
    """The fixed ingredients of a run, built once from the config."""

    cfg: RunConfig
    dataset: Dataset
    scenario: Scenario
    partitions: list[list[np.ndarray]]
    """``partitions[t][k]``: indices into the training split held by client ``k`` during task ``t``."""
    train_targets: np.ndarray
    """Head-output label (position in the class order) of every training sample."""
    test_targets: np.ndarray
    test_task: np.ndarray
    """Task index of every test sample."""
    validation: list[list[np.ndarray]] = field(default_factory=list)
    """``validation[t][k]``: client ``k``'s held-out samples of task ``t`` (``data.val_fraction``; empty
    without a validation split). Never in ``partitions``: they are not trained on."""

    def validation_indices(self, t: int) -> np.ndarray:
        """Every client's validation samples of tasks ``0..t`` (empty without a validation split)."""
        parts = [ix for task in self.validation[: t + 1] for ix in task]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @classmethod
    def build(cls, cfg: RunConfig) -> Experiment:
        data = load_from_config(cfg.data, cfg.seed)
        order_rng = numpy_rng(cfg.seed, "class-order")
        scenario = make_scenario(data.num_classes, cfg.scenario.num_tasks, order_rng, cfg.scenario.class_order)
        train_targets = scenario.remap(data.train.labels)
        test_targets = scenario.remap(data.test.labels)
        task_of_class = np.empty(data.num_classes, dtype=np.int64)
        for task in scenario.tasks:
            task_of_class[list(task.classes)] = task.index
        partitions = []
        p = cfg.partition
        for task in scenario.tasks:
            idx = np.flatnonzero(task_of_class[data.train.labels] == task.index)
            parts = partition_task(
                p.kind, data.train.labels[idx], cfg.fed.num_clients, numpy_rng(cfg.seed, "partition", task.index),
                alpha=p.alpha, beta=p.beta, min_samples=p.min_samples, max_redraws=p.max_redraws,
            )
            partitions.append([idx[part] for part in parts])
        validation: list[list[np.ndarray]] = []
        if cfg.data.val_fraction > 0:
            partitions, validation = split_validation(partitions, cfg.data.val_fraction, cfg.seed)
        return cls(cfg, data, scenario, partitions, train_targets, test_targets, task_of_class[data.test.labels],
                   validation)

    def partitions_json(self) -> dict[str, Any]:
        """``partitions.json``: per task, per client, the sample indices and class counts (the manifest Flower
        clients read their samples from)."""
        labels = self.dataset.train.labels
        tasks = []
        for task, parts in zip(self.scenario.tasks, self.partitions, strict=True):
            counts = class_counts(labels, parts)
            tasks.append({
                "task": task.index,
                "classes": [int(c) for c in task.classes],
                "clients": [
                    {"client": k, "num_samples": int(len(ix)), "indices": ix.tolist(),
                     "class_counts": {str(c): int(n) for c, n in sorted(cc.items())}}
                    for k, (ix, cc) in enumerate(zip(parts, counts, strict=True))
                ],
            })
        return {"dataset": self.dataset.name, "split": "train", "num_clients": self.cfg.fed.num_clients,
                "partition": self.cfg.to_dict()["partition"], "tasks": tasks}


def split_validation(partitions: list[list[np.ndarray]], fraction: float,
                     seed: int) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """``(train, validation)``: every client's samples of every task split at random (from ``seed``, task and
    client), ``round(fraction * n)`` held out of ``n``, at least one sample kept for training. Each part keeps
    the client's original order."""
    train: list[list[np.ndarray]] = []
    val: list[list[np.ndarray]] = []
    for t, parts in enumerate(partitions):
        train.append([])
        val.append([])
        for k, ix in enumerate(parts):
            n_val = min(int(round(fraction * len(ix))), max(len(ix) - 1, 0))
            held = np.zeros(len(ix), dtype=bool)
            held[numpy_rng(seed, "validation", t, k).choice(len(ix), n_val, replace=False)] = True
            train[t].append(ix[~held])
            val[t].append(ix[held])
    return train, val


def environment(device: torch.device | str) -> dict[str, Any]:
    """What computed a run (``metrics.json``'s ``environment``): versions, platform, device, git commit."""
    return {"fedtalora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), **provenance(device)}


def git_commit(path: Path | None = None) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` of the checkout holding ``path`` (default: this
    package's source); ``{}`` when it is not in a git checkout or git is missing."""
    where = path if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True, stdin=subprocess.DEVNULL).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True,
                                stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    if len(sha) != 40:
        return {}
    return {"git_commit": sha, "git_dirty": bool(status.strip())}


def provenance(device: torch.device | str) -> dict[str, Any]:
    """Device, library versions and git commit, for ``metrics.json``'s ``environment``."""
    from importlib import metadata

    import numpy

    out: dict[str, Any] = {"device": str(device)}
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(dev)
    else:
        out["device_name"] = platform.processor() or platform.machine()
    versions: dict[str, str] = {"numpy": numpy.__version__}
    for name in ("timm", "peft", "transformers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out.update(versions)
    out.update(git_commit())
    return out


@dataclass
class Setup:
    """Everything built from the config before the first round: data, partitions, model, method, classifier."""

    cfg: RunConfig
    exp: Experiment
    model: FedModel
    method: Method
    classifier: Classifier
    transform: Callable[..., Any]
    """Batch preprocessing: :class:`~fedtalora.data.ImageTransform` or :class:`~fedtalora.data.TextTransform`."""
    device: torch.device
    cache: FeatureCache | None = None
    """Cached activations of the frozen layers (``train.feature_cache``; None: off)."""


def prepare(cfg: RunConfig) -> Setup:
    """Load data, draw the scenario and partitions, build the model; raises on any bad input."""
    device = resolve_device(cfg.train.device)
    check_config(cfg)
    check_engine(cfg)
    exp = Experiment.build(cfg)
    parts = build_components(cfg, exp.scenario.num_classes, device, class_names=exp.dataset.names_of(
        [c for task in exp.scenario.tasks for c in task.classes]))  # head order
    transform = input_transform(cfg, exp.dataset, parts.model)
    cache = None if cfg.train.feature_cache == "none" else FeatureCache(parts.model, parts.method, transform,
                                                                       cfg.train, device)
    return Setup(cfg, exp, parts.model, parts.method, parts.classifier, transform, device, cache)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (``train.threads``; 0: unchanged) inside, restored afterwards."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
