"""The text the CLI prints at the end of a run: what ran, the metrics, and precomputed reference lines.

Pure formatting, no I/O besides :func:`find_reference` (which reads the package's reference files):
:func:`format_summary` turns a run's :class:`~fedtalora.fed.history.History`, its resolved config
(``RunConfig.to_dict()``) and a few facts about its data (:class:`DataFacts`) into the summary.

**Reference lines.** A shipped preset may come with ``presets/<name>.reference.json`` (written by
``benchmarks/demo_reference.py``): the resolved config it was measured with and, for the same data and seed,
the results of related runs -- e.g. the frozen-backbone baseline and the centralized ceiling -- too slow to
compute inside the run itself. A run whose config equals the reference's (ignoring where it writes and how
many threads it uses: :data:`IGNORED_KEYS`) prints them beside its F_AA, labelled as precomputed; any other
run prints none, so a line is never shown next to a run it does not describe.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..fed.history import History
from ..fed.screening import screening_summary

__all__ = ["DataFacts", "IGNORED_KEYS", "comparable_config", "data_facts", "describe_run", "find_reference",
           "format_summary", "metric_rows", "reference_rows"]

REFERENCE_SUFFIX = ".reference.json"
IGNORED_KEYS = ("output", "engine", "flower", "train.threads", "train.device", "train.feature_cache_dir",
                "train.feature_cache_disk_mb")
"""Config keys that do not change what a run computes (on one device): a run and a reference that differ only
there are the same experiment."""


def _with_defaults(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` over ``defaults``, section by section: a key the reference predates takes today's default (options
    are added with defaults that keep the behaviour they had before they existed)."""
    out = dict(defaults)
    for key, value in cfg.items():
        base = defaults.get(key)
        out[key] = _with_defaults(value, base) if isinstance(value, dict) and isinstance(base, dict) \
            and key != "method_options" and key != "kwargs" else value
    return out

_MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2"}
_DATA_NAMES = {
    "banking77-demo": "Banking77 subset shipped with fedtalora (CC BY 4.0)",
    "banking77": "Banking77",
    "clinc150": "CLINC150",
    "digits": "scikit-learn digits (8x8)",
    "cifar100": "CIFAR-100",
}
_CLASSIFIERS = {"head": "linear head", "prototype": "nearest class prototype",
                "analytic": "exact federated ridge (analytic)"}


@dataclass(frozen=True)
class DataFacts:
    """What the summary needs to know about a run's data (after ``data.train_per_class`` subsetting)."""

    name: str
    num_classes: int
    train_counts: tuple[int, ...]
    """Training samples of each class."""
    test_counts: tuple[int, ...]
    """Test samples of each class."""
    modality: str = "image"


def data_facts(name: str, num_classes: int, train_labels: Sequence[int], test_labels: Sequence[int],
               modality: str = "image") -> DataFacts:
    """:class:`DataFacts` from the class ids of the training and test samples."""
    train, test = Counter(int(y) for y in train_labels), Counter(int(y) for y in test_labels)
    return DataFacts(name, num_classes, tuple(train.get(c, 0) for c in range(num_classes)),
                     tuple(test.get(c, 0) for c in range(num_classes)), modality)


def _counts(counts: Sequence[int], what: str) -> str:
    lo, hi = min(counts, default=0), max(counts, default=0)
    return f"{lo} {what}" if lo == hi else f"{lo}-{hi} {what}"


def _blocks(blocks: Sequence[int]) -> str:
    b = sorted(blocks)
    if len(b) > 1 and b == list(range(b[0], b[-1] + 1)):
        return f"{b[0]}-{b[-1]}"
    return ", ".join(str(i) for i in b)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _partition(p: dict[str, Any]) -> str:
    if p["kind"] == "dirichlet":
        return f"Dirichlet(beta={p['beta']:g}) non-IID"
    if p["kind"] == "quantity":
        return f"quantity skew ({p['alpha']} classes per client and task)"
    return "IID"


