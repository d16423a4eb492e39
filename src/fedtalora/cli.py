"""Command line: ``fedtalora run | demo | resume | sweep | report | compare | export | presets | methods``.

The only module that parses argv, configures logging, draws progress bars and prints. Every
user-facing error (:class:`~fedtalora.errors.FedTaLoRAError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, FedTaLoRAError
from .tracking import check_tensorboard

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedtalora", description="Federated class-incremental learning with task-agnostic "
                "LoRA and exact residual aggregation (Fed-TaLoRA).")
    p.add_argument("--version", action="version", version=f"fedtalora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. fed.residual=false lora.blocks=[0,1]")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
        sp.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    r = sub.add_parser("run", help="run an experiment from a preset name or YAML file")
    r.add_argument("preset", metavar="PRESET_OR_PATH", help="a shipped preset (see `fedtalora presets`) or a YAML file")
    add_run_args(r)
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue this interrupted run from its latest checkpoint (the preset and overrides "
                        "must give the run's config.yaml)")
    rs = sub.add_parser("resume", help="continue an interrupted run from its latest checkpoint")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds config.yaml and checkpoints/)")
    rs.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines")
    rs.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    d = sub.add_parser("demo", help="offline demo: digits, tiny ViT (not pretrained), 5 tasks x 5 clients")
    add_run_args(d)
    sw = sub.add_parser("sweep", help="run a grid of presets x overrides x seeds and summarise it (paper tables)")
    sw.add_argument("grid", metavar="GRID", help="a grid YAML file or the name of a shipped grid (paper-cifar100, ...)")
    add_run_args(sw)
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    sw.add_argument("--workers", type=int, default=1, metavar="N",
                    help="runs at once, each in its own process (set train.threads so N x threads fits the cores)")
    rp = sub.add_parser("report", help="write report.md and PNG plots of a run (needs fedtalora[report])")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.json)")
    rp.add_argument("--out", metavar="DIR", default=None, help="where to write (default: RUN_DIR)")
    cp = sub.add_parser("compare", help="one table and one plot of several runs side by side (needs fedtalora[report])")
    cp.add_argument("paths", nargs="+", metavar="PATH", help="run directories, or folders (sweeps) containing them")
    cp.add_argument("--out", metavar="DIR", default=None,
                    help="where to write compare.md/.csv/.png (default: the sweep folder if one PATH, else ./comparison)")
    ex = sub.add_parser("export", help="the final model as one merged safetensors file and a peft adapter")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (holds final_model.safetensors)")
    ex.add_argument("--out", metavar="DIR", default=None, help="where to write (default: RUN_DIR/export)")
    fa = sub.add_parser("flower-app", help="write the Flower app folder for `flwr run` (engine=flower, docs/flower.md)")
    fa.add_argument("dest", metavar="DIR", help="the app folder to write (pyproject.toml)")
    fa.add_argument("preset", nargs="?", default=None, metavar="PRESET_OR_PATH",
                    help="also write this run's config.yaml and partitions.json there (the app's default run config)")
    fa.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")
    sub.add_parser("presets", help="list the shipped presets")
    sub.add_parser("methods", help="list the methods")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`run demo --quiet a=1 b=2`): argparse leaves the later ones over.
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or args.command not in ("run", "demo", "sweep")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from .flower.procs import interrupt_on_signals

    with interrupt_on_signals():  # SIGTERM as SIGINT: KeyboardInterrupt, so cleanups run (Flower's processes)
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "presets":
            return _cmd_presets()
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "sweep":
            return _cmd_sweep(args.grid, args.overrides, dry_run=args.dry_run, quiet=args.quiet, verbose=args.verbose,
                              workers=args.workers)
        if args.command == "report":
            return _cmd_report(args.run_dir, args.out)
        if args.command == "compare":
            return _cmd_compare(args.paths, args.out)
        if args.command == "export":
            return _cmd_export(args.run_dir, args.out)
        if args.command == "flower-app":
            return _cmd_flower_app(args.dest, args.preset, args.overrides)
        if args.command == "resume":
            return _cmd_resume(args.run_dir, quiet=args.quiet, verbose=args.verbose)
        preset = "demo" if args.command == "demo" else args.preset
        if getattr(args, "resume", None) is not None:
            return _cmd_resume(args.resume, preset=preset, overrides=args.overrides, quiet=args.quiet,
                               verbose=args.verbose)
        return _cmd_run(preset, args.overrides, quiet=args.quiet, verbose=args.verbose)
    except FedTaLoRAError as e:
        sys.stderr.write(f"fedtalora: error: {_one_line(str(e))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("fedtalora: interrupted; `fedtalora resume RUN_DIR` continues from the last completed "
                         "round\n")
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cmd_flower_app(dest: str, preset: str | None, overrides: list[str]) -> int:
    """Write the Flower app folder (and, with a preset, the run's config.yaml and partitions.json)."""
    cfg = None
    if preset is not None:
        from .config import resolve

        cfg = resolve(preset, overrides)
    elif overrides:
        raise ConfigError("flower-app: overrides need a PRESET_OR_PATH before them")
    from .flower.deployment import write_app

    path = write_app(dest, cfg)
    print(f"Flower app written to {path}: flwr run {path} SUPERLINK (see docs/flower.md)")
    return 0


def _cmd_presets() -> int:
    from .config import preset_description, preset_names

    def natural(name: str) -> list[Any]:  # cifar100-r2 before cifar100-r16
        return [float(t) if t[0].isdigit() else t for t in re.findall(r"\d+(?:\.\d+)?|\D+", name)]

    for name in sorted(preset_names(), key=natural):
        print(f"{name:28s} {preset_description(name)}")
    return 0


def _cmd_methods() -> int:
    from .methods import METHODS

    for name in METHODS.names():
        print(f"{name:12s} {METHODS.get(name).summary}")
    for name, note in METHODS.planned().items():
        print(f"{name:12s} (planned) {note}")
    return 0


def _run_dir_path(cfg: Any, preset: str) -> Path:
    stem = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    name = cfg.output.name or f"{stem}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output.dir).expanduser() / name


def _check_run_dir(cfg: Any, preset: str) -> None:
    path = _run_dir_path(cfg, preset)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.dir/output.name: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not cfg.output.overwrite:
        raise ConfigError(f"run directory {path} already exists and is not empty; choose another output.name "
                          "or set output.overwrite=true")


def _run_dir(cfg: Any, preset: str) -> Path:
    _check_run_dir(cfg, preset)
    path = _run_dir_path(cfg, preset)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory {path}: {e.strerror}") from None
    return path


def _cmd_run(preset: str, overrides: list[str], *, quiet: bool, verbose: bool) -> int:
    from .config import resolve

    cfg = resolve(preset, overrides)  # validates before anything heavy is imported
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    _check_run_dir(cfg, preset)
    check_tensorboard(cfg)

    from .engine import prepare, run
    from .flower.simulation import prestart

    prestart(cfg)  # engine=flower-sim: Ray starts (in the background) while the data and the model load
    setup = prepare(cfg)  # data, partitions and model: every input error surfaces here, before any output
    interactive = _setup_logging(quiet, verbose)
    run_dir = _run_dir(cfg, preset)
    with _Progress(enabled=interactive) as progress:
        result = run(setup, run_dir=run_dir, progress=progress)
    _print_summary(result.metrics, run_dir)
    return 0


def _setup_logging(quiet: bool, verbose: bool) -> bool:
    """Log to stderr (INFO without a terminal, WARNING with the progress bar); True: draw the bar.

    The bar (on stderr) needs both stdout and stderr to be a terminal: with either redirected, the run
    logs plain lines instead, which read well in files and CI logs."""
    interactive = sys.stdout.isatty() and sys.stderr.isatty() and not quiet
    level = logging.DEBUG if verbose else (logging.WARNING if quiet or interactive else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return interactive


def _cmd_resume(run_dir: str, *, preset: str | None = None, overrides: list[str] | None = None, quiet: bool,
                verbose: bool) -> int:
    """Continue ``run_dir`` from its latest checkpoint, with the config saved in its ``config.yaml``."""
    from .config import resolve

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        what = "a file, not a run directory" if path.exists() else "no such run directory"
        raise ConfigError(f"cannot resume {run_dir}: {what}")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"cannot resume {run_dir}: {cfg_file} is missing (not a fedtalora run directory)")
    try:
        cfg = resolve(str(cfg_file))
    except ConfigError as e:
        raise ConfigError(str(e) if str(cfg_file) in str(e) else f"{cfg_file}: {e}") from None
    check_tensorboard(cfg)
    if preset is not None:
        wanted = resolve(preset, overrides)
        diff = _first_difference(
            {k: v for k, v in wanted.to_dict().items() if k != "output"},
            {k: v for k, v in cfg.to_dict().items() if k != "output"},
        )
        if diff is not None:
            key, mine, saved = diff
            raise ConfigError(f"--resume {run_dir}: {key}={mine!r} from {preset} and the overrides, but the run "
                              f"has {key}={saved!r} in {cfg_file}; use `fedtalora resume {run_dir}`")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from .checkpoint import latest_path, load
    from .engine import prepare, run

    latest = latest_path(path)
    if latest is not None:
        load(latest, cfg.to_dict())  # a corrupted or foreign checkpoint fails here, before the heavy setup
    from .flower.simulation import prestart

    prestart(cfg)  # engine=flower-sim: Ray starts (in the background) while the data and the model load
    setup = prepare(cfg)
    interactive = _setup_logging(quiet, verbose)
    with _Progress(enabled=interactive) as progress:
        result = run(setup, run_dir=path, progress=progress, resume=True)
    _print_summary(result.metrics, path)
    return 0


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted) where two nested dicts differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            diff = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if diff is not None:
                return diff
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


