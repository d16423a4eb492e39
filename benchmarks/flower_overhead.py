"""What the Flower engines cost over ``engine=inprocess`` on the same run.

For each size (``tiny``: the tests' 2 tasks x 2 rounds x 3 clients of an 8 px digits ViT; ``small``: a
larger ViT and more local work, so that training, not start-up, dominates), runs the same config with
``engine=inprocess`` and ``engine=flower-sim`` and reports the wall-time ratio (whole run, as a user waits
for it: Ray start-up included) and the mean seconds per round. Then a loopback deployment
(:class:`fedtalora.flower.deployment.LocalDeployment`: a SuperLink and 3 SuperNodes on 127.0.0.1, insecure)
runs the ``tiny`` config for one task with ``engine=flower`` through ``flwr run``; its per-round
overhead is the mean round time minus the in-process one. Every pair is checked for the same accuracy
matrix and aggregation errors. Writes ``benchmarks/results/flower.jsonl`` (one line per measurement)
and ``benchmarks/results/flower.md``::

    python benchmarks/flower_overhead.py                      # tiny + small + deployment
    python benchmarks/flower_overhead.py --sizes tiny --no-deploy

Sequential, ``OMP_NUM_THREADS=1`` unless set; needs ``pip install -e ".[flower]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtalora.api import run  # noqa: E402
from fedtalora.config import resolve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.dataset=digits", "data.image_size=8", "scenario.num_tasks=2", "fed.num_clients=3",
    "fed.clients_per_round=3", "fed.rounds_per_task=2", "train.local_epochs=1", "train.batch_size=64",
    "train.device=cpu", "model.backbone=vit_tiny_patch16_224", "model.pretrained=false",
    "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}", "lora.rank=4", "lora.blocks=[0,1]",
    "partition.kind=dirichlet", "partition.beta=0.5", "partition.min_samples=5",
]
SIZES: dict[str, list[str]] = {
    "tiny": TINY,
    # 16 px images (16 tokens), a 4-block ViT of width 96, 3 local epochs at batch 16: ~1-2 s per client round.
    "small": [*TINY, "data.image_size=16", "model.kwargs={patch_size: 4, depth: 4, embed_dim: 96, num_heads: 3}",
              "lora.blocks=[0,1,2,3]", "train.local_epochs=3", "train.batch_size=16", "fed.rounds_per_task=3"],
}


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Identical accuracy matrices and per-round aggregation errors (bit for bit)."""
    return a["accuracy_matrix"] == b["accuracy_matrix"] and \
        [r["aggregation_error"] for r in a["rounds"]] == [r["aggregation_error"] for r in b["rounds"]]


def timed(overrides: list[str], run_dir: Path | None = None) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    metrics = run(resolve("demo", overrides), run_dir).metrics
    return metrics, time.perf_counter() - t0


def mean_round(metrics: dict[str, Any]) -> float:
    secs = [r["seconds"] for r in metrics["rounds"]]
    return sum(secs) / len(secs)


def bench_sim(size: str) -> dict[str, Any]:
    overrides = SIZES[size]
    ref, t_in = timed(overrides)
    got, t_sim = timed([*overrides, "engine=flower-sim"])
    return {
        "what": "flower-sim vs inprocess", "size": size, "load_before": load(),
        "inprocess_wall_s": t_in, "flower_sim_wall_s": t_sim, "wall_ratio": t_sim / t_in,
        "inprocess_round_s": mean_round(ref), "flower_sim_round_s": mean_round(got),
        "round_ratio": mean_round(got) / mean_round(ref),
        "rounds": len(ref["rounds"]), "clients_per_round": len(ref["rounds"][0]["clients"]),
        "same_numbers": same_numbers(ref, got),
        "wire_residual_bytes": got["wire"]["residual_bytes"],
        "modelled_residual_bytes": sum(r["downlink_bytes"] for r in ref["rounds"]) - sum(
            r["uplink_bytes"] for r in ref["rounds"]),  # downlink = state + catch-up; state = uplink here
        "wire_downlink_bytes": got["wire"]["downlink_bytes"], "modelled_downlink_bytes": ref["downlink_bytes_total"],
    }


COLD_START = """
import sys, time
t0 = time.perf_counter()
from fedtalora.flower.client_app import build_client_side
t1 = time.perf_counter()
build_client_side(open(sys.argv[1]).read(), sys.argv[2])
print(t1 - t0, time.perf_counter() - t1)
"""


def clientapp_cold_start(overrides: list[str], env: dict[str, str], folder: Path) -> tuple[float, float, float]:
    """What every ClientApp process of a deployment pays before training: (process wall, imports, data +
    model build), measured in a fresh Python process like the ``flwr-clientapp`` a SuperNode starts."""
    from fedtalora.fed.build import Experiment

    cfg = resolve("demo", overrides)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "partitions.json").write_text(json.dumps(Experiment.build(cfg).partitions_json()))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", COLD_START, str(folder / "config.yaml"), str(folder / "partitions.json")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return time.perf_counter() - t0, float(out[-2]), float(out[-1])


