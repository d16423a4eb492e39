"""Every implemented method on the same federated class-incremental Banking77 + all-MiniLM-L6-v2 setting.

One run per method of ``fedtalora.methods.METHODS`` on the ``banking77`` preset (7 tasks x 11 intents,
10 clients, Dirichlet(0.1)), with the same seed, partitions, class order and budget; only ``method=``
differs (each method with its default ``method_options``). The last row, ``ceiling``, is the centralized joint
upper bound: ``method=fedtalora`` in the same loop and budget with one client holding all the training data and
all 77 intents in one task (:data:`fedtalora.config.CEILING_OVERRIDES`). Writes one JSON line per method to
``benchmarks/results/methods.jsonl`` (kept: a re-run skips the methods already measured with the same
settings) and the table to ``benchmarks/results/methods.md``::

    python benchmarks/methods.py --data ../shared/data/banking77 --quick     # 1 round x 1 local epoch
    python benchmarks/methods.py --only fedtalora pilora --set train.lr=0.02

Runs are sequential (one process, ``OMP_NUM_THREADS`` as set by the caller). Needs
``pip install -e ".[text]"`` and the Banking77 CSVs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fedtalora.api import run
from fedtalora.config import CEILING_OVERRIDES, RunConfig, resolve
from fedtalora.methods import METHODS

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT_BYTES = 4
CEILING = "ceiling"
"""The pseudo-method of the joint upper bound row (``method=fedtalora`` + ``CEILING_OVERRIDES``)."""


def measure(name: str, base: list[str], runs: Path, options: list[str] | None = None) -> dict[str, Any]:
    """Run ``method=name`` (with ``method_options`` ``options``, ``key=value``) on the preset with the
    shared overrides; the row of the table."""
    options = options or []
    label = f"{name} ({', '.join(options)})" if options else name
    method = ["method=fedtalora", *CEILING_OVERRIDES] if name == CEILING else [f"method={name}"]
    cfg = resolve("banking77", [*base, *method, *[f"method_options.{o}" for o in options], "output.overwrite=true"])
    run_dir = runs / (name + "".join(f"-{o}" for o in options))
    # The shared setting: every key but the method and where the run goes (a re-run skips a method only
    # when this is unchanged, e.g. not after a preset edit); the ceiling's is the table's, before its overrides.
    shared = shared_config(resolve("banking77", base) if name == CEILING else cfg)
    m = run(cfg, run_dir).metrics
    rounds = m["rounds"]
    client_rounds = sum(len(r["clients"]) for r in rounds)
    return {
        "method": name,
        "label": label,
        **{k: m[k] for k in ("final_average_accuracy", "average_incremental_accuracy", "forgetting",
                             "max_aggregation_error", "trainable_parameters", "wall_seconds")},
        "uplink_params_per_client_round": m["uplink_bytes_total"] / FLOAT_BYTES / client_rounds,
        # the method's own costs (glfc, target, lander): server time, what it sent beyond the global state
        "method_server_seconds": sum(r.get("method_server_seconds", 0.0) for r in rounds),
        "method_downlink_params_per_client_round": sum(r.get("method_downlink_bytes", 0) for r in rounds)
        / FLOAT_BYTES / client_rounds,
        "synthetic_samples": sum(r.get("synthetic_samples", 0) for r in rounds),
        "downlink_params_per_client_round": m["downlink_bytes_total"] / FLOAT_BYTES / client_rounds,
        "rounds": len(rounds),
        "settings": base,
        "config": shared,
        "commit": os.environ.get("BENCH_COMMIT", ""),
        "run_dir": str(run_dir),
    }


def same_setting(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`shared_config` dicts agree on every key both have (a key added to the config
    since a row was measured does not invalidate it; a changed value does)."""
    for k in a.keys() & b.keys():
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            if not same_setting(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def shared_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without ``method``, ``method_options`` and ``output``."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("method", "method_options", "output")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("BANKING77", "../shared/data/banking77"))
    ap.add_argument("--quick", action="store_true", help="1 round x 1 local epoch per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=str(Path("runs") / "bench-methods"), help="parent of the run directories")
    ap.add_argument("--only", nargs="*", default=None, help="subset of methods (default: every implemented one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra overrides for every run")
    ap.add_argument("--options", nargs="*", default=[], metavar="key=value",
                    help="method_options for the methods of --only (an extra row labelled with them)")
    ap.add_argument("--fresh", action="store_true", help="re-measure methods already in the JSONL file")
    ap.add_argument("--out", default=str(RESULTS / "methods.md"))
    args = ap.parse_args()

    base = [f"data.root={args.data}", f"seed={args.seed}", "train.device=auto", *args.set]
    if args.quick:
        base += ["fed.rounds_per_task=1", "train.local_epochs=1"]
    names = args.only or [*METHODS.names(), CEILING]
    unknown = [n for n in names if n not in METHODS and n != CEILING]
    if unknown:
        ap.error(f"not implemented: {', '.join(unknown)}; choose from {', '.join([*METHODS.names(), CEILING])}")
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    shared = json.loads(json.dumps(shared_config(resolve("banking77", base))))
    done = {} if args.fresh or not jsonl.is_file() else {
        r.get("label", r["method"]): r for r in map(json.loads, jsonl.read_text().splitlines())
        if same_setting(r.get("config") or {}, shared)}
    for name in names:
        label = f"{name} ({', '.join(args.options)})" if args.options else name
        if label in done:
            print(f"{label}: measured already (--fresh to redo)", file=sys.stderr)
            continue
        row = measure(name, base, Path(args.runs), args.options)
        done[label] = row
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    cfg = resolve("banking77", base)
    order = {n: i for i, n in enumerate([*METHODS.names(), CEILING])}
    write_table(sorted(done.values(), key=lambda r: (order.get(r["method"], 99), r.get("label", ""))), out, cfg, args)
    return 0


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _count(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"


def write_table(rows: list[dict[str, Any]], path: Path, cfg: RunConfig, args: argparse.Namespace) -> None:
    lines = [
        "# Methods on text FCIL: Banking77 + all-MiniLM-L6-v2",
        "",
        f"`banking77` preset: {cfg.scenario.num_tasks} tasks x 11 intents, {cfg.fed.num_clients} clients (all per "
        f"round), {cfg.partition.kind} beta={cfg.partition.beta}; {cfg.fed.rounds_per_task} round(s) x "
        f"{cfg.train.local_epochs} local epoch(s) per task, batch {cfg.train.batch_size}, SGD lr {cfg.train.lr} "
        f"(body) / {cfg.train.head_lr} (head); LoRA rank {cfg.lora.rank} on {cfg.lora.targets} of layers "
        f"{cfg.lora.blocks}; seed {cfg.seed}; every method with its default `method_options`. "
        f"Machine: {os.cpu_count()} CPU threads (shared with other jobs: wall times are indicative), "
        f"torch {torch.__version__}; code at commit(s) "
        f"{', '.join(sorted({r.get('commit') or 'n/a' for r in rows})) or 'n/a'}. "
        f"Command: `python benchmarks/methods.py{' --quick' if args.quick else ''}"
        f"{' --set ' + ' '.join(args.set) if args.set else ''}`; a row labelled with options adds "
        "`--only METHOD --options KEY=VALUE ...`.",
        "",
        "Parameters are counted per client and round (float32 values: bytes / 4); *up* is what a client sends, "
        "*down* what it receives (global trainable state + the residuals it missed, factored or dense, "
        "whichever is smaller). `pilora`'s up includes its per-task class feature sums; `target`/`lander`'s "
        "their feature moments, `glfc`'s its prototype gradients. *of which method* is the part of *down* that is "
        "the method's own (a generator, the old model); *server s* the server time of the method's own work "
        "(generator training, GLFC's proxy), inside *wall s*. *ceiling*: the centralized joint upper bound, "
        "`method=fedtalora` with one client holding all the training data and every intent in one task "
        "(`scenario.num_tasks=1 fed.num_clients=1 fed.clients_per_round=1 partition.kind=iid`), same budget.",
        "",
        "| method | F_AA % | AIA % | forgetting % | trainable | up / client / round | down / client / round "
        "| of which method | max agg. error | server s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('label', r['method'])} | {_pct(r['final_average_accuracy'])} | {_pct(r['average_incremental_accuracy'])} "
            f"| {_pct(r['forgetting'])} | {_count(r['trainable_parameters'])} "
            f"| {_count(r['uplink_params_per_client_round'])} | {_count(r['downlink_params_per_client_round'])} "
            f"| {_count(r.get('method_downlink_params_per_client_round', 0.0))} "
            f"| {r['max_aggregation_error']:.1e} | {r.get('method_server_seconds', 0.0):.0f} | {r['wall_seconds']:.0f} |")
    notes = path.read_text().split("\n## Notes", 1) if path.is_file() else []  # hand-written notes are kept
    path.write_text("\n".join(lines) + "\n" + (f"\n## Notes{notes[1]}" if len(notes) == 2 else ""))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
