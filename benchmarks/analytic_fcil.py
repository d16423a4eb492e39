"""Full Banking77 + MiniLM through the real loop: classifiers x methods x partitions, with a validation split.

Every row is one ``fedtalora run banking77`` (the same loop as the CLI) with ``data.val_fraction`` set, so
that any choice (lambda, M, head lr) is read from ``val_*`` fields, never from test accuracy. The
centralized ceiling is the same loop with ``scenario.num_tasks=1 fed.num_clients=1``. Finished run
directories under ``--runs`` are reused, so an interrupted sweep continues where it stopped.

    python benchmarks/analytic_fcil.py --data /path/to/banking77 --runs /tmp/analytic/runs \\
        --rows fedtalora-analytic head-only-analytic ceiling --partitions dirichlet quantity --seeds 0 1 2 \\
        --set fed.rounds_per_task=1 train.local_epochs=1

Writes ``benchmarks/results/analytic_fcil.{md,json}``: F_AA and AIA (test, and validation), mean ± std over
the seeds, and the uplink per client and task of each classifier's end-of-task statistics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROWS: dict[str, list[str]] = {
    "fedtalora-head": ["method=fedtalora", "classifier.kind=head"],
    "fedtalora-prototype": ["method=fedtalora", "classifier.kind=prototype"],
    "fedtalora-analytic": ["method=fedtalora", "classifier.kind=analytic"],
    "fedtalora-analytic-first": ["method=fedtalora", "classifier.kind=analytic", "lora.train_tasks=first"],
    "head-only-head": ["method=head-only", "classifier.kind=head"],
    "head-only-prototype": ["method=head-only", "classifier.kind=prototype"],
    "head-only-analytic": ["method=head-only", "classifier.kind=analytic"],
    "fedlora": ["method=fedlora"],
    "pilora": ["method=pilora"],
    "ceiling": ["method=fedtalora", "scenario.num_tasks=1", "fed.num_clients=1", "fed.clients_per_round=1",
                "partition.kind=iid"],  # one client holds everything: the partition does not apply
}
PARTITIONS = {"dirichlet": ["partition.kind=dirichlet", "partition.beta=0.1"],
              "quantity": ["partition.kind=quantity", "partition.alpha=2"]}


def run_one(name: str, args: argparse.Namespace, row: str, part: str, seed: int) -> dict[str, Any] | None:
    run_dir = Path(args.runs) / name
    metrics = run_dir / "metrics.json"
    if not (metrics.is_file() and json.loads(metrics.read_text()).get("complete")):
        if args.no_run:
            return None
        cmd = [sys.executable, "-m", "fedtalora", "run", "banking77", f"data.root={args.data}", "train.device=cpu",
               f"seed={seed}", f"data.val_fraction={args.val_fraction}", *PARTITIONS[part], *ROWS[row], *args.set,
               f"output.dir={args.runs}", f"output.name={name}", "--quiet"]
        subprocess.run(cmd, check=True)
    m = json.loads(metrics.read_text())
    return {"row": row, "partition": part, "seed": seed, "F_AA": m["final_average_accuracy"],
            "AIA": m["average_incremental_accuracy"], "val_F_AA": m.get("val_final_average_accuracy"),
            "uplink_bytes_total": m["uplink_bytes_total"], "wall_seconds": m.get("wall_seconds"),
            "uplink_bytes_per_round": [r["uplink_bytes"] for r in m["rounds"]],
            "rounds_per_task": len(m["rounds"]) // max(len(m["tasks"]), 1)}


def _sd(x: np.ndarray) -> str:
    return f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", default="/tmp/analytic/runs")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run (the budget)")
    ap.add_argument("--reuse", nargs="*", default=[], help="row:partition:seed=RUN_NAME of finished runs")
    ap.add_argument("--no-run", action="store_true", help="tabulate finished runs only")
    args = ap.parse_args()
    reuse = dict(r.split("=", 1) for r in args.reuse)
    records = []
    for row in args.rows:
        for part in args.partitions:
            for seed in args.seeds:
                key = f"{row}:{part}:{seed}"
                name = f"ceiling-{seed}" if row == "ceiling" else key.replace(":", "-")
                rec = run_one(reuse.get(key, name), args, row, part, seed)
                if rec is None:
                    continue
                records.append(rec)
                print(json.dumps({k: v for k, v in records[-1].items() if k != "uplink_bytes_per_round"}), flush=True)
    lines = ["| row | partition | seeds | F_AA % | AIA % | val F_AA % | uplink MB per round (mean) |", "|---|---|---|---|---|---|---|"]
    for row in args.rows:
        for part in args.partitions:
            rs = [r for r in records if r["row"] == row and r["partition"] == part]
            if not rs:
                continue
            f = np.array([r["F_AA"] for r in rs]) * 100
            a = np.array([r["AIA"] for r in rs]) * 100
            v = np.array([r["val_F_AA"] for r in rs], dtype=float) * 100
            up = np.mean([np.mean(r["uplink_bytes_per_round"]) for r in rs]) / 1e6
            lines.append(f"| {row} | {part} | {len(rs)} | {f.mean():.2f}{_sd(f)} | {a.mean():.2f}{_sd(a)} | "
                         f"{v.mean():.2f}{_sd(v)} | {up:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analytic_fcil.json").write_text(json.dumps({"set": args.set, "records": records}, indent=1))
    (RESULTS / "analytic_fcil.table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
