"""Command line: ``fedtalora run | demo | resume | sweep | report | compare | export | presets | methods``.

The only module that parses argv, configures logging, draws progress bars and prints.

Exit codes and stderr, whatever happens (:func:`main` is the one boundary):

* **2**, one line ``fedtalora: error: ...``: the input was refused (a
  :class:`~fedtalora.errors.FedTaLoRAError`: a bad config value, file, run directory or checkpoint);
* **1**, one line ``fedtalora: error: unexpected <Type>: ... (traceback in LOG)``: anything else, e.g.
  an error inside a third-party library that no check anticipated. The traceback goes to ``LOG``:
  ``RUN_DIR/error.log`` when the run directory exists, else a new file under
  ``$XDG_CACHE_HOME/fedtalora/logs`` (``~/.cache/...``; the temporary folder if that is not writable).
  Exit 1, not 2, because it may be a bug of fedtalora: please report it with the log;
* **130** on Ctrl-C, with the command that continues the run (its real directory), if one was started.

Messages are one line and at most :data:`MAX_MESSAGE` characters.
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
from typing import TYPE_CHECKING, Any, NoReturn

from .. import __version__
from ..errors import ConfigError, FedTaLoRAError, one_line
from ..fed.tracking import check_tensorboard
from .progress import ProgressBars

if TYPE_CHECKING:
    from ..fed.history import History

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
MAX_MESSAGE = 1000
"""Longest error message printed (longer ones are cut, saying how much was cut)."""
SUPERLINK_PROBE_SECONDS = 5.0
"""How long ``engine=flower`` waits for the SuperLink's address to accept a connection before refusing the run."""


class _Session:
    """What the command has done so far, for the messages of :func:`main` (no global state)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        """The command's arguments (written at the top of a traceback log)."""
        self.run_dir: Path | None = None
        """The run directory once it exists (the traceback log and the resume hint go there)."""
        self.checkpoints = True
        """Whether the run writes checkpoints (``output.checkpoints != none``)."""


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
    d = sub.add_parser("demo", help="offline demo (= `run demo`): pre-trained MiniLM on a shipped Banking77 subset, "
                       "77 intents in 7 tasks, 5 non-IID clients, about a minute on CPU")
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
    fa.add_argument("--force", action="store_true", help="replace the app's files if DIR already holds them")
    sub.add_parser("presets", help="list the shipped presets")
    sub.add_parser("methods", help="list the methods")
    return p


