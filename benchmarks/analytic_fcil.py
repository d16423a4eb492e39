"""Full Banking77 + MiniLM through the real loop: classifiers x methods x partitions, with a validation split.

Every row is one ``fedtalora run banking77`` (the same loop as the CLI) with ``data.val_fraction`` set, so
that any choice (lambda, M, head lr) is read from ``val_*`` fields, never from test accuracy. The
centralized ceiling is the same loop with ``scenario.num_tasks=1 fed.num_clients=1``. Finished run
directories under ``--runs`` are reused, so an interrupted sweep continues where it stopped.

    python benchmarks/analytic_fcil.py --data /path/to/banking77 --runs /tmp/analytic/runs \\
        --rows fedtalora-analytic head-only-analytic ceiling --partitions dirichlet quantity --seeds 0 1 2 \\
        --set fed.rounds_per_task=1 train.local_epochs=1

The SGD head's learning rate (``train.head_lr``) is chosen on validation: ``--sweep-head-lr 0.01 0.03 0.1 0.3 1``
first runs ``head-only-head`` (frozen backbone, feature cache) for every candidate on the sweep partition and
seed(s), picks the one with the best mean ``val_final_average_accuracy`` (ties: the smaller lr), and then runs
the rows whose prediction is the SGD head (``*-head``, ``ceiling``) with it; ``--head-lr X`` sets it directly.
Other rows keep the preset's head lr. With ``--sweep-each`` every SGD-head row (``*-head``, ``ceiling``,
``fedlora``) instead chooses its own lr among the candidates on its own validation runs (``fedlora`` takes
``fedtalora-head``'s: the same model and head): the rate that suits a frozen, task-masked federated head can
make the one-task joint head diverge. Frozen-backbone rows (``head-only-*``) run with
``train.feature_cache=host``: the same numbers, computed once per sample.

    python benchmarks/analytic_fcil.py --data /path/to/banking77 --runs /tmp/analytic/runs \
        --sweep-head-lr 0.01 0.03 0.1 0.3 1 --rows head-only-head fedtalora-head ceiling --seeds 0 \
        --set fed.rounds_per_task=1 train.local_epochs=1

Writes ``benchmarks/results/analytic_fcil.{table.md,json}`` and appends every finished run to
``analytic_fcil.jsonl`` (as it finishes): F_AA and AIA (test, and validation), mean ± std over the seeds, and the
uplink per round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedtalora.config import CEILING_OVERRIDES

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
    # one client holds everything, all classes in one task: the partition does not apply
    "ceiling": ["method=fedtalora", *CEILING_OVERRIDES],
    "ceiling-analytic": ["method=fedtalora", "classifier.kind=analytic", *CEILING_OVERRIDES],
}
CACHED = ["train.feature_cache=host"]  # frozen backbone: cache its activations (same results, faster)
HEAD_ROWS = {"fedtalora-head", "head-only-head", "ceiling", "fedlora"}  # rows that predict with the SGD head
SWEEP_AS = {"fedlora": "fedtalora-head"}
"""``--sweep-each``: rows that take the head lr chosen for another row (fedlora is fedtalora-head without the
residual: the same model and head, so the same lr)."""


def is_ceiling(row: str) -> bool:
    return row.startswith("ceiling")


def row_overrides(row: str, head_lr: float | None) -> list[str]:
    """The overrides of ``row``: its method/classifier, the feature cache for a frozen backbone, the head lr."""
    out = list(ROWS[row])
    if row.startswith("head-only"):
        out += CACHED
    if head_lr is not None and row in HEAD_ROWS:
        out.append(f"train.head_lr={head_lr:g}")
    return out


def run_name(row: str, part: str, seed: int, head_lr: float | None) -> str:
    lr = f"-lr{head_lr:g}" if head_lr is not None and row in HEAD_ROWS else ""
    return f"{row}{lr}-{seed}" if is_ceiling(row) else f"{row}{lr}-{part}-{seed}"


def choose_head_lr(records: list[dict[str, Any]]) -> float:
    """The head lr with the best mean validation F_AA (ties: the smaller lr); never reads test accuracy."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        by_lr.setdefault(r["head_lr"], []).append(r["val_F_AA"])
    return max(sorted(by_lr), key=lambda lr: (float(np.mean(by_lr[lr])), -lr))
PARTITIONS = {"dirichlet": ["partition.kind=dirichlet", "partition.beta=0.1"],
              "quantity": ["partition.kind=quantity", "partition.alpha=2"]}