def bench_deploy(rounds: int) -> dict[str, Any]:
    from fedtalora.flower.deployment import LocalDeployment

    overrides = [o for o in TINY if not o.startswith(("scenario.num_tasks", "fed.rounds_per_task"))]
    overrides += ["scenario.num_tasks=1", f"fed.rounds_per_task={rounds}"]
    ref, t_in = timed(overrides)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        t0 = time.perf_counter()
        with LocalDeployment(3, Path(tmp) / "deployment", env=env) as dep:
            t_up = time.perf_counter() - t0
            t1 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fedtalora", "run", "demo", "--quiet", *overrides,
                                   "engine=flower", f"output.dir={tmp}", "output.name=run"],
                                  env=dep.env, capture_output=True, text=True, timeout=1800)
            t_run = time.perf_counter() - t1
        if proc.returncode != 0:
            raise SystemExit(f"deployment run failed:\n{proc.stderr[-3000:]}")
        got = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        cold, imports, build = clientapp_cold_start(overrides, env, Path(tmp))
    return {
        "what": "flower deployment (loopback) vs inprocess", "size": "tiny", "load_before": load(),
        "rounds": rounds, "clients_per_round": 3,
        "deployment_start_s": t_up, "flwr_run_wall_s": t_run, "server_wall_s": got["wall_seconds"],
        "inprocess_wall_s": t_in,
        "inprocess_round_s": mean_round(ref), "deployment_round_s": mean_round(got),
        "round_overhead_s": mean_round(got) - mean_round(ref),
        "same_numbers": same_numbers(ref, got),
        "clientapp_cold_start_s": cold, "clientapp_imports_s": imports, "clientapp_build_s": build,
    }


def write_md(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Flower engines: overhead over `engine=inprocess`",
        "",
        f"Written by `benchmarks/flower_overhead.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, `OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}`, "
        "CPU only. The machine is shared with other engineers' jobs, so absolute times are noisy "
        "(load average before each measurement in the table).",
        "",
        "## flower-sim vs inprocess (same config, whole run)",
        "",
        "| size | rounds × clients | inprocess wall | flower-sim wall | **ratio** | s/round inprocess | s/round flower-sim | "
        "round ratio | same numbers | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["what"].startswith("flower-sim"):
            lines.append(
                f"| {r['size']} | {r['rounds']} × {r['clients_per_round']} | {r['inprocess_wall_s']:.1f} s | "
                f"{r['flower_sim_wall_s']:.1f} s | **{r['wall_ratio']:.2f}** | {r['inprocess_round_s']:.2f} | "
                f"{r['flower_sim_round_s']:.2f} | {r['round_ratio']:.2f} | {'yes' if r['same_numbers'] else 'NO'} | "
                f"{r['load_before']} |")
    lines += [
        "",
        "Residual bytes on the wire (flower-sim, Flower's serialisation) vs the modelled payload (`downlink_bytes`"
        " minus the state):",
        "",
    ]
    for r in rows:
        if r["what"].startswith("flower-sim") and r["modelled_residual_bytes"]:
            lines.append(f"- {r['size']}: {r['wire_residual_bytes']:,} B on the wire vs {r['modelled_residual_bytes']:,} B "
                         f"modelled ({r['wire_residual_bytes'] / r['modelled_residual_bytes']:.3f}×); whole downlink "
                         f"{r['wire_downlink_bytes']:,} B vs {r['modelled_downlink_bytes']:,} B")
    dep = [r for r in rows if r["what"].startswith("flower deployment")]
    if dep:
        lines += [
            "",
            "## Loopback deployment (SuperLink + 3 SuperNodes on 127.0.0.1, `flwr run`), tiny config, one task",
            "",
            "| rounds | start SuperLink+SuperNodes | `fedtalora run engine=flower` wall | server loop wall | "
            "s/round inprocess | s/round deployment | **overhead per round** | same numbers | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in dep:
            lines.append(
                f"| {r['rounds']} | {r['deployment_start_s']:.1f} s | {r['flwr_run_wall_s']:.1f} s | "
                f"{r['server_wall_s']:.1f} s | {r['inprocess_round_s']:.2f} | {r['deployment_round_s']:.2f} | "
                f"**{r['round_overhead_s']:.1f} s** | {'yes' if r['same_numbers'] else 'NO'} | {r['load_before']} |")
        r = dep[-1]
        lines += [
            "",
            f"One ClientApp process, alone (a SuperNode starts one per message): {r['clientapp_cold_start_s']:.1f} s "
            f"wall, of which {r['clientapp_imports_s']:.1f} s importing fedtalora's client (torch, timm, peft, flwr) "
            f"and {r['clientapp_build_s']:.1f} s loading the data and building the model.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--no-deploy", action="store_true", help="skip the loopback deployment")
    p.add_argument("--deploy-rounds", type=int, default=3)
    p.add_argument("--notes", default="", help="appended to flower.md")
    args = p.parse_args()
    rows = [bench_sim(size) for size in args.sizes]
    for r in rows:
        print(json.dumps(r), flush=True)
    if not args.no_deploy:
        rows.append(bench_deploy(args.deploy_rounds))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "flower.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    (RESULTS / "flower.md").write_text(write_md(rows) + (f"\n{args.notes}\n" if args.notes else ""))
    print(f"wrote {RESULTS / 'flower.md'}")


if __name__ == "__main__":
    main()
