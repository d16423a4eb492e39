"""A run's report: ``report.md`` and PNG plots from its ``metrics.json`` (``fedtalora report RUN_DIR``).

Plots (matplotlib, drawn off-screen through :class:`matplotlib.figure.Figure`, no pyplot and no
display needed; every PNG has the fixed pixel size in :data:`PLOT_PX`):

``accuracy_matrix.png``
    heatmap of ``acc[t][j]``: accuracy on task ``j``'s test data after training task ``t``;
``accuracy.png``
    accuracy after each task on all classes seen so far (``A_t``) and on each task alone, whose fall
    from its first value is the forgetting;
``aggregation_error.png``
    the error of the global model on a log scale, per round and since the start of the run: relative to the
    clients' averaged update (with what naive averaging of the factors would lose; exact zeros drawn at the
    bottom and counted) and, below, in float32 roundings of the weight (``u ||W||``) against the bound of
    float32 resolution;
``communication.png``
    uplink and downlink bytes per round (and the residual's factored size).

matplotlib is an optional dependency: ``pip install fedtalora[report]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import safeio
from ..errors import FedTaLoRAError
from ..fed.history import History, RoundRecord, load_history

REPORT_HINT = "pip install fedtalora[report]"
DPI = 100
PLOT_PX = (800, 500)
"""(width, height) in pixels of every PNG of a run report."""

PLOTS = ("accuracy_matrix.png", "accuracy.png", "aggregation_error.png", "communication.png")


class ReportError(FedTaLoRAError):
    """A run directory cannot be reported on (missing or malformed metrics), or matplotlib is missing."""


def require_matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or a one-line :class:`ReportError` saying what to install."""
    try:
        from matplotlib import figure
    except ImportError:
        raise ReportError(f"plots need matplotlib: {REPORT_HINT}") from None
    return figure


def new_figure(size_px: tuple[int, int] = PLOT_PX, ncols: int = 1) -> tuple[Any, Any]:
    """A pyplot-free figure of exactly ``size_px`` pixels and its axes."""
    figure = require_matplotlib()
    fig = figure.Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig: Any, path: Path) -> Path:
    fig.savefig(str(path), dpi=DPI, format="png")  # never bbox_inches="tight": it changes the size
    return path


def fmt_bytes(n: float | None) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units)."""
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return format(v, spec)


# --- reading a run --------------------------------------------------------------------------------


@dataclass
class RunData:
    """What a report needs from a run directory."""

    path: Path
    history: History
    config: dict[str, Any]
    """``config.yaml`` as a plain dict (``{}`` if absent)."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rounds(self) -> list[RoundRecord]:
        return list(self.history.rounds)

    @property
    def num_tasks(self) -> int:
        """Tasks of the scenario (from the config, else the accuracy matrix's width)."""
        t = self.config.get("scenario", {}).get("num_tasks")
        if isinstance(t, int):
            return t
        acc = self.history.accuracy_matrix
        return len(acc[0]) if acc else len(self.history.tasks)

    @property
    def rounds_per_task(self) -> int | None:
        r = self.config.get("fed", {}).get("rounds_per_task")
        return r if isinstance(r, int) else None

    def total(self, key: str) -> int:
        """Sum of a per-round byte count over the rounds run so far."""
        return int(sum(getattr(r, key) or 0 for r in self.rounds))

    def per_round(self, key: str) -> float | None:
        """Mean of a per-round byte count (None without rounds)."""
        n = len(self.rounds)
        return self.total(key) / n if n else None

    @property
    def max_aggregation_error(self) -> float | None:
        return self.max_of("aggregation_error")

    def max_of(self, key: str) -> float | None:
        """The largest value of a per-round field over the rounds run so far (None where none has one)."""
        values = [getattr(r, key) for r in self.rounds if getattr(r, key) is not None]
        return max(values) if values else None