def run_one(name: str, args: argparse.Namespace, row: str, part: str, seed: int,
            head_lr: float | None = None) -> dict[str, Any] | None:
    run_dir = Path(args.runs) / name
    metrics = run_dir / "metrics.json"
    ran = False
    if not (metrics.is_file() and json.loads(metrics.read_text()).get("complete")):
        if args.no_run:
            return None
        ran = True
        cmd = [sys.executable, "-m", "fedtalora", "run", "banking77", f"data.root={args.data}", "train.device=cpu",
               f"seed={seed}", f"data.val_fraction={args.val_fraction}", *PARTITIONS[part], *row_overrides(row, head_lr), *args.set,
               f"output.dir={args.runs}", f"output.name={name}", "--quiet"]
        subprocess.run(cmd, check=True)
    m = json.loads(metrics.read_text())
    rec = {"row": row, "head_lr": yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["head_lr"], "run": name, "partition": part, "seed": seed, "F_AA": m["final_average_accuracy"],
            "AIA": m["average_incremental_accuracy"], "val_F_AA": m.get("val_final_average_accuracy"),
            "uplink_bytes_total": m["uplink_bytes_total"], "wall_seconds": m.get("wall_seconds"),
            "uplink_bytes_per_round": [r["uplink_bytes"] for r in m["rounds"]],
            "rounds_per_task": len(m["rounds"]) // max(len(m["tasks"]), 1),
            # what one client sends for one task (all its rounds, and the end-of-task statistics)
            "uplink_bytes_per_client_task": m["uplink_bytes_total"] * len(m["rounds"])
            / max(len(m["tasks"]), 1) / max(sum(len(r["clients"]) for r in m["rounds"]), 1)}
    if ran:  # every run, as soon as it finishes (runs reused from --runs were recorded when they ran)
        with (RESULTS / "analytic_fcil.jsonl").open("a") as fh:
            fh.write(json.dumps({k: v for k, v in rec.items() if k != "uplink_bytes_per_round"}
                                | {"set": args.set}) + "\n")
    return rec


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
    ap.add_argument("--head-lr", type=float, default=None, help="train.head_lr of the SGD-head rows (default: preset)")
    ap.add_argument("--sweep-head-lr", nargs="*", type=float, default=[],
                    help="candidate head lrs: chosen on validation (head-only-head, cached), overrides --head-lr")
    ap.add_argument("--sweep-each", action="store_true",
                    help="every SGD-head row chooses its own head lr among --sweep-head-lr on its own validation "
                         "(runs of that row on --sweep-partition / --sweep-seeds) instead of head-only-head's")
    ap.add_argument("--sweep-partition", default="dirichlet", choices=list(PARTITIONS))
    ap.add_argument("--sweep-seeds", nargs="+", type=int, default=[0])
    args = ap.parse_args()
    reuse = dict(r.split("=", 1) for r in args.reuse)
    RESULTS.mkdir(exist_ok=True)
    head_lr = args.head_lr
    sweep: list[dict[str, Any]] = []

    def sweep_row(row: str) -> float | None:
        """The head lr among ``--sweep-head-lr`` with the best validation F_AA of ``row``'s own runs."""
        recs = []
        for lr in args.sweep_head_lr:
            for seed in args.sweep_seeds:
                rec = run_one(run_name(row, args.sweep_partition, seed, lr), args, row, args.sweep_partition, seed, lr)
                if rec is not None:
                    recs.append(rec)
                    print(json.dumps({k: v for k, v in rec.items() if k != "uplink_bytes_per_round"}), flush=True)
        sweep.extend(r for r in recs if r not in sweep)
        if not recs:
            return None
        chosen = choose_head_lr(recs)
        print(f"{row}: head lr chosen on validation: {chosen:g}", flush=True)
        return chosen

    row_lr: dict[str, float | None] = {row: head_lr for row in args.rows}
    if args.sweep_head_lr and args.sweep_each:  # each SGD-head row on its own validation
        for row in args.rows:
            if row in HEAD_ROWS:
                row_lr[row] = sweep_row(SWEEP_AS.get(row, row))
    elif args.sweep_head_lr:  # one choice for every SGD-head row: frozen backbone + feature cache
        head_lr = sweep_row("head-only-head")
        row_lr = {row: head_lr for row in args.rows}
    records = []
    for row in args.rows:
        for part in (args.partitions[:1] if is_ceiling(row) else args.partitions):
            for seed in args.seeds:
                key = f"{row}:{part}:{seed}"
                lr = row_lr[row]
                rec = run_one(reuse.get(key, run_name(row, part, seed, lr)), args, row, part, seed, lr)
                if rec is None:
                    continue
                records.append(rec)
                print(json.dumps({k: v for k, v in records[-1].items() if k != "uplink_bytes_per_round"}), flush=True)
    lines = ["| row | partition | head lr | seeds | F_AA % | AIA % | val F_AA % | uplink MB per round (mean) "
             "| uplink MB per client and task |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sweep:
        lines.append(f"| sweep: {r['row']} | {r['partition']} | {r['head_lr']:g} | {r['seed']} | "
                     f"{r['F_AA'] * 100:.2f} | {r['AIA'] * 100:.2f} | {r['val_F_AA'] * 100:.2f} | "
                     f"{np.mean(r['uplink_bytes_per_round']) / 1e6:.1f} | {r['uplink_bytes_per_client_task'] / 1e6:.2f} |")
    for row in args.rows:
        for part in args.partitions:
            rs = [r for r in records if r["row"] == row and r["partition"] == part]
            lrs = sorted({r["head_lr"] for r in rs})
            if not rs:
                continue
            f = np.array([r["F_AA"] for r in rs]) * 100
            a = np.array([r["AIA"] for r in rs]) * 100
            v = np.array([r["val_F_AA"] for r in rs], dtype=float) * 100
            up = np.mean([np.mean(r["uplink_bytes_per_round"]) for r in rs]) / 1e6
            up_ct = np.mean([r["uplink_bytes_per_client_task"] for r in rs]) / 1e6
            lines.append(f"| {row} | {'iid (1 client)' if is_ceiling(row) else part} | "
                         f"{'/'.join(f'{x:g}' for x in lrs)} | {len(rs)} | {f.mean():.2f}{_sd(f)} | {a.mean():.2f}{_sd(a)} | "
                         f"{v.mean():.2f}{_sd(v)} | {up:.1f} | {up_ct:.2f} |")
    (RESULTS / "analytic_fcil.json").write_text(json.dumps({"set": args.set, "head_lr": row_lr, "sweep": sweep,
                                                            "records": records}, indent=1))
    (RESULTS / "analytic_fcil.table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
