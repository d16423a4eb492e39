"""A grid of runs (presets x override settings x seeds) and its paper-style summary.

A grid file is YAML::

    # CIFAR-100 main table: the six partition settings, with and without ResWU, three seeds
    name: paper-cifar100                  # optional; default: the file's stem
    output: runs/sweeps                   # optional; the sweep lives in OUTPUT/NAME
    presets: [cifar100-q6, cifar100-q4]   # required: preset names or YAML paths (relative to this file)
    overrides:                            # optional; default: one setting without overrides
      - []                                #   the preset as it is
      - {label: w/o ResWU, set: [fed.residual=false]}
      - [lora.rank=4, lora.alpha=4]       #   label: the overrides themselves
    seeds: [0, 1, 2]                      # optional; default [0]
    common: [train.device=cuda]           # optional; applied to every run, before the setting's overrides

Every run gets its own directory ``OUTPUT/NAME/runs/<preset>[--<setting>]--seed<N>`` (the name is a
pure function of the grid entry). Before anything runs, every config is resolved and validated, so a
typo anywhere in the grid fails at once with one line. Then, in order:

* a run whose ``metrics.json`` says ``complete`` (with the same config) is skipped;
* a run that was interrupted is resumed from its latest round checkpoint (``engine.run(resume=True)``);
* a run that raises is logged (traceback in its ``error.log``) and recorded as failed; the sweep goes on.

After every run, ``sweep.json`` (the status of every run), ``summary.csv`` and ``summary.md`` are
rewritten. The summary has one row per setting (preset x override setting): mean and sample standard
deviation over completed seeds of F_AA and AIA, and what one client sends per round (the trainable
parameters: LoRA factors + head) plus the measured bytes up and down per round. ``summary.md`` also
lays the numbers out as the paper's tables: one per dataset, a row per override setting (the
"method"), two columns (F_AA, AIA) per preset (partition setting).

``workers=N`` (``fedtalora sweep GRID --workers N``) runs N runs at once, each in its own spawned
process; only the parent writes ``sweep.json`` and the summaries, so they never see a half-written state.

Runs go through :func:`fedtalora.fed.loop.run_loop` in-process. The runner is looked up in :data:`RUNNERS`
by the config's ``engine`` key when a config has one (``local`` otherwise), so another engine plugs in
by registering a runner; methods plug in through the ordinary ``method=`` key.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import safeio
from ..config import RunConfig, apply_overrides, from_dict, load_preset, parse_override, read_yaml
from ..errors import ConfigError, FedTaLoRAError, one_line
from ..fed.build import check_config
from ..fed.history import History, load_history
from ..registry import Registry
from ..safeio import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "RUNNERS",
    "Grid",
    "RunSpec",
    "Setting",
    "SweepResult",
    "grid_names",
    "load_grid",
    "plan",
    "run_sweep",
    "summarize",
]

#: A runner executes one config in a run directory (``resume``: continue what is there) and returns
#: the run's metrics; it must leave ``metrics.json`` with ``complete: true`` in the directory.
Runner = Callable[[RunConfig, Path, bool], dict[str, Any]]

RUNNERS: Registry[Runner] = Registry("sweep runner")


@RUNNERS.register("local")
def run_local(cfg: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The in-process simulation of :mod:`fedtalora.fed.loop`."""
    from ..api import run

    result = run(cfg, run_dir=run_dir, resume=resume)
    metrics = result.metrics
    del result  # drop the model before the next run is built
    return metrics


for _engine in ("inprocess", "flower-sim", "flower"):  # the config's ``engine``: engine.run dispatches on it itself
    RUNNERS.register(_engine)(run_local)

GRID_KEYS = ("name", "output", "presets", "overrides", "seeds", "common")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Setting:
    """One entry of ``overrides``: a label and the ``key=value`` strings it applies."""

    label: str
    overrides: tuple[str, ...]
    slug: str
    """Part of the run directory name ("" for no overrides)."""


