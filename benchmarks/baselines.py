"""GLFC, TARGET and LANDER beside finetune (and fedtalora) on text and image FCIL, with their costs.

Small settings that a 2-core CPU finishes in minutes (the budget of ``benchmarks/results/methods.md``
-- full Banking77, 1 round x 1 epoch per task -- takes 10-45 min per method there, the generator methods
the most):

* ``banking77-small``: the ``banking77`` preset (all-MiniLM-L6-v2, 7 tasks x 11 intents, 10 clients,
  Dirichlet(0.1)) with 30 training / 10 test utterances per intent, 1 round x 1 local epoch per task;
* ``omniglot``: the ``study-omniglot`` preset (156 characters in 6 tasks, 5 clients, Dirichlet(0.05), the
  small ViT pre-trained on three other alphabets by ``benchmarks/study_reswu.py --pretrain-only``).

Every method runs with the same seed, partitions and class order; the ``ceiling`` row is the centralized joint
upper bound (``method=fedtalora`` with one client holding all the training data and every class in one task,
:data:`fedtalora.config.CEILING_OVERRIDES`, same budget); the generator methods with a reduced
server budget (:data:`OPTIONS`), stated in the table. Hyper-parameters are the methods' defaults (none were
tuned on test accuracy). One process per run, ``--workers`` at once::

    python benchmarks/baselines.py --data ../shared/data --checkpoint runs/study-reswu/omniglot-vit-pretrained-seed0.safetensors
    python benchmarks/baselines.py --report-only        # rewrite the table from the run directories
    python benchmarks/baselines.py --only banking77-small --seeds 2 --merge   # add a seed to the existing rows

Writes ``benchmarks/results/baselines.jsonl`` (one line per run) and ``baselines.md`` (its tables; a hand-written
``## Notes`` section at the end of an existing file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedtalora.config import CEILING_OVERRIDES

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("finetune", "fedtalora", "glfc", "target", "lander", "ceiling")
CEILING = ["method=fedtalora", *CEILING_OVERRIDES]
"""The ``ceiling`` row's overrides: the joint upper bound of the same loop and budget."""
GEN = ["method_options.gen_steps=10", "method_options.gen_batch=16", "method_options.syn_batch=8",
       "method_options.adv_warmup=5"]
OPTIONS = {"target": GEN, "lander": GEN, "glfc": ["method_options.proto_steps=10"]}
"""Reduced server budgets (defaults: gen_steps=100, gen_batch=64, syn_batch=batch size, proto_steps=50)."""


def benchmarks(data: Path, checkpoint: Path | None) -> dict[str, tuple[str, list[str]]]:
    return {
        "banking77-small": ("banking77", [f"data.root={data / 'banking77'}", "data.train_per_class=30",
                                          "data.test_per_class=10", "fed.rounds_per_task=1", "train.local_epochs=1"]),
        "omniglot": ("study-omniglot", [f"data.root={data / 'omniglot-small'}",
                                        *([f"model.checkpoint={checkpoint}"] if checkpoint else [])]),
    }


def run_dir(out: Path, bench: str, method: str, seed: int) -> Path:
    return out / bench / f"{method}-s{seed}"


def launch(preset: str, overrides: list[str], path: Path) -> int:
    cmd = [sys.executable, "-m", "fedtalora", "run", preset, *overrides, f"output.dir={path.parent}",
           f"output.name={path.name}", "output.overwrite=true", "output.checkpoints=none", "--quiet"]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode


