"""The text the CLI prints at the end of a run: what ran, the metrics, and precomputed reference lines.

Pure formatting, no I/O besides :func:`find_reference` (which reads the package's reference files):
:func:`format_summary` turns a run's metrics (``metrics.json``), its resolved config (``RunConfig.to_dict()``)
and a few facts about its data (:class:`DataFacts`) into the summary.

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

__all__ = ["DataFacts", "IGNORED_KEYS", "comparable_config", "data_facts", "describe_run", "find_reference",
           "format_summary", "metric_rows", "reference_rows"]

REFERENCE_SUFFIX = ".reference.json"
IGNORED_KEYS = ("output", "engine", "flower", "train.threads", "train.device")
"""Config keys that do not change what a run computes (on one device): a run and a reference that differ only
there are the same experiment."""

_MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2"}
_DATA_NAMES = {
    "banking77-demo": "Banking77 subset shipped with fedtalora (CC BY 4.0)",
    "banking77": "Banking77",
    "clinc150": "CLINC150",
    "digits": "scikit-learn digits (8x8)",
    "cifar100": "CIFAR-100",
}


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


def describe_run(cfg: dict[str, Any], data: DataFacts, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows saying what ran: model, data, federation, method (from the resolved config as a dict)."""
    m, lora, fed, train, scen = cfg["model"], cfg["lora"], cfg["fed"], cfg["train"], cfg["scenario"]
    backbone = m["backbone"]
    name = _MODEL_NAMES.get(backbone, backbone[3:] if backbone.startswith("hf:") else backbone)
    pre = "pre-trained, frozen" if metrics.get("pretrained") else "NOT pretrained: random initialisation"
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
    trains_lora = method not in ("head-only", "prompt")
    what = method
    if trains_lora:
        where = "layers" if data.modality == "text" else "blocks"
        what += (f", LoRA rank {lora['rank']} in {where} {_blocks(lora['blocks'])} ({', '.join(lora['targets'])}), "
                 f"residual {'on' if fed['residual'] else 'off'}")
    kind = cfg.get("classifier", {}).get("kind", "head")
    what += "; classifier: " + {"head": "linear head", "prototype": "nearest class prototype"}.get(kind, kind)
    rows.append(("method", what))
    return rows


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def metric_rows(m: dict[str, Any], extra_after_faa: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The metrics table of a finished run (``extra_after_faa``: rows printed right below F_AA)."""
    n = max(len(m["rounds"]), 1)
    fgt = m.get("forgetting")
    pre = "pretrained" if m["pretrained"] else "NOT pretrained: random initialisation"
    rows = [
        ("backbone", f"{m['backbone']} ({pre})"),
        ("final average accuracy (F_AA)", f"{m['final_average_accuracy']:.4f}"),
        *extra_after_faa,
        ("average incremental accuracy (AIA)", f"{m['average_incremental_accuracy']:.4f}"),
        ("forgetting", "n/a (one task)" if fgt is None else f"{fgt:.4f}"),
        ("max aggregation error", f"{m['max_aggregation_error']:.2e}"),
        *([("naive averaging would lose (mean / max)",
            f"{m['naive_aggregation_loss_mean']:.2e} / {m['naive_aggregation_loss_max']:.2e}")]
          if m.get("naive_aggregation_loss_mean") is not None else []),
        ("uplink per round", _fmt_bytes(m["uplink_bytes_total"] / n)),
        ("downlink per round", _fmt_bytes(m["downlink_bytes_total"] / n)),
        ("trainable parameters", f"{m['trainable_parameters']:,}"),
        ("wall time", f"{m['wall_seconds']:.1f} s"),
    ]
    rel = m.get("reliability") or {}
    if any(rel.values()):
        rows.append(("dropped / corrupted / rejected / skipped rounds",
                     f"{rel['dropped_clients']} / {rel['corrupted_updates']} / {rel['rejected_updates']} / "
                     f"{rel['skipped_rounds']}"))
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
    root = folder if folder is not None else resources.files("fedtalora") / "presets"
    want = comparable_config(cfg)
    try:
        files = sorted((p for p in root.iterdir() if p.name.endswith(REFERENCE_SUFFIX)), key=lambda p: p.name)
    except OSError:
        return None
    for path in files:
        try:
            ref = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(ref, dict) and comparable_config(ref.get("config", {})) == want:
            return ref
    return None


def reference_rows(reference: dict[str, Any] | None) -> list[tuple[str, str]]:
    """One row per reference line: ``  <label> (precomputed)`` -> its F_AA (and AIA)."""
    if not reference:
        return []
    rows = []
    for line in reference.get("lines", []):
        faa, aia = line.get("final_average_accuracy"), line.get("average_incremental_accuracy")
        if faa is None:
            continue
        value = f"{faa:.4f}" + ("" if aia is None else f"  (AIA {aia:.4f})")
        rows.append((f"  {line['label']} (precomputed)", value))
    return rows


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str] | None = None) -> list[str]:
    width = max(len(k) for k, _ in [*rows, *([header] if header else [])])
    out = []
    if header:
        out += [f"{header[0]:{width}s}  {header[1]}", f"{'-' * width}  {'-' * 12}"]
    return out + [f"{k:{width}s}  {v}" for k, v in rows]


def format_summary(metrics: dict[str, Any], run_dir: Path | str, cfg: dict[str, Any] | None = None,
                   data: DataFacts | None = None, reference: dict[str, Any] | None = None) -> str:
    """The whole end-of-run text: what ran (when ``cfg`` and ``data`` are given), the metrics with any
    reference lines below F_AA, the reference's provenance, and the run directory."""
    lines: list[str] = []
    if cfg is not None and data is not None:
        lines += _table(describe_run(cfg, data, metrics)) + [""]
    refs = reference_rows(reference)
    lines += _table(metric_rows(metrics, refs), header=("metric", "value"))
    if refs and reference is not None and reference.get("source"):
        lines.append(f"(precomputed: {reference['source']})")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)