@dataclass(frozen=True)
class Grid:
    """A validated grid file."""

    name: str
    path: Path | None
    output: Path
    presets: tuple[str, ...]
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    common: tuple[str, ...]

    @property
    def sweep_dir(self) -> Path:
        return self.output / self.name


@dataclass
class RunSpec:
    """One run of the grid, with its resolved config."""

    preset: str
    preset_label: str
    setting: Setting
    seed: int
    name: str
    run_dir: Path
    cfg: RunConfig
    status: str = "pending"
    """``pending``, ``complete`` (ran now), ``skipped`` (complete before), ``failed``."""
    error: str = ""
    seconds: float = 0.0


@dataclass
class SweepResult:
    grid: Grid
    runs: list[RunSpec]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[RunSpec]:
        return [r for r in self.runs if r.status == "failed"]


# --------------------------------------------------------------------------------------------------
# Reading a grid file, strictly
# --------------------------------------------------------------------------------------------------


def grid_names() -> list[str]:
    """Names of the grids shipped with the package (``fedtalora/grids/*.yaml``)."""
    folder = resources.files("fedtalora") / "grids"
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _grid_text(name_or_path: str) -> tuple[str | bytes, Path | None, str]:
    path = Path(name_or_path).expanduser()
    if safeio.exists(path) and not path.is_dir():  # a FIFO or device is refused by the reader, not opened
        data = safeio.read_bytes(path, what=f"grid file {safeio.short(name_or_path)}", max_bytes=safeio.MAX_YAML_BYTES,
                                 error=ConfigError)
        return data, path, path.stem
    if name_or_path in grid_names():
        text = (resources.files("fedtalora") / "grids" / f"{name_or_path}.yaml").read_text(encoding="utf-8")
        return text, None, name_or_path
    shipped = ", ".join(grid_names()) or "none"
    raise ConfigError(f"grid file {safeio.short(name_or_path)} does not exist (shipped grids: {shipped})")


def _str_list(value: Any, where: str, *, allow_empty: bool) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of strings, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ConfigError(f"{where} must not be empty")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{where} must hold non-empty strings, got {bad[0]!r}")
    return [v.strip() for v in value]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")  # never "--": that separates the name's parts
    if len(s) > 48:
        s = f"{s[:39].rstrip('-.')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return s


def _setting(entry: Any, i: int, source: str) -> Setting:
    where = f"{source}: overrides[{i}]"
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"label", "set"})
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r} (allowed: label, set)")
        if "set" not in entry:
            raise ConfigError(f"{where} needs 'set: [key=value, ...]'")
        overrides = _str_list(entry["set"], f"{where}.set", allow_empty=True)
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise ConfigError(f"{where}.label must be a string, got {type(label).__name__}")
        label = label.strip()
    else:
        overrides = _str_list(entry, where, allow_empty=True)
        label = ""
    for text in overrides:
        try:
            parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    # The run-name part: from an explicit label, else from the overrides ("" for none).
    slug = _slug(label) if label else _slug(" ".join(overrides))
    if (label or overrides) and not slug:
        raise ConfigError(f"{where}: label {label!r} leaves no characters for a folder name")
    if not label:
        label = " ".join(overrides) if overrides else "default"
    return Setting(label=label, overrides=tuple(overrides), slug=slug)


