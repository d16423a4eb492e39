"""The demo's reference lines and timing: what `fedtalora run PRESET` prints beside its F_AA.

Runs, on the preset's own data, seed and test set:

* the preset itself (Fed-TaLoRA);
* the **frozen-backbone baseline**: the same run with ``method=head-only`` (no LoRA; the same classifier);
* the **centralized ceiling**: ``scenario.num_tasks=1 fed.num_clients=1 fed.clients_per_round=1`` (one client
  holding all the data, all classes at once: the joint upper bound of the same training budget);

and writes ``src/fedtalora/presets/PRESET.reference.json`` (the resolved config, the SHA-256 of the shipped data,
and the three results), which the CLI prints beside F_AA when a run's config equals it
(:mod:`fedtalora.app.summary`). ``--time N`` also times the whole CLI (``python -m fedtalora run PRESET``, a fresh
process each, imports and model loading included) N times: wall and user+sys CPU seconds, with the load average
(other jobs on the machine inflate the wall time; the CPU time is the load-robust number).

Results: one JSON line per run on stdout and ``benchmarks/results/demo.md`` (+ ``demo.jsonl``).

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/demo_reference.py                 # reference lines only
    PYTHONPATH=src python benchmarks/demo_reference.py --time 3        # and 3 timed CLI runs
    PYTHONPATH=src python benchmarks/demo_reference.py --only-time 3   # timing only
    PYTHONPATH=src python benchmarks/demo_reference.py --only-time 3 --compare demo   # interleaved with `demo`
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESETS = REPO / "src" / "fedtalora" / "presets"

LINES = (
    ("frozen backbone, same classifier", ["method=head-only"]),
    ("centralized ceiling: 1 client, all classes at once",
     ["scenario.num_tasks=1", "fed.num_clients=1", "fed.clients_per_round=1"]),
)


def data_digests(cfg: Any) -> dict[str, str]:
    """SHA-256 of the shipped demo data (empty for other datasets)."""
    if cfg.data.dataset != "banking77-demo":
        return {}
    from fedtalora.data.text import banking77_demo_path

    folder = banking77_demo_path()
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("train.csv", "test.csv")}


def summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"final_average_accuracy": round(m["final_average_accuracy"], 4),
            "average_incremental_accuracy": round(m["average_incremental_accuracy"], 4),
            "forgetting": None if m.get("forgetting") is None else round(m["forgetting"], 4),
            "run_seconds": round(m["wall_seconds"], 1)}


def reference(preset: str) -> dict[str, Any]:
    from fedtalora.api import run
    from fedtalora.config import resolve

    cfg = resolve(preset)
    out: dict[str, Any] = {"preset": preset, "config": cfg.to_dict(), "data_sha256": data_digests(cfg)}
    demo = summary(run(cfg).metrics)
    print(json.dumps({"run": preset, **demo}), flush=True)
    lines = []
    for label, overrides in LINES:
        s = summary(run(resolve(preset, overrides)).metrics)
        print(json.dumps({"run": label, "overrides": overrides, **s}), flush=True)
        lines.append({"label": label, "overrides": overrides, **s})
    out["demo"] = demo
    out["lines"] = lines
    out["source"] = (f"benchmarks/demo_reference.py, {dt.date.today().isoformat()}, same data, seed and test set; "
                     "CPU, fp32")
    return out


def _cli_once(preset: str, label: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        before = os.times()
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "fedtalora", "run", preset, "-q", f"output.dir={tmp}",
                              "output.name=timed"], env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        after = os.times()
        if res.returncode != 0:
            sys.exit(f"fedtalora run {preset} failed:\n{res.stderr}")
        m = json.loads((Path(tmp) / "timed" / "metrics.json").read_text())
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    rec = {"run": label, "preset": preset, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           "run_seconds": round(m["wall_seconds"], 1), "load_before": round(load, 2),
           "load_after": round(os.getloadavg()[0], 2), "final_average_accuracy": round(m["final_average_accuracy"], 4)}
    print(json.dumps(rec), flush=True)
    return rec


def time_cli(preset: str, repeats: int, compare: str | None = None) -> list[dict[str, Any]]:
    """``repeats`` timed CLI runs of ``preset``; with ``compare``, each preceded by a run of that preset
    (interleaved, so both see the same load: their ratio is the load-robust number)."""
    records = []
    for i in range(repeats):
        if compare:
            records.append(_cli_once(compare, f"{compare} {i + 1}/{repeats}"))
        records.append(_cli_once(preset, f"{preset} {i + 1}/{repeats}"))
    return records


def write_markdown(preset: str, ref: dict[str, Any] | None, timing: list[dict[str, Any]]) -> None:
    path = RESULTS / "demo.md"
    lines = [f"# The demo (`fedtalora run {preset}`)", "",
             "Written by `benchmarks/demo_reference.py`. CPU, fp32, seed 0, the preset's shipped Banking77 subset; "
             "settings chosen on a validation split of Banking77's training data (held-out utterances), never on "
             "these test numbers.", ""]
    if ref is not None:
        lines += ["| run | F_AA | AIA | forgetting | loop seconds |", "|---|---|---|---|---|"]
        for label, r in [(f"`{preset}` (Fed-TaLoRA)", ref["demo"])] + [(x["label"] + " (`" + " ".join(x["overrides"])
                                                                        + "`)", x) for x in ref["lines"]]:
            fgt = "n/a" if r["forgetting"] is None else f"{r['forgetting']:.4f}"
            lines.append(f"| {label} | {r['final_average_accuracy']:.4f} | {r['average_incremental_accuracy']:.4f} | "
                         f"{fgt} | {r['run_seconds']:.1f} |")
        lines += [""]
    mine = [r for r in timing if r["preset"] == preset]
    if mine:
        walls, cpus = [r["wall_seconds"] for r in mine], [r["cpu_seconds"] for r in mine]
        lines += [f"Whole CLI (`python -m fedtalora run {preset} -q`, fresh process, imports and model loading "
                  f"included), {len(mine)} runs on a shared 2-core machine: wall median {median(walls):.1f} s "
                  f"(min {min(walls):.1f}, max {max(walls):.1f}), user+sys CPU median {median(cpus):.1f} s."]
        others = [r for r in timing if r["preset"] != preset]
        if others:
            ratio = [b["wall_seconds"] / a["wall_seconds"] for a, b in zip(others, mine, strict=False)]
            cratio = [b["cpu_seconds"] / a["cpu_seconds"] for a, b in zip(others, mine, strict=False)]
            lines += ["", f"Interleaved with `{others[0]['preset']}` (same load): {preset} / {others[0]['preset']} = "
                      f"{median(ratio):.2f} in wall time, {median(cratio):.2f} in CPU time (medians)."]
        lines += ["", "| run | wall s | CPU s | load avg before / after | F_AA |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['wall_seconds']} | {r['cpu_seconds']} | {r['load_before']} / {r['load_after']} | "
                  f"{r['final_average_accuracy']:.4f} |" for r in timing]
        lines += [""]
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time the whole CLI N times")
    ap.add_argument("--only-time", type=int, default=0, metavar="N", help="only time the whole CLI N times")
    ap.add_argument("--compare", default=None, metavar="PRESET",
                    help="interleave each timed run with one of this preset (e.g. demo) and report the ratio")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ref = None
    if not args.only_time:
        ref = reference(args.preset)
        (PRESETS / f"{args.preset}.reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    timing = time_cli(args.preset, args.only_time or args.time, args.compare)
    if ref is None and (PRESETS / f"{args.preset}.reference.json").is_file():
        ref = json.loads((PRESETS / f"{args.preset}.reference.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "demo.jsonl").open("a") as f:
        for rec in ([{"reference": ref}] if ref is not None and not args.only_time else []) + timing:
            f.write(json.dumps(rec) + "\n")
    write_markdown(args.preset, ref, timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