def describe_run(cfg: dict[str, Any], data: DataFacts, pretrained: bool) -> list[tuple[str, str]]:
    """Rows saying what ran: model, data, federation, method (from the resolved config as a dict)."""
    m, lora, fed, train, scen = cfg["model"], cfg["lora"], cfg["fed"], cfg["train"], cfg["scenario"]
    backbone = m["backbone"]
    name = _MODEL_NAMES.get(backbone, backbone[3:] if backbone.startswith("hf:") else backbone)
    pre = "pre-trained, frozen" if pretrained else "NOT pretrained: random initialisation"
    unit = "utterances" if data.modality == "text" else "samples"
    per_task = data.num_classes // max(scen["num_tasks"], 1)
    order = "random" if scen["class_order"] == "random" else "natural"
    epochs, rounds = train["local_epochs"], fed["rounds_per_task"]
    rows = [
        ("model", f"{name} ({pre})"),
        ("data", f"{_DATA_NAMES.get(data.name, data.name)}: {data.num_classes} classes, "
                 f"{_counts(data.train_counts, 'train')} / {_counts(data.test_counts, 'test')} {unit} per class; "
                 f"{scen['num_tasks']} tasks x {per_task} classes ({order} order)"),
        ("federation", f"{fed['num_clients']} clients ({fed['clients_per_round']} per round), "
                       f"{_partition(cfg['partition'])}; {_plural(rounds, 'round')} x {_plural(epochs, 'local epoch')} "
                       "per task"),
    ]
    method = cfg["method"]
    what = method
    if method not in ("head-only", "prompt"):
        where = "layers" if data.modality == "text" else "blocks"
        what += (f", LoRA rank {lora['rank']} in {where} {_blocks(lora['blocks'])} ({', '.join(lora['targets'])}), "
                 f"residual {'on' if fed['residual'] else 'off'}")
    kind = cfg.get("classifier", {}).get("kind", "head")
    what += "; classifier: " + _CLASSIFIERS.get(kind, kind)
    rows.append(("method", what))
    return rows


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _exactness(relative: float | None, rounding: float | None, of: str) -> str:
    """An error of the global model as the summary shows it: relative, and in float32 roundings of the weight
    (``u ||W||``, ``u = 2**-24``; up to 2 is float32 resolution and nothing more)."""
    if relative is None:
        return "n/a"
    text = f"{relative:.2e} of {of}"
    return text if rounding is None else f"{text} = {rounding:.2g} float32 roundings of the weight"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def metric_rows(h: History, max_update_norm: float | None = None,
                extra_after_faa: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The metrics table of a run (``max_update_norm``: the config's ``fed.max_update_norm``, for the
    screening row; None: no such row; ``extra_after_faa``: rows printed right below F_AA)."""
    n = max(len(h.rounds), 1)
    pre = "pretrained" if h.pretrained else "NOT pretrained: random initialisation"
    rows = [
        ("backbone", f"{h.backbone} ({pre})"),
        ("final average accuracy (F_AA)", _fmt(h.final_average_accuracy, ".4f")),
        *extra_after_faa,
        ("average incremental accuracy (AIA)", _fmt(h.average_incremental_accuracy, ".4f")),
        ("forgetting", "n/a (one task)" if h.forgetting is None else f"{h.forgetting:.4f}"),
        ("max aggregation error", _exactness(h.max_aggregation_error, h.max_aggregation_error_rounding,
                                             "the update")),
        *([("max error since the start", _exactness(h.max_aggregation_error_accumulated,
                                                    h.max_aggregation_error_accumulated_rounding,
                                                    "the accumulated update"))]
          if h.max_aggregation_error_accumulated is not None else []),
        *([("naive averaging would lose (mean / max)",
            f"{h.naive_aggregation_loss_mean:.2e} / {h.naive_aggregation_loss_max:.2e}")]
          if h.naive_aggregation_loss_mean is not None and h.naive_aggregation_loss_max is not None else []),
        ("uplink per round", _fmt_bytes((h.uplink_bytes_total or 0) / n)),
        ("downlink per round", _fmt_bytes((h.downlink_bytes_total or 0) / n)),
        ("trainable parameters", _fmt(h.trainable_parameters, ",")),
        ("wall time", f"{h.wall_seconds or 0.0:.1f} s"),
        *([("update screening", screening_summary(max_update_norm, h))] if max_update_norm is not None else []),
    ]
    rel = h.reliability or {}
    if any(rel.values()):
        rows.append(("dropped / corrupted / rejected / skipped rounds",
                     " / ".join(str(rel.get(k, "?")) for k in ("dropped_clients", "corrupted_updates",
                                                               "rejected_updates", "skipped_rounds"))))
    return rows


def comparable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without :data:`IGNORED_KEYS` (a JSON round trip, so tuples and lists compare equal)."""
    out = json.loads(json.dumps(cfg))
    for key in IGNORED_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def find_reference(cfg: dict[str, Any], folder: Path | None = None) -> dict[str, Any] | None:
    """The shipped reference whose config equals ``cfg`` (up to :data:`IGNORED_KEYS`), or None.

    ``folder``: where the ``*.reference.json`` files are (default: the package's presets). Unreadable
    files are skipped: a reference is decoration, never a reason for a finished run to fail."""
    root: Any = folder if folder is not None else resources.files("fedtalora") / "presets"
    want = comparable_config(cfg)
    defaults = RunConfig().to_dict()
    try:
        files = sorted((p for p in root.iterdir() if p.name.endswith(REFERENCE_SUFFIX)), key=lambda p: p.name)
    except OSError:
        return None
    for path in files:
        try:
            if path.is_file():
                ref = json.loads(path.read_bytes()[:1_000_000].decode("utf-8"))
            else:
                continue
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(ref, dict) and isinstance(ref.get("config"), dict) \
                and comparable_config(_with_defaults(ref["config"], defaults)) == want:
            return ref
    return None


def reference_rows(reference: dict[str, Any] | None) -> list[tuple[str, str]]:
    """One row per reference line: ``  <label> (precomputed)`` -> its F_AA (and AIA)."""
    if not reference:
        return []
    rows = []
    for line in reference.get("lines", []):
        if not isinstance(line, dict):
            continue
        faa, aia = line.get("final_average_accuracy"), line.get("average_incremental_accuracy")
        if not isinstance(faa, (int, float)):
            continue
        value = f"{faa:.4f}" + ("" if not isinstance(aia, (int, float)) else f"  (AIA {aia:.4f})")
        rows.append((f"  {line.get('label', '?')} (precomputed)", value))
    return rows


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str] | None = None) -> list[str]:
    width = max(len(k) for k, _ in [*rows, *([header] if header else [])])
    out = []
    if header:
        out += [f"{header[0]:{width}s}  {header[1]}", f"{'-' * width}  {'-' * 12}"]
    return out + [f"{k:{width}s}  {v}" for k, v in rows]


def format_summary(h: History, run_dir: Path | str, cfg: dict[str, Any] | None = None,
                   data: DataFacts | None = None, reference: dict[str, Any] | None = None) -> str:
    """The whole end-of-run text: what ran (when ``cfg`` and ``data`` are given), the metrics with any
    reference lines below F_AA, the reference's provenance, and the run directory."""
    lines: list[str] = []
    if cfg is not None and data is not None:
        lines += _table(describe_run(cfg, data, h.pretrained)) + [""]
    refs = reference_rows(reference)
    norm = cfg["fed"]["max_update_norm"] if cfg is not None else None
    lines += _table(metric_rows(h, norm, refs), header=("metric", "value"))
    if refs and reference is not None and reference.get("source"):
        lines.append(f"(precomputed: {reference['source']})")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)
