"""``fedtalora sweep``: grid validation, run naming, skipping, resuming, crash survival and the summary numbers."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtalora.app import sweep as sweep
from fedtalora.app.cli import main
from fedtalora.app.sweep import load_grid, plan, run_local, run_sweep
from fedtalora.config import RunConfig
from fedtalora.errors import ConfigError


@pytest.fixture(scope="session")
def common(tiny_overrides) -> list[str]:
    """Tiny runs: 2 tasks x 1 round (a few seconds each)."""
    return [*(o for o in tiny_overrides if not o.startswith("partition.")), "fed.rounds_per_task=1"]


def write_grid(folder: Path, common: list[str], **grid: Any) -> Path:
    """Two presets next to the grid file (relative paths) and the grid itself."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dir.yaml").write_text("# Dirichlet\nextends: tiny-vit\npartition: {kind: dirichlet, beta: 0.5, min_samples: 5}\n")
    (folder / "iid.yaml").write_text("# IID\nextends: tiny-vit\npartition: {kind: iid}\n")
    data = {"name": "g", "output": str(folder / "out"), "presets": ["dir.yaml", "iid.yaml"], "seeds": [0, 1],
            "common": common, **grid}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory, common) -> tuple[Path, sweep.SweepResult]:
    """The 2-preset x 2-seed sweep, run once for the module."""
    folder = tmp_path_factory.mktemp("full")
    grid = load_grid(str(write_grid(folder, common)))
    return folder, run_sweep(grid)


# --------------------------------------------------------------------------------------------------
# The summary of a real sweep


def test_every_run_completes_in_its_own_named_directory(full_sweep) -> None:
    folder, result = full_sweep
    names = [r.name for r in result.runs]
    assert names == ["dir--seed0", "dir--seed1", "iid--seed0", "iid--seed1"]
    assert all(r.status == "complete" for r in result.runs)
    for r in result.runs:
        assert r.run_dir == folder / "out" / "g" / "runs" / r.name
        m = json.loads((r.run_dir / "metrics.json").read_text())
        assert m["complete"] is True and m["seed"] == r.seed
        saved = yaml.safe_load((r.run_dir / "config.yaml").read_text())
        assert saved["seed"] == r.seed and saved["fed"]["rounds_per_task"] == 1
    state = json.loads((folder / "out" / "g" / "sweep.json").read_text())
    assert [s["status"] for s in state["runs"]] == ["complete"] * 4


def test_summary_numbers_match_the_runs_metrics(full_sweep) -> None:
    folder, result = full_sweep
    rows = read_csv(folder / "out" / "g" / "summary.csv")
    md = (folder / "out" / "g" / "summary.md").read_text()
    assert [(r["preset"], r["setting"]) for r in rows] == [("dir", "default"), ("iid", "default")]
    for row in rows:
        ms = [json.loads((folder / "out" / "g" / "runs" / f"{row['preset']}--seed{s}" / "metrics.json").read_text())
              for s in (0, 1)]
        faa = [m["final_average_accuracy"] for m in ms]
        aia = [m["average_incremental_accuracy"] for m in ms]
        assert row["seeds"] == "2" and row["complete"] == "2" and row["failed"] == "0"
        assert float(row["faa_mean"]) == pytest.approx(statistics.mean(faa), abs=1e-12)
        assert float(row["faa_std"]) == pytest.approx(statistics.stdev(faa), abs=1e-12)
        assert float(row["aia_mean"]) == pytest.approx(statistics.mean(aia), abs=1e-12)
        assert float(row["aia_std"]) == pytest.approx(statistics.stdev(aia), abs=1e-12)
        assert int(row["params_per_round"]) == ms[0]["trainable_parameters"] == ms[1]["trainable_parameters"]
        up = statistics.mean(m["uplink_bytes_total"] / len(m["rounds"]) for m in ms)
        assert float(row["uplink_bytes_per_round"]) == pytest.approx(up)
        cell = f"{100 * statistics.mean(faa):.2f} ± {100 * statistics.stdev(faa):.2f}"
        assert cell in md
        assert f"{100 * statistics.mean(aia):.2f} ± {100 * statistics.stdev(aia):.2f}" in md
    # The paper layout: one table per dataset, a column pair per partition setting.
    assert "## digits" in md and "| setting | β=0.5 F_AA | β=0.5 AIA | iid F_AA | iid AIA |" in md