class _Progress:
    """Rich progress bars over tasks, rounds and clients, with ETA, accuracy and loss (terminal only).

    The tasks bar advances by round, so its ETA covers the whole run; its info shows the accuracy on all
    classes seen after the last finished task and the last round's training loss.
    """

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self._console = console
        self._bar: Any = None
        self._acc: float | None = None
        self._loss: float | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description:<16}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self._console or Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _summary(self) -> str:
        acc = "acc n/a" if self._acc is None else f"acc {self._acc:.3f}"
        return acc if self._loss is None else f"{acc}  loss {self._loss:.3f}"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self._bar is None:
            return
        bar = self._bar
        if kind == "start":
            self._T, self._R, self._m = event["num_tasks"], event["rounds_per_task"], event["clients_per_round"]
            done = event.get("completed_rounds", 0)
            t, r = divmod(done, self._R)  # a resumed run starts part-way
            self._tasks = bar.add_task("tasks", total=self._T, completed=done / self._R, info=self._summary())
            self._rounds = bar.add_task(f"task {min(t + 1, self._T)}/{self._T} rounds", total=self._R, completed=r,
                                        info="")
            self._clients = bar.add_task(f"round {r + 1} clients", total=self._m, info="")
        elif kind == "client":
            loss = event["loss"]
            bar.update(self._clients, advance=1, info="dropped out" if loss is None else f"loss {loss:.3f}")
        elif kind == "round":
            t, r = event["task"], event["round"]
            err, loss = event["aggregation_error"], event.get("train_loss")
            if loss is not None:
                self._loss = loss
            info = "skipped" if err is None else f"loss {loss:.3f}  agg. error {err:.1e}"
            bar.update(self._rounds, advance=1, info=info)
            bar.update(self._tasks, completed=t + (r + 1) / self._R, info=self._summary())
            if r + 1 < self._R:
                bar.reset(self._clients, total=self._m, description=f"round {r + 2} clients")
        elif kind == "task":
            self._acc = event["seen_accuracy"]
            t = event["task"] + 1
            bar.update(self._tasks, completed=t, info=self._summary())
            if t < self._T:
                bar.reset(self._rounds, total=self._R, description=f"task {t + 1}/{self._T} rounds")
                bar.reset(self._clients, total=self._m, description="round 1 clients")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _print_summary(m: dict[str, Any], run_dir: Path) -> None:
    rounds = m["rounds"]
    n = max(len(rounds), 1)
    fgt = m.get("forgetting")
    pre = "pretrained" if m["pretrained"] else "NOT pretrained: random initialisation"
    rows = [
        ("backbone", f"{m['backbone']} ({pre})"),
        ("final average accuracy (F_AA)", f"{m['final_average_accuracy']:.4f}"),
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
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':{width}s}  value")
    print(f"{'-' * width}  {'-' * 12}")
    for k, v in rows:
        print(f"{k:{width}s}  {v}")
    print(f"run directory: {run_dir}")


def _cmd_sweep(grid_arg: str, overrides: list[str], *, dry_run: bool, quiet: bool, verbose: bool,
               workers: int = 1) -> int:
    from .sweep import load_grid, plan, run_status, run_sweep

    if workers < 1:
        raise ConfigError(f"--workers={workers} is invalid: expected an integer >= 1")
    grid = load_grid(grid_arg, overrides)
    if dry_run:
        for spec in plan(grid):
            print(f"{run_status(spec):9s} {spec.run_dir}")
        return 0
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def report(spec: Any, i: int, n: int) -> None:
        if not quiet:
            detail = f" ({spec.seconds:.1f} s)" if spec.status == "complete" else (f": {spec.error}" if spec.error else "")
            sys.stderr.write(f"[{i + 1}/{n}] {spec.name}: {spec.status}{detail}\n")

    try:
        result = run_sweep(grid, on_run=report, workers=workers)
    except KeyboardInterrupt:
        sys.stderr.write(f"fedtalora: sweep interrupted; run the same command again to continue "
                         f"(completed runs are skipped, the interrupted one resumes); {grid.sweep_dir}\n")
        return 130
    print((grid.sweep_dir / "summary.md").read_text(), end="")
    print(f"sweep directory: {grid.sweep_dir} (summary.csv, summary.md, sweep.json)")
    return 1 if result.failed else 0


def _cmd_report(run_dir: str, out: str | None) -> int:
    from .report import write_report

    rep = write_report(Path(run_dir).expanduser(), None if out is None else Path(out).expanduser())
    print(f"report: {rep.markdown}")
    for p in rep.plots:
        print(f"plot:   {p}")
    return 0


def _cmd_compare(paths: list[str], out: str | None) -> int:
    from .compare import compare

    res = compare([Path(p).expanduser() for p in paths], None if out is None else Path(out).expanduser())
    print(res.markdown.read_text().split("![", 1)[0].rstrip())
    print(f"\nwritten: {res.markdown}, {res.csv}, {res.plot}")
    return 0


def _cmd_export(run_dir: str, out: str | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .export import export

    res = export(Path(run_dir).expanduser(), None if out is None else Path(out).expanduser())
    print(f"merged model:     {res.merged}")
    print(f"base + adapter:   {res.base} + {res.adapter}/")
    print(f"how to load:      {res.info}")
    print("self-check:       max logit difference to the run's final model "
          + ", ".join(f"{k} {v:.1e}" for k, v in res.max_diff.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