def load_grid(name_or_path: str, extra: Sequence[str] = ()) -> Grid:
    """Read and validate a grid file (a path, or the name of a shipped grid).

    Args:
        name_or_path: The grid file.
        extra: ``key=value`` overrides appended to the grid's ``common`` (from the command line).

    Raises:
        ConfigError: One line naming the file, the entry and what is wrong.
    """
    text, path, stem = _grid_text(name_or_path)
    source = str(path) if path is not None else f"grid {name_or_path!r}"
    data = read_yaml(text, source)  # one-line errors for bad YAML and non-mappings
    unknown = [k for k in data if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(GRID_KEYS)})")
    if "presets" not in data:
        raise ConfigError(f"{source}: 'presets' is required (a list of preset names or YAML paths)")
    name = data.get("name", stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{source}: name={name!r} must be a plain folder name (letters, digits, . _ -)")
    output = data.get("output", "runs/sweeps")
    if not isinstance(output, str) or not output.strip():
        raise ConfigError(f"{source}: output must be a folder path, got {output!r}")
    presets = _str_list(data["presets"], f"{source}: presets", allow_empty=False)
    if len(set(presets)) != len(presets):
        raise ConfigError(f"{source}: presets lists {sorted({p for p in presets if presets.count(p) > 1})[0]!r} twice")
    if path is not None:  # a relative preset path is relative to the grid file
        presets = [str(path.parent / p) if not Path(p).is_absolute() and (path.parent / p).is_file() else p
                   for p in presets]
    raw_settings = data.get("overrides", [[]])
    if isinstance(raw_settings, (str, dict)) or not isinstance(raw_settings, list) or not raw_settings:
        raise ConfigError(f"{source}: overrides must be a non-empty list of settings "
                          "(each a list of key=value strings, or {label: ..., set: [...]})")
    settings = [_setting(entry, i, source) for i, entry in enumerate(raw_settings)]
    slugs = [s.slug for s in settings]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise ConfigError(f"{source}: two override settings share the run name {dup[0]!r}; give them distinct labels")
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds lists a seed twice: {seeds}")
    common = _str_list(data.get("common", []), f"{source}: common", allow_empty=True) + list(extra)
    for text in common:
        parse_override(text)
    return Grid(name=name, path=path, output=Path(output).expanduser(), presets=tuple(presets),
                settings=tuple(settings), seeds=tuple(int(s) for s in seeds), common=tuple(common))


def _preset_label(preset: str) -> str:
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def plan(grid: Grid) -> list[RunSpec]:
    """Every run of the grid with its resolved, validated config (nothing is run or written).

    Raises:
        ConfigError: A preset or an override of some entry is invalid (the message names the entry).
    """
    runs: list[RunSpec] = []
    source = str(grid.path) if grid.path is not None else f"grid {grid.name!r}"
    names: dict[str, str] = {}
    for preset in grid.presets:
        label = _preset_label(preset)
        try:
            base = load_preset(preset)
        except ConfigError as e:
            raise ConfigError(f"{source}: preset {preset!r}: {e}") from None
        for setting in grid.settings:
            for seed in grid.seeds:
                name = "--".join([p for p in (_slug(label), setting.slug) if p] + [f"seed{seed}"])
                key = f"{label} / {setting.label}"
                if names.setdefault(name, key) != key:
                    raise ConfigError(f"{source}: runs {names[name]!r} and {key!r} would share the directory {name}")
                run_dir = grid.sweep_dir / "runs" / name
                fixed = [f"seed={seed}", f"output.dir={run_dir.parent}", f"output.name={name}"]
                try:
                    cfg = from_dict(apply_overrides(base, [*grid.common, *setting.overrides, *fixed]))
                    check_config(cfg)
                except ConfigError as e:
                    where = f"preset {preset!r}" + (f", overrides {list(setting.overrides)}" if setting.overrides else "")
                    raise ConfigError(f"{source}: {where}: {e}") from None
                runs.append(RunSpec(preset, label, setting, seed, name, run_dir, cfg))
    return runs


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _complete_history(run_dir: Path) -> History | None:
    """The run's history if its ``metrics.json`` says it is complete (None if absent, partial or malformed)."""
    try:
        history = load_history(run_dir / "metrics.json")
    except FedTaLoRAError:
        return None
    return history if history.complete is True else None


def _same_config(run_dir: Path, cfg: RunConfig) -> bool | None:
    """Whether ``run_dir/config.yaml`` holds ``cfg`` up to ``output.*`` (where the run lives may change:
    a sweep folder can be moved). None when there is no readable config."""
    try:
        saved = safeio.read_yaml(run_dir / "config.yaml")
    except FedTaLoRAError:
        return None
    if not isinstance(saved, dict):
        return None
    saved, want = dict(saved), cfg.to_dict()
    for key in ("output", "engine", "flower"):  # where and on which engine it runs: same numbers
        saved.pop(key, None)
        want.pop(key, None)
    return json.loads(json.dumps(saved, default=str)) == json.loads(json.dumps(want, default=str))


def run_status(spec: RunSpec) -> str:
    """``complete``, ``partial`` (something to resume), ``new``, or ``foreign`` (another config's files)."""
    from .runfiles import is_empty

    if is_empty(spec.run_dir):  # missing, or only the lock file of a run that never wrote anything
        return "new"
    same = _same_config(spec.run_dir, spec.cfg)
    if same is False:
        return "foreign"
    if same and _complete_history(spec.run_dir) is not None:
        return "complete"
    return "partial"


def _runner_for(cfg: RunConfig) -> Runner:
    return RUNNERS.get(str(getattr(cfg, "engine", "local")))


def run_sweep(grid: Grid, *, runner: Runner | None = None,
              on_run: Callable[[RunSpec, int, int], None] | None = None, workers: int = 1) -> SweepResult:
    """Run every run of ``grid`` that is not complete yet, then write the summaries.

    Args:
        grid: A validated grid (:func:`load_grid`).
        runner: Runs one config (default: the registered runner of the config's engine, ``local``).
        on_run: Called as ``on_run(spec, i, n)`` after each run (for progress display; ``i`` counts
            finished runs).
        workers: Runs at once, each in its own process (spawned; results, statuses and summaries are
            collected here, so only this process writes ``sweep.json`` and the summaries). Give every run
            ``train.threads`` so that ``workers x threads`` fits the machine's cores.

    Returns:
        Every run with its final status, and the summary rows.

    Raises:
        ConfigError: The grid does not resolve (before anything runs), or ``workers < 1``.
        KeyboardInterrupt: Passed on after ``sweep.json`` and the summaries are written.
    """
    if workers < 1:
        raise ConfigError(f"workers={workers} is invalid: expected an integer >= 1")
    runs = plan(grid)
    result = SweepResult(grid, runs)
    try:
        grid.sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the sweep folder {grid.sweep_dir} (output: {grid.output}): "
                          f"{e.strerror or e}") from None
    try:
        if workers == 1:
            for i, spec in enumerate(runs):
                _run_one(spec, runner)
                _write_outputs(result)
                if on_run is not None:
                    on_run(spec, i, len(runs))
        else:
            _run_parallel(result, runner, on_run, workers)
    finally:
        _write_outputs(result)
    return result


