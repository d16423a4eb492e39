"""The README's showcase plots, from the demo: one command regenerates all of them.

Runs ``fedtalora demo`` and ``fedtalora demo fed.residual=false`` (two fresh processes, offline, ~1 min each on
two CPU cores), then ``fedtalora report`` on the first and ``fedtalora compare`` on both, and copies the plots to
``docs/img/``:

* ``demo-accuracy-matrix.png``, ``demo-accuracy.png``, ``demo-aggregation-error.png``,
  ``demo-communication.png`` (the report of ``fedtalora demo``);
* ``demo-compare.png`` (the demo with the exact residual aggregation on and off).

It prints the numbers the README quotes (F_AA, AIA, forgetting, aggregation errors, bytes per round) as one JSON
line per run. Needs matplotlib (``pip install -e ".[report]"``).

Usage (from the repository root)::

    python benchmarks/demo_plots.py                   # run both demos, write docs/img/demo-*.png
    python benchmarks/demo_plots.py --runs DIR        # reuse DIR/demo and DIR/no-residual if they exist
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "docs" / "img"

RUNS = {"demo": [], "no-residual": ["fed.residual=false"]}
"""Run name -> overrides of ``fedtalora demo``."""

REPORT_PLOTS = {"accuracy_matrix.png": "demo-accuracy-matrix.png", "accuracy.png": "demo-accuracy.png",
                "aggregation_error.png": "demo-aggregation-error.png",
                "communication.png": "demo-communication.png"}
"""``fedtalora report`` plot -> the README's file in docs/img."""


def fedtalora(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-m", "fedtalora", *args], check=True, env=env)


def numbers(run_dir: Path) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    rounds = m["rounds"]
    keys = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "max_aggregation_error",
            "max_aggregation_error_accumulated")
    return {"run": run_dir.name, **{k: m.get(k) for k in keys},
            "uplink_bytes_per_round": sum(r["uplink_bytes"] for r in rounds) / len(rounds),
            "downlink_bytes_per_round": sum(r["downlink_bytes"] for r in rounds) / len(rounds),
            "max_aggregation_error_rounding": max((r.get("aggregation_error_rounding") or 0.0) for r in rounds),
            "wall_seconds": m.get("wall_seconds")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=None, metavar="DIR",
                    help="keep the runs here (reused if already complete); default: a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs if args.runs is not None else Path(tmp)
        for name, overrides in RUNS.items():
            if not (runs / name / "metrics.json").is_file():
                fedtalora("demo", "--quiet", f"output.dir={runs}", f"output.name={name}", "output.overwrite=true",
                          *overrides)
            print(json.dumps(numbers(runs / name)), flush=True)
        report = Path(tmp) / "report"
        fedtalora("report", str(runs / "demo"), "--out", str(report))
        IMG.mkdir(parents=True, exist_ok=True)
        for src, dst in REPORT_PLOTS.items():
            shutil.copyfile(report / src, IMG / dst)
        cmp = Path(tmp) / "compare"
        fedtalora("compare", *(str(runs / name) for name in RUNS), "--out", str(cmp))
        shutil.copyfile(cmp / "compare.png", IMG / "demo-compare.png")
    print(f"written: {', '.join(sorted([*REPORT_PLOTS.values(), 'demo-compare.png']))} in {IMG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