def row(bench: str, method: str, seed: int, path: Path) -> dict[str, Any] | None:
    p = path / "metrics.json"
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    if not m.get("complete"):
        return None
    rounds = m["rounds"]
    client_rounds = sum(len(r["clients"]) for r in rounds)
    return {
        "benchmark": bench, "method": method, "seed": seed, "options": OPTIONS.get(method, []),
        **{k: m[k] for k in ("final_average_accuracy", "average_incremental_accuracy", "forgetting",
                             "wall_seconds", "trainable_parameters")},
        "uplink_bytes_per_client_round": m["uplink_bytes_total"] / client_rounds,
        "downlink_bytes_per_client_round": m["downlink_bytes_total"] / client_rounds,
        "method_downlink_bytes_per_client_round": sum(r.get("method_downlink_bytes", 0) for r in rounds) / client_rounds,
        "method_server_seconds": sum(r.get("method_server_seconds", r.get("generator_seconds", 0.0)) for r in rounds),
        "synthetic_samples_per_client_round": sum(r.get("synthetic_samples", 0) for r in rounds) / client_rounds,
        "commit": os.environ.get("BENCH_COMMIT", ""),
    }


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def write(rows: list[dict[str, Any]], out: Path) -> None:
    import numpy as np

    notes = out.read_text().split("\n## Notes", 1) if out.is_file() else []
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# GLFC, TARGET and LANDER beside finetune and fedtalora (small CPU settings)", "",
             "Written by `benchmarks/baselines.py` (see its docstring for the two settings). Mean ± std over the "
             "seeds listed; MB per client and round; *method down* is the part of *down* that is the method's own "
             "(generator, old model); *server s* the server time of the method's own work; *ceiling* the centralized "
             "joint upper bound (fedtalora, one client with all the data, every class in one task, same budget). "
             "Wall times on a shared "
             "2-core CPU are indicative only. Default method options except the reduced server budgets: "
             + "; ".join(f"`{m}`: {' '.join(o)}" for m, o in OPTIONS.items()) + ".", ""]
    for bench in sorted({r["benchmark"] for r in rows}):
        lines += [f"## {bench}", "", "| method | seeds | F_AA % | AIA % | forgetting % | up MB | down MB | method down MB "
                  "| synthetic / client / round | server s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            rs = [r for r in rows if r["benchmark"] == bench and r["method"] == method]
            if not rs:
                continue

            def ms(key: str, scale: float = 100.0, rs: list[dict[str, Any]] = rs) -> str:
                if any(r[key] is None for r in rs):  # e.g. forgetting of a one-task run
                    return "–"
                v = np.array([r[key] for r in rs], dtype=float) * scale
                return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")

            lines.append(
                f"| {method} | {','.join(str(r['seed']) for r in rs)} | {ms('final_average_accuracy')} "
                f"| {ms('average_incremental_accuracy')} | {ms('forgetting')} "
                f"| {_mb(np.mean([r['uplink_bytes_per_client_round'] for r in rs]))} "
                f"| {_mb(np.mean([r['downlink_bytes_per_client_round'] for r in rs]))} "
                f"| {_mb(np.mean([r['method_downlink_bytes_per_client_round'] for r in rs]))} "
                f"| {np.mean([r['synthetic_samples_per_client_round'] for r in rs]):.0f} "
                f"| {ms('method_server_seconds', 1.0)} | {ms('wall_seconds', 1.0)} |")
        lines.append("")
    out.write_text("\n".join(lines) + (f"\n## Notes{notes[1]}" if len(notes) == 2 else ""))
    print(f"wrote {out}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="the pre-trained small ViT (omniglot)")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-baselines"))
    ap.add_argument("--only", nargs="*", default=None, help="benchmarks (default: both)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out's .jsonl that these runs do not replace (same benchmark, method, seed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "baselines.md")
    args = ap.parse_args()
    benches = benchmarks(args.data.resolve(), args.checkpoint.resolve() if args.checkpoint else None)
    names = args.only or list(benches)
    jobs = [(b, m, s) for b in names for m in args.methods for s in args.seeds]
    if not args.report_only:
        todo = [j for j in jobs if row(*j, run_dir(args.runs, *j)) is None]

        def go(job: tuple[str, str, int]) -> int:
            bench, method, seed = job
            preset, overrides = benches[bench]
            chosen = CEILING if method == "ceiling" else [f"method={method}", *OPTIONS.get(method, [])]
            return launch(preset, [*overrides, *chosen, f"seed={seed}"], run_dir(args.runs, *job))

        with ThreadPoolExecutor(args.workers) as pool:
            for job, rc in zip(todo, pool.map(go, todo), strict=True):
                print(f"{job}: exit {rc}", file=sys.stderr, flush=True)
    rows = [r for j in jobs for r in [row(*j, run_dir(args.runs, *j))] if r is not None]
    if args.merge and args.out.with_suffix(".jsonl").is_file():
        new = {(r["benchmark"], r["method"], r["seed"]): r for r in rows}
        old = [json.loads(line) for line in args.out.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
        kept = {(r["benchmark"], r["method"], r["seed"]): r for r in old}
        kept.update(new)
        rows = sorted(kept.values(), key=lambda r: (r["benchmark"], METHODS.index(r["method"]), r["seed"]))
    write(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
