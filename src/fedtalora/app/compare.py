"""Several runs side by side (``fedtalora compare PATH...``): one table and one plot.

Each ``PATH`` is a run directory (it holds ``metrics.json``) or any directory tree containing run
directories, such as a sweep's output folder; every ``metrics.json`` below it is one run.

Runs are labelled by the config keys whose values differ between them (``seed`` and ``output.*``
excepted), e.g. ``fed.residual=false``; runs with the same label (seeds of one setting) form a group
whose mean and standard deviation are reported too. Written into ``OUT``:

``compare.csv``
    one row per run, numbers at full precision (the same values as each ``metrics.json``);
``compare.md``
    the per-run table and, when a setting has several runs, the per-setting table (mean ± std);
``compare.png``
    accuracy after each task per setting, F_AA / AIA / forgetting per setting, and the bytes per round.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .report import (
    ReportError,
    RunData,
    fmt,
    fmt_bytes,
    load_run,
    new_figure,
    require_matplotlib,
    save_figure,
)
from .report import seen_accuracy as run_seen_accuracy

COMPARE_PX = (1500, 500)
"""(width, height) in pixels of ``compare.png``."""

COLUMNS = (
    "run", "label", "method", "seed", "complete", "tasks_done", "num_tasks", "final_average_accuracy",
    "average_incremental_accuracy", "forgetting", "max_aggregation_error", "max_aggregation_error_rounding",
    "max_aggregation_error_accumulated_rounding", "trainable_parameters", "rounds",
    "uplink_bytes_per_round", "downlink_bytes_per_round", "uplink_bytes_total", "downlink_bytes_total",
    "wall_seconds",
)
"""Columns of ``compare.csv``, in order."""

GROUP_METRICS = ("final_average_accuracy", "average_incremental_accuracy", "forgetting")
IGNORED_KEYS = ("seed", "output.")
"""Config keys that never make runs different settings."""


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories named by ``paths`` (each a run directory or a tree containing some), in order.

    Raises:
        ReportError: a path does not exist or holds no run directory.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist")
        if (p / "metrics.json").is_file():
            runs = [p]
        elif p.is_dir():
            runs = sorted(m.parent for m in p.rglob("metrics.json"))
        else:
            runs = []
        if not runs:
            raise ReportError(f"no run directory (with metrics.json) in {p}")
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def labels(runs: Sequence[RunData]) -> list[str]:
    """A label per run: the config keys whose values differ among ``runs`` (seed and output excepted);
    the method name when no such key differs. A key missing from a run's config (an older version wrote
    it) counts with its current default."""
    # Keys a run's config.yaml lacks (written before the key existed) take today's defaults, as loading it would.
    defaults = _flatten(RunConfig().to_dict())
    flat = [{**defaults, **_flatten(r.config)} for r in runs]
    keys = sorted({k for f in flat for k in f if not k.startswith(IGNORED_KEYS[1]) and k != IGNORED_KEYS[0]})
    differing = [k for k in keys if len({_value(f.get(k)) for f in flat}) > 1]
    out = []
    for r, f in zip(runs, flat, strict=True):
        parts = [f"{k}={_value(f.get(k))}" for k in differing]
        out.append(" ".join(parts) if parts else (r.history.method or r.name))
    return out


def run_row(run: RunData, name: str, label: str) -> dict[str, Any]:
    """One row of the comparison: the run's headline numbers, straight from its metrics.json."""
    h = run.history
    return {
        "run": name,
        "label": label,
        "method": h.method or None,
        "seed": h.seed,
        "complete": bool(h.complete),
        "tasks_done": len(h.tasks),
        "num_tasks": run.num_tasks,
        "final_average_accuracy": h.final_average_accuracy,
        "average_incremental_accuracy": h.average_incremental_accuracy,
        "forgetting": h.forgetting,
        "max_aggregation_error": run.max_aggregation_error,
        "max_aggregation_error_rounding": run.max_of("aggregation_error_rounding"),
        "max_aggregation_error_accumulated_rounding": run.max_of("aggregation_error_accumulated_rounding"),
        "trainable_parameters": h.trainable_parameters,
        "rounds": len(run.rounds),
        "uplink_bytes_per_round": run.per_round("uplink_bytes"),
        "downlink_bytes_per_round": run.per_round("downlink_bytes"),
        "uplink_bytes_total": run.total("uplink_bytes"),
        "downlink_bytes_total": run.total("downlink_bytes"),
        "wall_seconds": h.wall_seconds,
    }


def _names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: paths relative to their common parent."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    return [str(p.relative_to(common)) or p.name for p in resolved]