def _run_parallel(result: SweepResult, runner: Runner | None,
                  on_run: Callable[[RunSpec, int, int], None] | None, workers: int) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    runs = result.runs
    done = 0

    def finished(spec: RunSpec) -> None:
        nonlocal done
        _write_outputs(result)
        if on_run is not None:
            on_run(spec, done, len(runs))
        done += 1

    ctx = multiprocessing.get_context("spawn")  # no forked torch state (threads, CUDA) in the workers
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:  # workers start at the first submit
        pending = {}
        for spec in runs:
            if run_status(spec) in ("complete", "foreign"):  # nothing to run: settled here, no worker needed
                _run_one(spec, runner)
                finished(spec)
            else:
                pending[pool.submit(_run_in_worker, spec, runner)] = spec
        try:
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in ready:
                    spec = pending.pop(fut)
                    try:
                        spec.status, spec.error, spec.seconds = fut.result()
                    except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
                        spec.status, spec.error = "failed", one_line(f"worker died: {type(e).__name__}: {e}")
                        logger.error("%s failed: %s", spec.name, spec.error)
                    finished(spec)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _run_in_worker(spec: RunSpec, runner: Runner | None) -> tuple[str, str, float]:
    _run_one(spec, runner)
    return spec.status, spec.error, spec.seconds


