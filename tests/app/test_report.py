"""``fedtalora report`` and ``fedtalora compare`` on real tiny runs: the files exist, the PNGs decode at
the documented size, and the tables carry the numbers of metrics.json."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from fedtalora.api import run  # noqa: E402
from fedtalora.app.cli import main  # noqa: E402
from fedtalora.app.compare import COLUMNS, COMPARE_PX, compare, find_runs  # noqa: E402
from fedtalora.app.report import PLOT_PX, PLOTS, fmt, load_run, write_report  # noqa: E402
from fedtalora.config import resolve  # noqa: E402


def _png_size(path: Path) -> tuple[int, int]:
    img = imread(str(path))  # decodes the file; fails on a truncated or non-PNG file
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.std() > 0  # not a blank canvas
    return img.shape[1], img.shape[0]


@pytest.fixture(scope="module")
def sweep(tiny_overrides, tmp_path_factory) -> Path:
    """A sweep-like tree: residual on (seeds 0 and 1) and off (seed 0), nested two levels deep."""
    root = tmp_path_factory.mktemp("sweep")
    for residual, seed in (("true", 0), ("true", 1), ("false", 0)):
        cfg = resolve("tiny-vit", [*tiny_overrides, f"fed.residual={residual}", f"seed={seed}", "output.checkpoints=none"])
        run(cfg, run_dir=root / f"residual-{residual}" / f"seed-{seed}")
    return root


@pytest.fixture()
def run_dir(sweep) -> Path:
    return sweep / "residual-true" / "seed-0"


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


# --- report -----------------------------------------------------------------------------------------


def test_report_writes_markdown_and_plots_of_the_documented_size(run_dir, tmp_path) -> None:
    rep = write_report(run_dir, tmp_path)
    assert [p.name for p in rep.plots] == list(PLOTS)
    for p in rep.plots:
        assert _png_size(p) == PLOT_PX
    md = rep.markdown.read_text()
    for name in PLOTS:
        assert f"]({name})" in md  # relative links that work next to report.md


def test_report_tables_carry_the_metrics(run_dir, tmp_path) -> None:
    m = _metrics(run_dir)
    md = write_report(run_dir, tmp_path).markdown.read_text()
    assert f"| final average accuracy (F_AA) | {m['final_average_accuracy']:.4f} |" in md
    assert f"| average incremental accuracy (AIA) | {m['average_incremental_accuracy']:.4f} |" in md
    assert f"| forgetting | {m['forgetting']:.4f} |" in md
    # The accuracy matrix, row by row (2 tasks: the first row has one entry).
    acc = m["accuracy_matrix"]
    assert f"| 1 | {acc[0][0]:.4f} |  |" in md
    assert f"| 2 | {acc[1][0]:.4f} | {acc[1][1]:.4f} |" in md
    assert "| status | complete |" in md
    assert "NOT pretrained" in md
    assert m["environment"]["torch"] in md


def test_report_defaults_to_the_run_directory_via_cli(sweep, tmp_path, capsys) -> None:
    target = tmp_path / "run"
    shutil.copytree(sweep / "residual-false" / "seed-0", target)
    assert main(["report", str(target)]) == 0
    out = capsys.readouterr().out
    assert str(target / "report.md") in out
    assert all((target / name).is_file() for name in PLOTS)


def test_report_of_an_incomplete_run_with_zero_and_missing_errors(run_dir, tmp_path) -> None:
    """What a run interrupted after task 1 leaves, with an exactly-zero error and a skipped round."""
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    m = _metrics(partial)
    m.update(complete=False, tasks=m["tasks"][:1], accuracy_matrix=m["accuracy_matrix"][:1],
             seen_accuracy=m["seen_accuracy"][:1], rounds=m["rounds"][:3])
    m["rounds"][0]["aggregation_error"] = 0.0
    m["rounds"][2]["aggregation_error"] = None
    (partial / "metrics.json").write_text(json.dumps(m))
    rep = write_report(partial)
    md = rep.markdown.read_text()
    assert "incomplete (1 of 2 tasks)" in md
    assert "Exactly 0 in 1 of 3 rounds." in md
    assert all(_png_size(p) == PLOT_PX for p in rep.plots)


def test_report_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.json" in err
    (tmp_path / "metrics.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid JSON" in err


def test_missing_matplotlib_says_what_to_install(run_dir, tmp_path, monkeypatch, capsys) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "fedtalora: error: plots need matplotlib: pip install fedtalora[report]\n"
    assert main(["compare", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "pip install fedtalora[report]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written


# --- compare ----------------------------------------------------------------------------------------


def test_find_runs_walks_a_tree_and_accepts_run_dirs(sweep, run_dir) -> None:
    found = find_runs([sweep])
    assert [p.relative_to(sweep).as_posix() for p in found] == [
        "residual-false/seed-0", "residual-true/seed-0", "residual-true/seed-1"]
    assert find_runs([run_dir, sweep / "residual-true"]) == [run_dir, sweep / "residual-true" / "seed-1"]


def test_compare_csv_equals_metrics(sweep, tmp_path) -> None:
    res = compare([sweep], tmp_path)
    with open(res.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert len(rows) == 3
    for row in rows:
        m = _metrics(sweep / row["run"])
        for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "wall_seconds",
                    "max_aggregation_error"):
            assert float(row[key]) == m[key], key  # full precision, not rounded
        assert int(row["trainable_parameters"]) == m["trainable_parameters"]
        assert int(row["uplink_bytes_total"]) == m["uplink_bytes_total"]
        assert int(row["downlink_bytes_total"]) == m["downlink_bytes_total"]
        assert float(row["uplink_bytes_per_round"]) == m["uplink_bytes_total"] / len(m["rounds"])
        assert int(row["seed"]) == m["seed"]
        assert row["label"] == f"fed.residual={row['run'].split('/')[0].split('-')[1]}"


def test_compare_groups_settings_and_plots(sweep, tmp_path) -> None:
    res = compare([sweep], tmp_path)
    assert _png_size(res.plot) == COMPARE_PX
    groups = {g.label: g for g in res.groups}
    assert set(groups) == {"fed.residual=true", "fed.residual=false"}
    on = groups["fed.residual=true"]
    faa = [_metrics(sweep / "residual-true" / f"seed-{s}")["final_average_accuracy"] for s in (0, 1)]
    mean, std = on.stat("final_average_accuracy")
    assert mean == pytest.approx(statistics.fmean(faa)) and std == pytest.approx(statistics.stdev(faa))
    md = res.markdown.read_text()
    assert f"| fed.residual=true | 2 | {mean:.4f} ± {std:.4f} |" in md
    off = _metrics(sweep / "residual-false" / "seed-0")
    assert f"| residual-false/seed-0 | fed.residual=false | 0 | {fmt(off['final_average_accuracy'])} |" in md
    # Naive averaging loses part of the update; ResWU is exact to float precision.
    assert groups["fed.residual=false"].stat("max_aggregation_error")[0] > 1e-3
    assert on.stat("max_aggregation_error")[0] < 1e-5
    assert on.stat("max_aggregation_error_rounding")[0] <= 2  # float32 resolution


def test_compare_cli_several_paths(sweep, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    a, b = sweep / "residual-true" / "seed-0", sweep / "residual-false" / "seed-0"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| residual-true/seed-0 | fed.residual=true |" in stdout
    assert {p.name for p in out.iterdir()} == {"compare.csv", "compare.md", "compare.png"}
    assert "Per setting" not in (out / "compare.md").read_text()  # one run per setting: no group table


def test_compare_of_a_folder_without_runs_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directory" in err


def test_load_run_reads_config(run_dir) -> None:
    r = load_run(run_dir)
    assert r.num_tasks == 2 and r.rounds_per_task == 2
    assert r.per_round("uplink_bytes") == _metrics(run_dir)["uplink_bytes_total"] / 4


def test_compare_fills_keys_an_older_config_lacks_with_defaults(sweep, tmp_path) -> None:
    """A run written before a config key existed must not look like a different setting."""
    import yaml

    old = tmp_path / "old"
    shutil.copytree(sweep / "residual-true" / "seed-1", old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    assert cfg["fed"].pop("weighting") == "samples"  # the default
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = compare([sweep / "residual-true" / "seed-0", old], tmp_path / "out")
    assert [r["label"] for r in res.rows] == ["fedtalora", "fedtalora"]
    assert len(res.groups) == 1