def test_rerunning_a_complete_sweep_runs_nothing(full_sweep) -> None:
    folder, _ = full_sweep
    before = {p: p.read_bytes() for p in (folder / "out" / "g" / "runs").rglob("metrics.json")}
    calls: list[str] = []
    result = run_sweep(load_grid(str(folder / "grid.yaml")),
                       runner=lambda cfg, run_dir, resume: calls.append(run_dir.name) or {})
    assert calls == [] and [r.status for r in result.runs] == ["skipped"] * 4
    assert {p: p.read_bytes() for p in before} == before
    rows = read_csv(folder / "out" / "g" / "summary.csv")
    assert [r["complete"] for r in rows] == ["2", "2"]  # skipped runs still count in the summary


# --------------------------------------------------------------------------------------------------
# Interrupted, then resumed


def test_resumed_sweep_repeats_nothing_already_complete(full_sweep, tmp_path: Path, common) -> None:
    from fedtalora.api import run

    grid = load_grid(str(write_grid(tmp_path, common, seeds=[0, 1], presets=["dir.yaml", "iid.yaml"])))
    grid = dataclasses.replace(grid, seeds=(0,))  # 2 runs: the first completes, the second is interrupted
    started: list[str] = []

    def interrupting(cfg: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
        started.append(run_dir.name)

        def progress(event: dict[str, Any]) -> None:
            if run_dir.name == "iid--seed0" and event["event"] == "client" and event["task"] == 1:
                raise KeyboardInterrupt  # Ctrl-C in the second round (task 2) of the third run

        return run(cfg, run_dir=run_dir, progress=progress, resume=resume).metrics

    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, runner=interrupting)
    assert started == ["dir--seed0", "iid--seed0"]
    runs = tmp_path / "out" / "g" / "runs"
    assert json.loads((runs / "iid--seed0" / "metrics.json").read_text())["complete"] is False
    state = json.loads((tmp_path / "out" / "g" / "sweep.json").read_text())
    assert [s["status"] for s in state["runs"]] == ["complete", "pending"]
    done = {p: p.read_bytes() for p in (runs / "dir--seed0").rglob("*") if p.is_file()}
    assert len(done) >= 3

    calls: list[tuple[str, bool]] = []

    def counting(cfg: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
        calls.append((run_dir.name, resume))
        return run_local(cfg, run_dir, resume)

    result = run_sweep(grid, runner=counting)
    assert calls == [("iid--seed0", True)]
    assert [r.status for r in result.runs] == ["skipped", "complete"]
    assert {p: p.read_bytes() for p in done} == done  # completed runs untouched, file by file
    # The resumed run ends exactly where an uninterrupted one does.
    full_folder, _ = full_sweep
    for name in ("iid--seed0", "dir--seed0"):
        a = json.loads((runs / name / "metrics.json").read_text())
        b = json.loads((full_folder / "out" / "g" / "runs" / name / "metrics.json").read_text())
        assert a["accuracy_matrix"] == b["accuracy_matrix"]
        assert a["final_average_accuracy"] == b["final_average_accuracy"]


# --------------------------------------------------------------------------------------------------
# A crashing run


def fake_runner(fail: set[str]):
    """Writes a complete metrics.json whose accuracy encodes the seed; raises for the named runs."""

    def runner(cfg: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
        if run_dir.name in fail:
            raise RuntimeError(f"boom in {run_dir.name}\nsecond line")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        m = {"complete": True, "final_average_accuracy": 0.5 + 0.1 * cfg.seed, "average_incremental_accuracy": 0.7,
             "trainable_parameters": 1234, "uplink_bytes_total": 400, "downlink_bytes_total": 800,
             "rounds": [{}, {}]}
        (run_dir / "metrics.json").write_text(json.dumps(m))
        return m

    return runner


def test_one_crashing_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path, common) -> None:
    grid = load_grid(str(write_grid(tmp_path, common, seeds=[0, 1, 2])))
    result = run_sweep(grid, runner=fake_runner({"dir--seed1"}))
    status = {r.name: r.status for r in result.runs}
    assert status.pop("dir--seed1") == "failed" and set(status.values()) == {"complete"}
    failed = result.failed[0]
    assert failed.error == "RuntimeError: boom in dir--seed1 second line"
    assert "Traceback" in (failed.run_dir / "error.log").read_text()
    rows = {r["preset"]: r for r in read_csv(tmp_path / "out" / "g" / "summary.csv")}
    assert rows["dir"]["complete"] == "2" and rows["dir"]["failed"] == "1"
    assert float(rows["dir"]["faa_mean"]) == pytest.approx(0.6)  # seeds 0 and 2 only
    assert float(rows["dir"]["faa_std"]) == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert float(rows["iid"]["uplink_bytes_per_round"]) == 200.0
    md = (tmp_path / "out" / "g" / "summary.md").read_text()
    assert "## Failed runs" in md and "boom in dir--seed1" in md and "2/3 (1 failed)" in md
    # Next time only the failed run is tried again.
    calls: list[str] = []
    retry = fake_runner(set())
    run_sweep(grid, runner=lambda c, d, r: calls.append(d.name) or retry(c, d, r))
    assert calls == ["dir--seed1"]


def test_a_run_that_fails_in_the_engine_does_not_stop_the_cli_sweep(tmp_path: Path, capsys, common) -> None:
    path = write_grid(tmp_path, common, presets=["iid.yaml"], seeds=[0],
                      overrides=[{"label": "bad blocks", "set": ["lora.blocks=[0,7]"]}, []])
    rc = main(["sweep", str(path), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1  # some run failed
    state = json.loads((tmp_path / "out" / "g" / "sweep.json").read_text())
    assert [(s["name"], s["status"]) for s in state["runs"]] == [("iid--bad-blocks--seed0", "failed"),
                                                                 ("iid--seed0", "complete")]
    assert "lora.blocks" in state["runs"][0]["error"] and "out of range" in state["runs"][0]["error"]
    assert "| iid | bad blocks | iid | 0/1 (1 failed) |" in out and "sweep directory:" in out


def test_a_directory_holding_another_config_is_not_overwritten(tmp_path: Path, common) -> None:
    grid = load_grid(str(write_grid(tmp_path, common, seeds=[0])))
    runs = plan(grid)
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "config.yaml").write_text("seed: 99\n")
    result = run_sweep(grid, runner=fake_runner(set()))
    assert result.runs[0].status == "failed" and "another config" in result.runs[0].error
    assert (runs[0].run_dir / "config.yaml").read_text() == "seed: 99\n"
    assert result.runs[1].status == "complete"


# --------------------------------------------------------------------------------------------------
# Grid files


def test_run_names_are_deterministic_and_settings_are_labelled(tmp_path: Path, common) -> None:
    path = write_grid(tmp_path, common, overrides=[[], ["fed.residual=false"], {"label": "Rank 2!", "set": ["lora.rank=2"]},
                                           ["lora.targets=[qkv,proj]", "lora.blocks=[0]"]])
    names = [r.name for r in plan(load_grid(str(path)))]
    assert names == [r.name for r in plan(load_grid(str(path)))]
    assert names[:8] == ["dir--seed0", "dir--seed1", "dir--fed.residual-false--seed0", "dir--fed.residual-false--seed1",
                         "dir--Rank-2--seed0", "dir--Rank-2--seed1", "dir--lora.targets-qkv-proj-lora.blocks-0--seed0",
                         "dir--lora.targets-qkv-proj-lora.blocks-0--seed1"]
    settings = [s.label for s in load_grid(str(path)).settings]
    assert settings == ["default", "fed.residual=false", "Rank 2!", "lora.targets=[qkv,proj] lora.blocks=[0]"]
    cfgs = {r.name: r.cfg for r in plan(load_grid(str(path)))}
    assert cfgs["dir--fed.residual-false--seed1"].fed.residual is False
    assert cfgs["dir--fed.residual-false--seed1"].seed == 1
    assert cfgs["dir--Rank-2--seed0"].lora.rank == 2 and cfgs["dir--seed0"].lora.rank == 4


def test_command_line_overrides_apply_to_every_run(tmp_path: Path, capsys, common) -> None:
    path = write_grid(tmp_path, common)
    grid = load_grid(str(path), ["train.lr=0.123"])
    assert {r.cfg.train.lr for r in plan(grid)} == {0.123}
    assert main(["sweep", str(path), "--dry-run", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.startswith("new") for line in out)
    assert not (tmp_path / "out").exists()


def test_shipped_grids_resolve(common) -> None:
    assert {"paper-cifar100", "paper-tiny-imagenet", "paper-imagenet-r", "ablations"} <= set(sweep.grid_names())
    for name in sweep.grid_names():
        runs = plan(load_grid(name))
        assert runs and len({r.name for r in runs}) == len(runs)
    main_table = plan(load_grid("paper-cifar100"))
    assert len(main_table) == 6 * 2 * 3
    assert {(r.cfg.partition.kind, r.cfg.partition.alpha if r.cfg.partition.kind == "quantity" else r.cfg.partition.beta)
            for r in main_table} == {("quantity", 2), ("quantity", 4), ("quantity", 6),
                                     ("dirichlet", 0.05), ("dirichlet", 0.1), ("dirichlet", 0.5)}


BAD_GRIDS = [
    ("notyaml", "presets: [a\n", "not valid YAML"),
    ("list", "- a\n- b\n", "YAML mapping"),
    ("unknown-key", "presets: [tiny-vit]\nseed: [0]\n", "unknown key 'seed'"),
    ("no-presets", "seeds: [0]\n", "'presets' is required"),
    ("empty-presets", "presets: []\n", "must not be empty"),
    ("preset-string", "presets: demo\n", "must be a list of strings"),
    ("unknown-preset", "presets: [nope]\n", "unknown preset 'nope'"),
    ("dup-preset", "presets: [tiny-vit, tiny-vit]\n", "twice"),
    ("bad-key", "presets: [tiny-vit]\noverrides: [[fed.nope=1]]\n", "fed.nope"),
    ("bad-value", "presets: [tiny-vit]\noverrides: [[fed.num_clients=0]]\n", "fed.num_clients"),
    ("no-equals", "presets: [tiny-vit]\noverrides: [[fed.residual]]\n", "key=value"),
    ("overrides-dict", "presets: [tiny-vit]\noverrides: {a: 1}\n", "non-empty list of settings"),
    ("setting-key", "presets: [tiny-vit]\noverrides: [{label: x, sett: []}]\n", "unknown key 'sett'"),
    ("same-slug", "presets: [tiny-vit]\noverrides: [{label: a b, set: []}, {label: a-b, set: [seed=1]}]\n", "share the run name"),
    ("neg-seed", "presets: [tiny-vit]\nseeds: [-1]\n", "seeds must be"),
    ("str-seed", "presets: [tiny-vit]\nseeds: [one]\n", "seeds must be"),
    ("dup-seed", "presets: [tiny-vit]\nseeds: [1, 1]\n", "twice"),
    ("bad-name", "name: a/b\npresets: [tiny-vit]\n", "plain folder name"),
    ("bad-common", "presets: [tiny-vit]\ncommon: [train.lr=fast]\n", "train.lr"),
]


@pytest.mark.parametrize(("case", "text", "words"), BAD_GRIDS, ids=[c[0] for c in BAD_GRIDS])
def test_bad_grid_files_exit_2_with_one_line(tmp_path: Path, capsys, case: str, text: str, words: str) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\n" + text if not text.startswith(("- ", "presets: [a\n")) else text)
    rc = main(["sweep", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fedtalora: error: ")
    assert words in err
    assert not (tmp_path / "out").exists()


def test_missing_grid_file_names_the_shipped_grids(tmp_path: Path, capsys) -> None:
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "paper-cifar100" in err and err.count("\n") == 1


def test_load_grid_errors_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("presets: [tiny-vit]\nseeds: []\n")
    with pytest.raises(ConfigError):
        load_grid(str(tmp_path / "g.yaml"))


def test_a_moved_sweep_directory_stays_complete(full_sweep, tmp_path: Path, common) -> None:
    """Completion is judged from the files (metrics.json + config.yaml up to output.*), not from memory."""
    folder, _ = full_sweep
    shutil.copytree(folder / "out" / "g" / "runs" / "dir--seed0", tmp_path / "out" / "g" / "runs" / "dir--seed0")
    grid = load_grid(str(write_grid(tmp_path, common, seeds=[0], presets=["dir.yaml"])))
    assert sweep.run_status(plan(grid)[0]) == "complete"
    result = run_sweep(grid, runner=fake_runner({"dir--seed0"}))  # would fail if it ran
    assert result.runs[0].status == "skipped"


def test_a_runner_with_sparser_metrics_plugs_in(tmp_path: Path, common) -> None:
    """Another engine may record only the accuracies: the summary leaves the other cells empty."""

    def sparse(cfg: RunConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        m = {"complete": True, "final_average_accuracy": 0.25, "average_incremental_accuracy": 0.5}
        (run_dir / "metrics.json").write_text(json.dumps(m))
        return m

    grid = load_grid(str(write_grid(tmp_path, common, seeds=[3])))
    result = run_sweep(grid, runner=sparse)
    assert [r.status for r in result.runs] == ["complete", "complete"]
    row = read_csv(tmp_path / "out" / "g" / "summary.csv")[0]
    assert float(row["faa_mean"]) == 0.25 and row["faa_std"] == "" and row["params_per_round"] == ""
    assert "| dir | default | β=0.5 | 1/1 | 25.00 | 50.00 | — | — | — |" in (tmp_path / "out" / "g" / "summary.md").read_text()


# --------------------------------------------------------------------------------------------------
# Parallel workers


def _without_timing(m: dict[str, Any]) -> dict[str, Any]:
    m = {k: v for k, v in m.items() if k != "wall_seconds"}
    m["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in m["rounds"]]
    m["tasks"] = [{k: v for k, v in t.items() if k != "seconds"} for t in m["tasks"]]
    return m


def test_parallel_workers_give_the_serial_sweeps_results(full_sweep, tmp_path: Path, common) -> None:
    """``workers=2`` runs each run in a spawned process: same statuses, same metrics, one summary."""
    folder, serial = full_sweep
    grid = load_grid(str(write_grid(tmp_path, [*common, "train.threads=1"])))
    seen: list[int] = []
    result = run_sweep(grid, workers=2, on_run=lambda spec, i, n: seen.append(i))
    assert [r.status for r in result.runs] == ["complete"] * 4
    assert sorted(seen) == [0, 1, 2, 3]
    for a, b in zip(serial.runs, result.runs, strict=True):
        ma = json.loads((a.run_dir / "metrics.json").read_text())
        mb = json.loads((b.run_dir / "metrics.json").read_text())
        assert _without_timing(ma) == _without_timing(mb)
    state = json.loads((grid.sweep_dir / "sweep.json").read_text())
    assert [s["status"] for s in state["runs"]] == ["complete"] * 4
    assert [r["faa_mean"] for r in result.rows] == [r["faa_mean"] for r in serial.rows]
    again = run_sweep(grid, workers=2)
    assert [r.status for r in again.runs] == ["skipped"] * 4


def test_a_crashing_run_in_a_worker_is_recorded(tmp_path: Path, common) -> None:
    grid = load_grid(str(write_grid(tmp_path, common, seeds=[0], overrides=[[], ["data.root=/nonexistent", "data.dataset=cifar100"]])))
    result = run_sweep(grid, workers=2)
    assert [r.status for r in result.runs] == ["complete", "failed", "complete", "failed"]
    assert all("cifar" in r.error.lower() for r in result.failed)


def test_workers_below_one_are_refused(tmp_path: Path, capsys, common) -> None:
    path = write_grid(tmp_path, common)
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(load_grid(str(path)), workers=0)
    assert main(["sweep", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers" in err[0]


def test_the_study_grids_resolve(tmp_path: Path) -> None:
    """benchmarks/study_reswu.py: every cell of both benchmarks is a valid config; pairs for the gains exist."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "study_reswu.py"
    spec = importlib.util.spec_from_file_location("study_reswu", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ckpt = tmp_path / "vit.safetensors"
    for name in ("text", "image", "text-full"):
        grid = load_grid(str(study.write_grid(name, tmp_path / "out", tmp_path / "data",
                                              ckpt if name == "image" else None, ["train.device=cpu"])))
        runs = plan(grid)
        cells = study.cells(study.BENCHMARKS[name])
        assert len(runs) == 3 * len(cells) == {"text": 168, "image": 144, "text-full": 27}[name]
        methods = {r.cfg.method for r in runs}
        assert methods == {"fedtalora", "fedlora", "head-only"}
        lrs = sorted({r.cfg.train.lr for r in runs if r.cfg.method != "head-only"})
        assert lrs[:4] == [0.001, 0.005, 0.02, 0.1] and lrs[-1] / lrs[0] >= 100  # >= 4 rates, two decades
        assert all(r.cfg.model.checkpoint == (str(ckpt.resolve()) if name == "image" else "") for r in runs)
        for r in runs:  # every fedtalora cell has its fedlora twin (same everything but the method)
            if r.cfg.method == "fedtalora":
                twin = r.setting.label.replace("fedtalora", "fedlora")
                assert any(o.setting.label == twin and o.seed == r.seed for o in runs)
    text = plan(load_grid(str(study.write_grid("text", tmp_path / "o2", tmp_path / "data", None, []))))
    assert {(r.cfg.partition.kind, r.cfg.partition.beta if r.cfg.partition.kind == "dirichlet" else r.cfg.partition.alpha)
            for r in text} == {("dirichlet", 0.05), ("dirichlet", 0.5), ("quantity", 3)}
    assert {r.cfg.train.local_epochs for r in text} == {1, 5}
    assert {(r.cfg.lora.rank, tuple(r.cfg.lora.blocks)) for r in text if r.cfg.method != "head-only"} == {
        (4, (0, 1, 2)), (16, (0, 1, 2)), (4, (0, 1, 2, 3, 4, 5)), (16, (0, 1, 2, 3, 4, 5))}


def test_the_study_pairs_gains_by_seed_hand_example() -> None:
    """Residual gain = fedtalora - fedlora and LoRA gain = fedtalora - head-only, per seed, then mean +- std."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "study_reswu.py"
    spec = importlib.util.spec_from_file_location("study_reswu_gains", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)

    def rec(method: str, lr: float | None, faa: dict[int, float], loss: float | None) -> dict[str, Any]:
        cell = {"method": method, "lr": lr, "partition": "dir0.05", "epochs": 1, "rank": 4, "blocks": "lower"}
        seeds = {s: {"faa": v, "aia": v, "forgetting": 0.0, "agg_loss_mean": loss, "agg_loss_max": loss,
                     "agg_error_max": 0.0, "downlink_mb": 1.0, "seconds": 1.0} for s, v in faa.items()}
        return {**cell, "label": study.cell_label(cell), "seeds": seeds}

    records = [rec("fedtalora", 0.1, {0: 0.50, 1: 0.40, 2: 0.30}, 1e-7),
               rec("fedlora", 0.1, {0: 0.45, 1: 0.40, 2: 0.35}, 0.2),  # seed 2 missing below for head-only
               rec("head-only", None, {0: 0.30, 1: 0.20}, None)]
    rows = {r["method"]: r for r in study.analyse(records)}
    ft = rows["fedtalora"]
    # residual gains per seed: +0.05, 0.00, -0.05 -> mean 0, sample std 0.05
    assert ft["residual_gain"] == pytest.approx(0.0, abs=1e-12) and ft["residual_gain_std"] == pytest.approx(0.05)
    assert ft["residual_gain_seeds"] == 3 and ft["fedlora_agg_loss_mean"] == pytest.approx(0.2)
    # LoRA gains only on the seeds both have: +0.20, +0.20
    assert ft["lora_gain"] == pytest.approx(0.2) and ft["lora_gain_std"] == pytest.approx(0.0)
    assert ft["lora_gain_seeds"] == 2
    assert ft["faa"] == pytest.approx(0.4) and ft["faa_std"] == pytest.approx(0.1) and ft["n"] == 3
    assert "residual_gain" not in rows["fedlora"] and "lora_gain" not in rows["head-only"]