def _settled(spec: RunSpec, state: str) -> bool:
    """Settle a run that needs no runner (complete: skipped; foreign: failed); False for the others."""
    if state == "complete":
        spec.status = "skipped"
        logger.info("%s: complete, skipped", spec.name)
        return True
    if state == "foreign":
        spec.status, spec.error = "failed", (f"{spec.run_dir} holds a run of another config; move it away or "
                                             "rename the sweep")
        logger.error("%s: %s", spec.name, spec.error)
        return True
    return False


def _run_one(spec: RunSpec, runner: Runner | None) -> None:
    from .runfiles import writer_lock

    if _settled(spec, run_status(spec)):
        return
    t0 = time.perf_counter()
    try:
        try:
            spec.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create run directory {spec.run_dir}: {e.strerror or e}") from None
        with writer_lock(spec.run_dir, spec.cfg.engine):  # one writer: another sweep running it is refused
            state = run_status(spec)  # again, now that no one else can write it
            if _settled(spec, state):
                return
            resume = state == "partial"
            logger.info("%s: %s", spec.name, "resuming" if resume else "starting")
            (runner or _runner_for(spec.cfg))(spec.cfg, spec.run_dir, resume)
    except Exception as e:  # noqa: BLE001 - one crashing run must not end the sweep
        spec.status = "failed"
        spec.error = one_line(f"{type(e).__name__}: {e}") if not isinstance(e, FedTaLoRAError) else one_line(e)
        try:
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            (spec.run_dir / "error.log").write_text(traceback.format_exc())
            logger.error("%s failed: %s (traceback in %s)", spec.name, spec.error, spec.run_dir / "error.log")
        except OSError:
            logger.error("%s failed: %s (and its run directory cannot be written)", spec.name, spec.error)
    else:
        if _complete_history(spec.run_dir) is not None:
            spec.status = "complete"
            (spec.run_dir / "error.log").unlink(missing_ok=True)
        else:
            spec.status, spec.error = "failed", "the runner returned without a complete metrics.json"
    finally:
        spec.seconds = time.perf_counter() - t0
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``n - 1``; None below two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _floats(histories: list[History], key: str) -> list[float]:
    values = [getattr(h, key) for h in histories]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _partition_label(cfg: RunConfig) -> str:
    p = cfg.partition
    if p.kind == "quantity":
        return f"α={p.alpha}"
    if p.kind == "dirichlet":
        return f"β={p.beta:g}"
    return p.kind