@dataclass
class Group:
    """Runs of one setting (same label)."""

    label: str
    rows: list[dict[str, Any]]
    runs: list[RunData]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (None with fewer than two values) of a numeric column."""
        vals = [float(r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def group(rows: Sequence[dict[str, Any]], runs: Sequence[RunData]) -> list[Group]:
    groups: dict[str, Group] = {}
    for row, run in zip(rows, runs, strict=True):
        g = groups.setdefault(row["label"], Group(row["label"], [], []))
        g.rows.append(row)
        g.runs.append(run)
    return list(groups.values())


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    return buf.getvalue()


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _pm(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else (f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}")


def _error(relative: float | None, rounding: float | None) -> str:
    """The largest per-round error relative to the update, and in float32 roundings of the weight."""
    return fmt(relative, ".3g") + ("" if rounding is None else f" ({rounding:.2g})")


def markdown(rows: Sequence[dict[str, Any]], groups: Sequence[Group]) -> str:
    lines = ["# Comparison", "", f"{len(rows)} runs, {len(groups)} setting{'' if len(groups) == 1 else 's'}.", ""]
    lines += _md_table(
        ("run", "setting", "seed", "F_AA", "AIA", "forgetting", "max agg. error (u‖W‖)", "trainable params",
         "uplink/round", "downlink/round", "wall time"),
        [(r["run"] + ("" if r["complete"] else f" (incomplete: {r['tasks_done']}/{r['num_tasks']} tasks)"),
          r["label"], r["seed"], fmt(r["final_average_accuracy"]), fmt(r["average_incremental_accuracy"]),
          fmt(r["forgetting"]), _error(r["max_aggregation_error"], r["max_aggregation_error_rounding"]),
          "n/a" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}",
          fmt_bytes(r["uplink_bytes_per_round"]), fmt_bytes(r["downlink_bytes_per_round"]),
          f"{fmt(r['wall_seconds'], '.1f')} s") for r in rows],
    )
    if any(len(g.rows) > 1 for g in groups):
        lines += ["", "## Per setting (mean ± std over runs)", ""]
        lines += _md_table(("setting", "runs", "F_AA", "AIA", "forgetting", "wall time"),
                           [(g.label, len(g.rows), *(_pm(*g.stat(k)) for k in GROUP_METRICS),
                             f"{fmt(g.stat('wall_seconds')[0], '.1f')} s") for g in groups])
    lines += ["", "![comparison](compare.png)", ""]
    return "\n".join(lines)


def _short(label: str, width: int = 48) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def plot(groups: Sequence[Group], path: Path) -> Path:
    """Three panels: A_t per setting (mean), headline metrics per setting, bytes per round per setting."""
    import numpy as np

    fig, (ax_curve, ax_bar, ax_bytes) = new_figure(COMPARE_PX, ncols=3)
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for g, c in zip(groups, colors, strict=True):
        curves = [run_seen_accuracy(r) for r in g.runs]
        n = max((len(cv) for cv in curves), default=0)
        means = [statistics.fmean(cv[t] for cv in curves if len(cv) > t) for t in range(n)]
        ax_curve.plot(range(1, n + 1), means, marker="o", markersize=3, color=c, label=_short(g.label))
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_ylim(0, 1.02)
    ax_curve.set_xlabel("after training task t")
    ax_curve.set_ylabel("accuracy on all classes seen (A_t)")
    ax_curve.set_title("Accuracy after each task")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)

    x = np.arange(len(GROUP_METRICS))
    width = 0.8 / max(len(groups), 1)
    for i, (g, c) in enumerate(zip(groups, colors, strict=True)):
        stats = [g.stat(k) for k in GROUP_METRICS]
        spread = [s for _, s in stats] if any(s is not None for _, s in stats) else None  # bars only over seeds
        ax_bar.bar(x + (i - (len(groups) - 1) / 2) * width, [m if m is not None else math.nan for m, _ in stats],
                   width, yerr=None if spread is None else [s or 0.0 for s in spread], color=c, capsize=2)
    ax_bar.set_xticks(x, ["F_AA", "AIA", "forgetting"])
    ax_bar.set_ylim(0, 1.02)
    ax_bar.set_title("Final metrics (mean ± std over runs)")
    ax_bar.grid(alpha=0.3, axis="y")

    xb = np.arange(len(groups))
    up = [g.stat("uplink_bytes_per_round")[0] or 0.0 for g in groups]
    down = [g.stat("downlink_bytes_per_round")[0] or 0.0 for g in groups]
    ax_bytes.bar(xb - 0.2, up, 0.4, color=colors, label="uplink")
    ax_bytes.bar(xb + 0.2, down, 0.4, color=colors, alpha=0.45, hatch="//", label="downlink")
    ax_bytes.set_xticks(xb, [str(i + 1) for i in range(len(groups))])
    ax_bytes.set_xlabel("setting (colours as in the left panel)")
    ax_bytes.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))
    ax_bytes.set_title("Bytes per round (solid: uplink, hatched: downlink)")
    ax_bytes.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


@dataclass
class Comparison:
    """What :func:`compare` wrote and computed."""

    rows: list[dict[str, Any]]
    groups: list[Group]
    csv: Path
    markdown: Path
    plot: Path


def default_out(paths: Sequence[Path]) -> Path:
    """Where ``compare`` writes without ``--out``: a single sweep folder itself, else ``./comparison``."""
    if len(paths) == 1 and Path(paths[0]).is_dir() and not (Path(paths[0]) / "metrics.json").is_file():
        return Path(paths[0])
    return Path("comparison")


def compare(paths: Sequence[Path], out: Path | None = None) -> Comparison:
    """Compare the runs found under ``paths``; write ``compare.csv``, ``compare.md`` and ``compare.png``.

    Raises:
        ReportError: a path holds no run, a metrics.json is unreadable, or matplotlib is missing.
    """
    require_matplotlib()
    run_dirs = find_runs(paths)
    runs = [load_run(p) for p in run_dirs]
    rows = [run_row(r, n, lab) for r, n, lab in zip(runs, _names(run_dirs), labels(runs), strict=True)]
    groups = group(rows, runs)
    out = Path(out) if out is not None else default_out(paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create {out}: {e.strerror}") from None
    (out / "compare.csv").write_text(_csv(rows))
    (out / "compare.md").write_text(markdown(rows, groups))
    plot(groups, out / "compare.png")
    return Comparison(rows, groups, out / "compare.csv", out / "compare.md", out / "compare.png")