def load_run(run_dir: Path) -> RunData:
    """Read ``metrics.json`` (required) and ``config.yaml`` (optional) of a run directory.

    Raises:
        ReportError: one line naming the directory, when metrics.json is missing, unreadable, not valid JSON
            or not a fedtalora metrics file (:func:`~fedtalora.fed.history.load_history`).
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    if not path.exists():
        raise ReportError(f"{run_dir} is not a run directory (no metrics.json)")
    history = load_history(path, error=ReportError)  # regular file, UTF-8, size/depth limits, History's schema
    config: dict[str, Any] = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = safeio.read_yaml(cfg_path)
            config = loaded if isinstance(loaded, dict) else {}
        except FedTaLoRAError:  # the config only labels the report; the metrics are what it shows
            config = {}
    return RunData(run_dir, history, config)


def accuracy_matrix(run: RunData) -> list[list[float | None]]:
    """Rows of the accuracy matrix evaluated so far, each padded with None to the number of tasks."""
    T = run.num_tasks
    rows = [list(r) for r in run.history.accuracy_matrix]
    return [r + [None] * (T - len(r)) for r in rows]


def seen_accuracy(run: RunData) -> list[float]:
    """``A_t`` for the tasks evaluated so far."""
    seen = run.history.seen_accuracy
    if isinstance(seen, list):
        return [float(v) for v in seen]
    return [float(t.seen_accuracy) for t in run.history.tasks if t.seen_accuracy is not None]


# --- plots ----------------------------------------------------------------------------------------


def plot_accuracy_matrix(run: RunData, path: Path) -> Path:
    import numpy as np

    acc = accuracy_matrix(run)
    T = run.num_tasks
    fig, ax = new_figure()
    data = np.full((max(len(acc), 1), max(T, 1)), np.nan)
    for t, row in enumerate(acc):
        for j, v in enumerate(row):
            if v is not None:
                data[t, j] = v
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy")
    if data.size <= 144:
        for (t, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, t, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
    ax.set_xticks(range(data.shape[1]), [str(j + 1) for j in range(data.shape[1])])
    ax.set_yticks(range(data.shape[0]), [str(t + 1) for t in range(data.shape[0])])
    ax.set_xlabel("evaluated on the test data of task j")
    ax.set_ylabel("after training task t")
    ax.set_title("Accuracy matrix acc[t][j]" + ("" if acc else " (no task finished yet)"))
    return save_figure(fig, path)


def plot_accuracy(run: RunData, path: Path) -> Path:
    acc = accuracy_matrix(run)
    seen = seen_accuracy(run)
    fig, ax = new_figure()
    T = len(acc)
    for j in range(T):
        xs = [t + 1 for t in range(j, T) if acc[t][j] is not None]
        ys = [acc[t][j] for t in range(j, T) if acc[t][j] is not None]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, alpha=0.8, label=f"task {j + 1}" if T <= 10 else None)
    if seen:
        ax.plot(range(1, len(seen) + 1), seen, color="black", linewidth=2.5, marker="s",
                label="all classes seen so far (A_t)")
    ax.set_xlim(0.5, max(run.num_tasks, 1) + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, max(run.num_tasks, 1) + 1))
    ax.set_xlabel("after training task t")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy after each task (per task: forgetting)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="lower left", ncol=2)
    return save_figure(fig, path)


def _decades(values: Sequence[float]) -> tuple[float, float]:
    """Log-axis limits on whole decades around positive ``values``, at least two decades wide."""
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi / lo < 100:
        lo, hi = lo / 10, hi * 10 if hi / lo < 10 else hi
    return lo, hi


def _task_boundaries(ax: Any, run: RunData) -> None:
    R = run.rounds_per_task
    if R is None:
        return
    for t in range(1, run.num_tasks):
        ax.axvline(t * R + 0.5, color="grey", linestyle=":", linewidth=0.8)


def plot_aggregation_error(run: RunData, path: Path) -> Path:
    rounding = [(i + 1, r.aggregation_error_rounding, r.aggregation_error_accumulated_rounding)
                for i, r in enumerate(run.rounds) if r.aggregation_error is not None]
    if not any(x is not None for _, *xs in rounding for x in xs):  # a run from before the truthful metrics
        fig, ax = new_figure()
        _relative_errors(ax, run)
        return save_figure(fig, path)
    figure = require_matplotlib()
    fig = figure.Figure(figsize=(PLOT_PX[0] / DPI, PLOT_PX[1] / DPI), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _relative_errors(top, run, xlabel=False)
    for col, label, style in ((1, "per round", "-"), (2, "since the start", "--")):
        pts = [(x, v[col - 1]) for x, *v in rounding if v[col - 1] is not None and v[col - 1] > 0]
        if pts:
            bottom.plot([x for x, _ in pts], [e for _, e in pts], linestyle=style, marker="o", markersize=2,
                        linewidth=1, label=label)
    bottom.axhline(2.0, color="tab:red", linestyle=":", linewidth=1, label="float32 resolution (2 u||W||)")
    bottom.set_yscale("log")
    values = [v for _, *vs in rounding for v in vs if v is not None and v > 0]
    bottom.set_ylim(*_decades([*values, 2.0]))
    _task_boundaries(bottom, run)
    bottom.set_xlabel("round (over all tasks; dotted lines: task boundaries)")
    bottom.set_ylabel("in u ||W|| (log)")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(fontsize=7)
    return save_figure(fig, path)


def _relative_errors(ax: Any, run: RunData, *, xlabel: bool = True) -> None:
    """The per-round error relative to the update (and since the start, and what naive averaging loses)."""
    pts = [(i + 1, r.aggregation_error) for i, r in enumerate(run.rounds)]
    pos = [(x, e) for x, e in pts if e is not None and e > 0]
    zeros = [x for x, e in pts if e is not None and e == 0]
    skipped = [x for x, e in pts if e is None]
    floor = min((e for _, e in pos), default=1e-8) / 10
    if pos:
        ax.plot([x for x, _ in pos], [e for _, e in pos], marker="o", markersize=3, linewidth=1,
                label="per round (of its update)")
    naive = [(i + 1, r.naive_aggregation_loss) for i, r in enumerate(run.rounds)]
    naive = [(x, e) for x, e in naive if e is not None and e > 0]
    if naive and any(not math.isclose(e, dict(pos).get(x, 0.0), rel_tol=1e-6) for x, e in naive):  # the residual is on
        ax.plot([x for x, _ in naive], [e for _, e in naive], marker=".", markersize=3, linewidth=1,
                linestyle="--", color="tab:gray", label="what naive averaging of the factors would lose")
        pos = pos + naive  # for the axis limits
    acc = [(i + 1, r.aggregation_error_accumulated) for i, r in enumerate(run.rounds)]
    acc = [(x, e) for x, e in acc if e is not None and e > 0]
    if acc:
        ax.plot([x for x, _ in acc], [e for _, e in acc], marker=".", markersize=3, linewidth=1, linestyle=":",
                color="tab:purple", label="since the start (of the accumulated update)")
        pos = pos + acc
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), linestyle="none", marker="v", color="tab:green",
                label=f"exactly 0 ({len(zeros)} rounds, drawn at {floor:.0e})")
    if skipped:
        ax.plot(skipped, [floor] * len(skipped), linestyle="none", marker="x", color="tab:red",
                label=f"round skipped ({len(skipped)})")
    ax.set_yscale("log")
    ax.set_ylim(*_decades([e for _, e in pos] + [floor] * bool(zeros or skipped or not pos)))
    _task_boundaries(ax, run)
    if xlabel:
        ax.set_xlabel("round (over all tasks; dotted lines: task boundaries)")
    ax.set_ylabel("of the update (log)")
    ax.set_title("Error of the global model (largest over adapted layers)")
    ax.grid(alpha=0.3, which="both")
    if pts:
        ax.legend(fontsize=7)


def _bytes_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))


def plot_communication(run: RunData, path: Path) -> Path:
    fig, ax = new_figure()
    xs = list(range(1, len(run.rounds) + 1))
    for key, label, style in (("uplink_bytes", "uplink (all sampled clients)", "-"),
                              ("downlink_bytes", "downlink (state + residual catch-up)", "-"),
                              ("residual_bytes_factored", "the round's residual, factored", "--"),
                              ("residual_bytes_dense", "the round's residual, dense", ":")):
        ys = [getattr(r, key) or 0 for r in run.rounds]
        if any(ys):
            ax.plot(xs, ys, linestyle=style, marker="o" if style == "-" else None, markersize=3, label=label)
    ax.set_ylim(bottom=0)
    _bytes_axis(ax)
    _task_boundaries(ax, run)
    ax.set_xlabel("round (over all tasks)")
    ax.set_ylabel("bytes per round")
    ax.set_title("Communication per round")
    ax.grid(alpha=0.3)
    if xs:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# --- the markdown ---------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _error(relative: float | None, rounding: float | None, of: str) -> str:
    if relative is None:
        return "n/a"
    text = f"{relative:.3g} of the {of}"
    return text if rounding is None else f"{text} ({rounding:.2g} u‖W‖)"


def summary_rows(run: RunData) -> list[tuple[str, str]]:
    h = run.history
    n_tasks = len(h.tasks)
    rows = [
        ("status", "complete" if h.complete else f"incomplete ({n_tasks} of {run.num_tasks} tasks)"),
        ("method", h.method or "n/a"),
        ("backbone", f"{h.backbone or 'n/a'} ({'pretrained' if h.pretrained else 'NOT pretrained'})"),
        ("seed", str(h.seed)),
        ("final average accuracy (F_AA)", fmt(h.final_average_accuracy)),
        ("average incremental accuracy (AIA)", fmt(h.average_incremental_accuracy)),
        ("forgetting", fmt(h.forgetting)),
        ("max aggregation error (per round)", _error(run.max_aggregation_error,
                                                     run.max_of("aggregation_error_rounding"), "update")),
        ("max error since the start", _error(run.max_of("aggregation_error_accumulated"),
                                             run.max_of("aggregation_error_accumulated_rounding"),
                                             "accumulated update")),
        ("naive averaging would lose (mean / max per round)",
         f"{fmt(h.naive_aggregation_loss_mean, '.3g')} / {fmt(h.naive_aggregation_loss_max, '.3g')}"),
        ("rounds", str(len(run.rounds))),
        ("uplink per round", fmt_bytes(run.per_round("uplink_bytes"))),
        ("downlink per round", fmt_bytes(run.per_round("downlink_bytes"))),
        ("uplink / downlink total", f"{fmt_bytes(run.total('uplink_bytes'))} / {fmt_bytes(run.total('downlink_bytes'))}"),
        ("trainable parameters", "n/a" if h.trainable_parameters is None else f"{h.trainable_parameters:,}"),
        ("wall time", f"{fmt(h.wall_seconds, '.1f')} s"),
    ]
    return rows


def render_markdown(run: RunData) -> str:
    h = run.history
    cfg = run.config
    lines = [f"# Run report: {run.name}", ""]
    data = cfg.get("data", {}).get("dataset", "?")
    fed = cfg.get("fed", {})
    lines += [f"{h.method or '?'} on `{data}`: {run.num_tasks} tasks x {fed.get('rounds_per_task', '?')} "
              f"rounds, {fed.get('clients_per_round', '?')} of {fed.get('num_clients', '?')} clients per round, "
              f"ResWU {'on' if fed.get('residual', True) else 'off'}.", ""]
    if not h.pretrained:
        lines += ["> The backbone is **not pretrained** (random initialisation): accuracies are far below "
                  "what a pre-trained model reaches.", ""]
    lines += ["## Summary", "", *_table(("metric", "value"), summary_rows(run)), ""]

    acc = accuracy_matrix(run)
    lines += ["## Accuracy matrix", "", "![accuracy matrix](accuracy_matrix.png)", ""]
    if acc:
        T = run.num_tasks
        lines += _table(["after task \\ on task", *(str(j + 1) for j in range(T))],
                        [[str(t + 1), *("" if v is None else f"{v:.4f}" for v in row)] for t, row in enumerate(acc)])
        lines.append("")
    lines += ["## Accuracy after each task", "", "![accuracy after each task](accuracy.png)", ""]
    tasks = h.tasks
    if tasks:
        lines += _table(("task", "classes", "A_t (all seen classes)", "on this task", "seconds"),
                        [(t.task + 1, " ".join(str(c) for c in t.classes), fmt(t.seen_accuracy),
                          fmt(t.accuracy[-1] if t.accuracy else None), fmt(t.seconds, ".1f"))
                         for t in tasks])
        lines.append("")
    errs = [r.aggregation_error for r in run.rounds]
    zeros = sum(1 for e in errs if e == 0)
    lines += ["## Aggregation error per round", "", "![aggregation error](aggregation_error.png)", "",
              "Largest over adapted layers of ||E_new - (E_old + sum_k p_k dE_k)||_F / ||sum_k p_k dE_k||_F, "
              "with E the effective weight each layer computes with, as the model holds it after the round "
              "(float64); below, the same in float32 roundings of the weight (u ||W||, u = 2^-24: up to 2 is "
              "float32 resolution and nothing more), and the distance from the exact chain of weighted "
              "averages since the start of the run (methods that fold the residual keep the base exactly)."
              + (f" Exactly 0 in {zeros} of {len(errs)} rounds." if zeros else ""), ""]
    lines += ["## Communication per round", "", "![communication](communication.png)", ""]
    env = h.environment
    if env:
        lines += ["## Environment", "", *_table(("key", "value"), sorted((k, f"`{v}`") for k, v in env.items())), ""]
    cfg_path = run.path / "config.yaml"
    if cfg_path.is_file():
        lines += ["## Configuration", "", "```yaml", cfg_path.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


@dataclass
class Report:
    """Files written by :func:`write_report`."""

    markdown: Path
    plots: list[Path]


def write_report(run_dir: Path, out: Path | None = None) -> Report:
    """Write ``report.md`` and the plots of :data:`PLOTS` for ``run_dir`` into ``out`` (default: ``run_dir``).

    Raises:
        ReportError: no readable metrics.json, or matplotlib is not installed.
    """
    run = load_run(Path(run_dir))
    require_matplotlib()
    out = Path(out) if out is not None else run.path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create {out}: {e.strerror}") from None
    plots = [
        plot_accuracy_matrix(run, out / PLOTS[0]),
        plot_accuracy(run, out / PLOTS[1]),
        plot_aggregation_error(run, out / PLOTS[2]),
        plot_communication(run, out / PLOTS[3]),
    ]
    md = out / "report.md"
    md.write_text(render_markdown(run))
    return Report(md, plots)