def summarize(runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """One row per setting (preset x override setting), in grid order, from the runs' ``metrics.json``."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in runs:
        groups.setdefault((spec.preset, spec.setting.label), []).append(spec)
    rows = []
    for (_, label), specs in groups.items():
        first = specs[0]
        metrics = [h for h in (_complete_history(s.run_dir) for s in specs) if h is not None]
        # Other engines may record less: a missing field leaves its cell empty instead of failing the sweep.
        faa = _floats(metrics, "final_average_accuracy")
        aia = _floats(metrics, "average_incremental_accuracy")
        up = [h.uplink_bytes_total / max(len(h.rounds), 1) for h in metrics
              if isinstance(h.uplink_bytes_total, (int, float))]
        down = [h.downlink_bytes_total / max(len(h.rounds), 1) for h in metrics
                if isinstance(h.downlink_bytes_total, (int, float))]
        params = sorted({int(v) for v in _floats(metrics, "trainable_parameters")})
        row = {
            "preset": first.preset_label,
            "setting": label,
            "dataset": first.cfg.data.dataset,
            "partition": _partition_label(first.cfg),
            "method": first.cfg.method,
            "seeds": len(specs),
            "complete": len(metrics),
            "failed": sum(s.status == "failed" for s in specs),
            "faa_mean": None, "faa_std": None, "aia_mean": None, "aia_std": None,
            "params_per_round": params[0] if len(params) == 1 else (params or None),
            "uplink_bytes_per_round": _mean_std(up)[0],
            "downlink_bytes_per_round": _mean_std(down)[0],
        }
        row["faa_mean"], row["faa_std"] = _mean_std(faa)
        row["aia_mean"], row["aia_std"] = _mean_std(aia)
        rows.append(row)
    return rows


CSV_COLUMNS = ("preset", "setting", "dataset", "partition", "method", "seeds", "complete", "failed",
               "faa_mean", "faa_std", "aia_mean", "aia_std", "params_per_round",
               "uplink_bytes_per_round", "downlink_bytes_per_round")


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``summary.csv``: accuracies as fractions in [0, 1] with full precision; empty where unknown."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                         for c in CSV_COLUMNS])
    return out.getvalue()


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _params(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return " / ".join(f"{v:,}" for v in value)
    return f"{value:,}"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:.3f}"


def summary_markdown(grid: Grid, runs: Sequence[RunSpec], rows: Sequence[dict[str, Any]]) -> str:
    """``summary.md``: the paper-layout tables per dataset, then one row per setting with its costs."""
    done = sum(r.status in ("complete", "skipped") for r in runs)
    failed = [r for r in runs if r.status == "failed"]
    lines = [
        f"# Sweep `{grid.name}`",
        "",
        f"{len(runs)} runs: {done} complete, {len(failed)} failed, {len(runs) - done - len(failed)} pending. "
        "F_AA and AIA in %, mean ± sample std over the completed seeds (no ± with one seed). "
        "Params/round: parameters one client sends per round (LoRA factors + head; the downlink carries "
        "as many plus the residual); up/down: measured MB per round, all sampled clients together.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        presets = list(dict.fromkeys(r["preset"] for r in group))
        part = {p: next(r["partition"] for r in group if r["preset"] == p) for p in presets}
        unique = len(set(part.values())) == len(presets)
        heads = [part[p] if unique else p for p in presets]
        lines += [f"## {dataset}", "",
                  "| setting | " + " | ".join(f"{h} F_AA | {h} AIA" for h in heads) + " |",
                  "|---|" + "---:|---:|" * len(presets)]
        for label in dict.fromkeys(r["setting"] for r in group):
            cells = []
            for p in presets:
                row = next((r for r in group if r["preset"] == p and r["setting"] == label), None)
                cells += ["—", "—"] if row is None else [_pct(row["faa_mean"], row["faa_std"]),
                                                       _pct(row["aia_mean"], row["aia_std"])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## All settings", "",
              "| preset | setting | partition | seeds | F_AA (%) | AIA (%) | params/round | up MB/round | down MB/round |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seeds = f"{r['complete']}/{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(f"| {r['preset']} | {r['setting']} | {r['partition']} | {seeds} | "
                     f"{_pct(r['faa_mean'], r['faa_std'])} | {_pct(r['aia_mean'], r['aia_std'])} | "
                     f"{_params(r['params_per_round'])} | {_mb(r['uplink_bytes_per_round'])} | "
                     f"{_mb(r['downlink_bytes_per_round'])} |")
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.name}`: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def _write_outputs(result: SweepResult) -> None:
    grid, runs = result.grid, result.runs
    result.rows = summarize(runs)
    state = {
        "grid": grid.name,
        "source": str(grid.path) if grid.path is not None else grid.name,
        "runs": [{"name": r.name, "preset": r.preset_label, "setting": r.setting.label,
                  "overrides": list(r.setting.overrides), "seed": r.seed, "status": r.status,
                  "error": r.error, "seconds": round(r.seconds, 3), "run_dir": str(r.run_dir)} for r in runs],
    }
    atomic_write_text(grid.sweep_dir / "sweep.json", json.dumps(state, indent=1))
    atomic_write_text(grid.sweep_dir / "summary.csv", summary_csv(result.rows))
    atomic_write_text(grid.sweep_dir / "summary.md", summary_markdown(grid, runs, result.rows))