def entry() -> NoReturn:
    """The process entry point (the ``fedtalora`` script and ``python -m fedtalora``): :func:`main`, then exit.

    After an interrupt in a process that started Ray (``engine=flower-sim``), the exit runs the ``atexit``
    handlers and then skips the interpreter's finalisation: Ray's core worker saw the signal too and can abort
    there (SIGABRT), which would turn the documented exit code 130 into -6. By then the run directory is
    complete and resumable, the streams are flushed and every process the run started has been ended."""
    rc = main()
    if rc == EXIT_INTERRUPTED and "ray" in sys.modules:
        import atexit

        atexit._run_exitfuncs()  # what a normal exit runs (Ray's own shutdown included)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)
    raise SystemExit(rc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`run demo --quiet a=1 b=2`): argparse leaves the later ones over.
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or args.command not in ("run", "demo", "sweep")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    session = _Session(sys.argv[1:] if argv is None else argv)
    from ..flower.procs import interrupt_on_signals

    try:
        with interrupt_on_signals():  # SIGTERM as SIGINT: KeyboardInterrupt, so cleanups run (Flower's processes)
            return _dispatch(args, session)
    except FedTaLoRAError as e:
        sys.stderr.write(f"fedtalora: error: {one_line(e, MAX_MESSAGE)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"fedtalora: interrupted; {_resume_hint(session)}\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `fedtalora presets | head -1`: stdout went away; nothing to report
        _silence_stdout()
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - the one boundary: anything else is one line + a traceback log
        log = _save_traceback(session)
        where = f"traceback in {log}" if isinstance(log, Path) else f"traceback not saved: {log}"
        sys.stderr.write(f"fedtalora: error: unexpected {type(e).__name__}: {one_line(e, MAX_MESSAGE)} ({where}; "
                         "please report it)\n")
        return EXIT_INTERNAL


def _resolve(preset: str, overrides: list[str] | None = None) -> Any:
    """The validated config of a preset + overrides, its method and options included."""
    from ..config import resolve

    cfg = resolve(preset, overrides)  # before torch is imported: a refused file or value costs milliseconds

    from ..fed.build import check_config

    check_config(cfg)
    return cfg


def _resume_hint(session: _Session) -> str:
    if session.run_dir is None:
        return "no run directory had been created yet"
    if not session.checkpoints:
        return (f"the run wrote no checkpoints (output.checkpoints=none): `fedtalora resume {session.run_dir}` "
                "starts it over")
    return f"`fedtalora resume {session.run_dir}` continues from the last completed round"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - no real stdout (e.g. captured in a test)
        pass


def _log_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtalora" / "logs"


def _save_traceback(session: _Session) -> Path | str:
    """Write the current exception's traceback to a log file; its path, or why it could not be written."""
    import tempfile
    import traceback

    text = f"fedtalora {__version__}, arguments {session.argv!r}\n{traceback.format_exc()}"
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    candidates = []
    if session.run_dir is not None and session.run_dir.is_dir():
        candidates.append(session.run_dir / "error.log")
    candidates += [_log_folder() / f"error-{stamp}.log", Path(tempfile.gettempdir()) / f"fedtalora-error-{stamp}.log"]
    why = "no writable place"
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError as e:
            why = f"{path}: {e.strerror or e}"
    return why


def _dispatch(args: argparse.Namespace, session: _Session) -> int:
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
        return _cmd_flower_app(args.dest, args.preset, args.overrides, force=args.force)
    if args.command == "resume":
        return _cmd_resume(args.run_dir, quiet=args.quiet, verbose=args.verbose, session=session)
    preset = "demo" if args.command == "demo" else args.preset
    if getattr(args, "resume", None) is not None:
        return _cmd_resume(args.resume, preset=preset, overrides=args.overrides, quiet=args.quiet,
                           verbose=args.verbose, session=session)
    return _cmd_run(preset, args.overrides, quiet=args.quiet, verbose=args.verbose, session=session)


def _cmd_flower_app(dest: str, preset: str | None, overrides: list[str], *, force: bool = False) -> int:
    """Write the Flower app folder (and, with a preset, the run's config.yaml and partitions.json); files already
    there are replaced only with ``--force``."""
    cfg = None
    if preset is not None:
        cfg = _resolve(preset, overrides)
    elif overrides:
        raise ConfigError("flower-app: overrides need a PRESET_OR_PATH before them")
    from ..flower.deployment import write_app

    path = write_app(dest, cfg, force=force)
    print(f"Flower app written to {path}: flwr run {path} SUPERLINK (see docs/flower.md)")
    return 0


def _cmd_presets() -> int:
    from ..config import preset_description, preset_names

    def natural(name: str) -> list[Any]:  # cifar100-r2 before cifar100-r16
        return [float(t) if t[0].isdigit() else t for t in re.findall(r"\d+(?:\.\d+)?|\D+", name)]

    names = sorted(preset_names(), key=natural)
    for name in sorted(names, key=lambda n: n != "demo"):  # the demo first: what a newcomer should run
        print(f"{name:28s} {preset_description(name)}")
    return 0


def _cmd_methods() -> int:
    from ..methods import METHODS

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
    """Refuse a run directory that is a file, or that holds files without ``output.overwrite=true`` (or, with
    it, files that are not a run's: :func:`.runfiles.check_overwrite`). Checked before the run is built, and
    again under the lock (another run may have written the directory meanwhile)."""
    from .runfiles import check_overwrite, is_empty

    path = _run_dir_path(cfg, preset)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output.dir/output.name: {path} exists and is not a directory")
        if is_empty(path):
            return
        if not cfg.output.overwrite:
            raise ConfigError(f"run directory {path} already exists and is not empty; choose another output.name "
                              "or set output.overwrite=true")
        check_overwrite(path)
    except OSError as e:  # e.g. a name too long for the file system, a folder we may not list
        raise ConfigError(f"output.dir/output.name: cannot use {path}: {e.strerror or e}") from None


def _run_dir(cfg: Any, preset: str) -> Path:
    _check_run_dir(cfg, preset)
    path = _run_dir_path(cfg, preset)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory {path}: {e.strerror}") from None
    return path


def _check_superlink(cfg: Any) -> None:
    """``engine=flower``: Flower installed and ``flower.superlink`` a connection of Flower's config, checked
    read-only before anything is built or written (instead of ``flwr run``'s multi-line error box later)."""
    if cfg.engine != "flower":
        return
    from ..fed.build import check_engine
    from ..flower.deployment import flwr_config_path, superlink_problem

    check_engine(cfg)
    why = superlink_problem(cfg.flower.superlink, flwr_config_path(), probe_seconds=SUPERLINK_PROBE_SECONDS)
    if why is not None:
        raise ConfigError(why)


def _cmd_run(preset: str, overrides: list[str], *, quiet: bool, verbose: bool, session: _Session | None = None) -> int:
    cfg = _resolve(preset, overrides)  # validates before anything heavy is built
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    _check_superlink(cfg)
    _check_run_dir(cfg, preset)
    check_tensorboard(cfg)

    from ..api import prepare, run
    from ..flower.simulation import prestart
    from .runfiles import clear_for_overwrite, writer_lock

    prestart(cfg)  # engine=flower-sim: Ray starts (in the background) while the data and the model load
    setup = prepare(cfg)  # data, partitions and model: every input error surfaces here, before any output
    interactive = _setup_logging(quiet, verbose)
    run_dir = _run_dir(cfg, preset)
    with writer_lock(run_dir, cfg.engine):  # one writer: a second run into the same directory is refused
        _check_run_dir(cfg, preset)  # again, now that no one else can write it
        if cfg.output.overwrite:
            cleared = clear_for_overwrite(run_dir)  # the old run's files go before the new run writes anything
            if cleared:
                logging.getLogger(__name__).info("output.overwrite=true: deleted %s from %s", ", ".join(cleared),
                                                 run_dir)
        if session is not None:
            session.run_dir, session.checkpoints = run_dir, cfg.output.checkpoints != "none"
        with ProgressBars(enabled=interactive) as progress:
            result = run(setup, run_dir=run_dir, progress=progress)
    _print_summary(result.history, run_dir, cfg, setup)
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
                verbose: bool, session: _Session | None = None) -> int:
    """Continue ``run_dir`` from its latest checkpoint, with the config saved in its ``config.yaml``."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        what = "a file, not a run directory" if path.exists() else "no such run directory"
        raise ConfigError(f"cannot resume {run_dir}: {what}")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"cannot resume {run_dir}: {cfg_file} is missing (not a fedtalora run directory)")
    try:
        cfg = _resolve(str(cfg_file))
    except ConfigError as e:
        raise ConfigError(str(e) if str(cfg_file) in str(e) else f"{cfg_file}: {e}") from None
    check_tensorboard(cfg)
    if preset is not None:
        wanted = _resolve(preset, overrides)
        diff = _first_difference(
            {k: v for k, v in wanted.to_dict().items() if k != "output"},
            {k: v for k, v in cfg.to_dict().items() if k != "output"},
        )
        if diff is not None:
            key, mine, saved = diff
            raise ConfigError(f"--resume {run_dir}: {key}={mine!r} from {preset} and the overrides, but the run "
                              f"has {key}={saved!r} in {cfg_file}; use `fedtalora resume {run_dir}`")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    _check_superlink(cfg)
    from ..api import prepare, run
    from ..fed.rundir import latest_path, load
    from .runfiles import resume_state, writer_lock

    with writer_lock(path, cfg.engine):  # one writer: a run or resume writing it now refuses this one
        done = resume_state(path, cfg)  # complete: nothing to do; edited since its results: refused
        if done is not None:
            print(f"run {path} is already complete; nothing to resume (its results are unchanged)")
            _print_summary(done, path, cfg)
            return 0
        if session is not None:
            session.run_dir, session.checkpoints = path, cfg.output.checkpoints != "none"
        latest = latest_path(path)
        if latest is not None:
            load(latest, cfg.to_dict())  # a corrupted or foreign checkpoint fails here, before the heavy setup
        from ..flower.simulation import prestart

        prestart(cfg)  # engine=flower-sim: Ray starts (in the background) while the data and the model load
        setup = prepare(cfg)
        interactive = _setup_logging(quiet, verbose)
        with ProgressBars(enabled=interactive) as progress:
            result = run(setup, run_dir=path, progress=progress, resume=True)
    _print_summary(result.history, path, cfg, setup)
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


def _print_summary(h: History, run_dir: Path, cfg: Any = None, setup: Any = None) -> None:
    """What ran (when the data was loaded: ``setup``), the metrics and any precomputed reference lines
    (:mod:`fedtalora.app.summary`)."""
    from .summary import data_facts, find_reference, format_summary

    cfg_dict = cfg.to_dict() if cfg is not None else None
    data = None
    if setup is not None:
        ds = setup.exp.dataset
        data = data_facts(ds.name, ds.num_classes, ds.train.labels, ds.test.labels, ds.modality)
    ref = find_reference(cfg_dict) if cfg_dict is not None else None
    print(format_summary(h, run_dir, cfg_dict, data, ref))


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
