"""Every registered method on every engine: ``inprocess``, ``flower-sim`` and a loopback deployment.

For each method of the registry (``fedtalora methods``), the ``tiny-vit`` preset with the tests' tiny
overrides (8 px digits, a 2-block ViT of width 32, 2 tasks x 2 rounds), 3 clients of which 2 are sampled
per round (so clients miss rounds and catch up), and small method options for the baselines with
server-side training (generator steps, prototype steps: the values the test suite uses), is run as
``fedtalora run ...`` in a fresh process on

``inprocess``  the reference;
``flower-sim`` Flower's simulation runtime (Ray actors);
``flower``     one loopback :class:`~fedtalora.flower.deployment.LocalDeployment` (SuperLink + 3 warm
               nodes on 127.0.0.1, one shared warm executor), started once and reused by every method.

Each Flower run is compared with its in-process twin: the accuracy matrix, and per round the clients,
the aggregated clients, sample counts, dropped/skipped clients, training losses, the aggregation errors
(of the global model, per round and accumulated, absolute and in float32 roundings) and the naive
aggregation loss, **bit for bit** (``==`` on the floats of ``metrics.json``); and the modelled bytes per
round (uplink/downlink, the method's own downlink). Bytes on the wire (Flower's serialisation) are
reported for the Flower engines. One JSON line per finished run goes to
``benchmarks/results/flower_methods.jsonl`` as it finishes; ``flower_methods.md`` (the method x engine
matrix) is rewritten after each method and by ``--md``. Usage::

    python benchmarks/flower_methods.py                       # every method, every engine
    python benchmarks/flower_methods.py --methods pilora glfc --engines inprocess flower-sim
    python benchmarks/flower_methods.py --md                  # only rewrite the table from the JSONL

Sequential, ``OMP_NUM_THREADS=1`` unless set; needs ``pip install -e ".[flower]"``.
"""

from __future__ import annotations

import argparse
import json
import math
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

from fedtalora.methods import SMOKE_OPTIONS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "flower_methods.jsonl"
MD = RESULTS / "flower_methods.md"
ENGINES = ("inprocess", "flower-sim", "flower")

TINY = [  # the test suite's tiny overrides (tests/conftest.py TINY_OVERRIDES)
    "data.dataset=digits", "data.image_size=8", "scenario.num_tasks=2", "fed.num_clients=3",
    "fed.clients_per_round=3", "fed.rounds_per_task=2", "train.local_epochs=1", "train.batch_size=64",
    "train.device=cpu", "model.backbone=vit_tiny_patch16_224", "model.pretrained=false",
    "model.kwargs={patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}", "lora.rank=4", "lora.blocks=[0,1]",
    "partition.kind=dirichlet", "partition.beta=0.5", "partition.min_samples=5",
]
CLIENTS = 3
PARTIAL = [f"fed.num_clients={CLIENTS}", "fed.clients_per_round=2", "partition.min_samples=3"]
ROUND_KEYS = ("clients", "aggregated", "num_samples", "dropped", "skipped", "train_loss", "aggregation_error",
              "aggregation_error_rounding", "aggregation_error_accumulated",
              "aggregation_error_accumulated_rounding", "naive_aggregation_loss")
BYTE_KEYS = ("uplink_bytes", "downlink_bytes", "method_downlink_bytes")


def overrides(method: str) -> list[str]:
    return [*TINY, *PARTIAL, f"method={method}", *SMOKE_OPTIONS.get(method, ())]


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    return x == y


def compare(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between two runs' metrics (empty: the same numbers, bit for bit, and the same bytes)."""
    diffs: list[str] = []
    if not _same(ref["accuracy_matrix"], got["accuracy_matrix"]):
        diffs.append("accuracy matrix")
    if len(ref["rounds"]) != len(got["rounds"]):
        return [*diffs, f"rounds {len(ref['rounds'])} vs {len(got['rounds'])}"]
    for key in (*ROUND_KEYS, *BYTE_KEYS):
        bad = [f"t{a['task']}r{a['round']}" for a, b in zip(ref["rounds"], got["rounds"], strict=True)
               if not _same(a.get(key), b.get(key))]
        if bad:
            diffs.append(f"{key} ({', '.join(bad[:3])}{'...' if len(bad) > 3 else ''})")
    for key in ("max_aggregation_error_rounding", "max_aggregation_error_accumulated_rounding"):
        if not _same(ref.get(key), got.get(key)):
            diffs.append(key)
    if not got.get("complete", True):
        diffs.append("incomplete")
    if any(r.get("client_errors") for r in got["rounds"]):
        diffs.append("client errors")
    return diffs


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    rounds = metrics["rounds"]
    acc = metrics["accuracy_matrix"]
    last = [v for v in acc[-1] if v is not None] if acc else []
    out = {"rounds": len(rounds), "final_avg_acc": sum(last) / len(last) if last else None,
           "uplink_B": sum(r["uplink_bytes"] for r in rounds), "downlink_B": sum(r["downlink_bytes"] for r in rounds),
           "max_err_rounding": metrics.get("max_aggregation_error_rounding"),
           "round_s": sum(r["seconds"] for r in rounds) / max(1, len(rounds))}
    if rounds and "wire_downlink_bytes" in rounds[0]:
        out["wire_down_B"] = sum(r["wire_downlink_bytes"] for r in rounds)
        out["wire_up_B"] = sum(r["wire_uplink_bytes"] for r in rounds)
        out["wire_method_B"] = sum(r.get("wire_method_bytes", 0) for r in rounds)
    return out


def one_line_error(stderr: str, rc: int) -> str:
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    for x in reversed(lines):
        if "Error" in x or "error:" in x or "Exception" in x:
            return x[:300]
    return (lines[-1][:300] if lines else f"exit {rc}")


def fedtalora_run(method: str, engine: str, workdir: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """One ``fedtalora run`` in a fresh process; its metrics or its one-line error."""
    name = f"{method}-{engine}"
    cmd = [sys.executable, "-m", "fedtalora", "run", "tiny-vit", "--quiet", *overrides(method), f"engine={engine}",
           f"output.dir={workdir}", f"output.name={name}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:g} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    metrics_file = workdir / name / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        return {"status": "failed", "error": one_line_error(proc.stderr, proc.returncode), "rc": proc.returncode,
                "wall_s": wall, "stderr_tail": proc.stderr[-2000:]}
    return {"status": "ok", "wall_s": wall, "metrics": json.loads(metrics_file.read_text())}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    import fedtalora

    src = Path(fedtalora.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def bench(methods: list[str], engines: list[str], timeout: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    env = _env()
    with tempfile.TemporaryDirectory(prefix="flower-methods-") as tmp:
        workdir = Path(tmp)
        dep = None
        if "flower" in engines:
            from fedtalora.flower.deployment import LocalDeployment

            dep = LocalDeployment(CLIENTS, workdir / "deployment", env=env, warm=True, executors=1)
            dep.start()
        try:
            for method in methods:
                ref: dict[str, Any] | None = None
                for engine in engines:
                    load_before = load()
                    res = fedtalora_run(method, engine, workdir, dep.env if engine == "flower" and dep else env,
                                        timeout)
                    row: dict[str, Any] = {"method": method, "engine": engine, "status": res["status"],
                                           "wall_s": round(res["wall_s"], 2), "load_before": load_before,
                                           "date": time.strftime("%Y-%m-%d %H:%M")}
                    if res["status"] == "ok":
                        m = res["metrics"]
                        row.update(summary(m))
                        if engine == "inprocess":
                            ref = m
                        elif ref is not None:
                            diffs = compare(ref, m)
                            row["status"] = "equal" if not diffs else "differs"
                            row["diffs"] = diffs
                        else:
                            row["status"] = "ok (no in-process reference)"
                    else:
                        row["error"] = res["error"]
                        row["stderr_tail"] = res.get("stderr_tail", "")
                    with open(JSONL, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
                write_md()
        finally:
            if dep is not None:
                dep.stop()


def write_md() -> None:
    rows = [json.loads(x) for x in JSONL.read_text().splitlines() if x.strip()] if JSONL.is_file() else []
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["method"], r["engine"])] = r  # the last run of each pair
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "not run"
        s = r["status"]
        if s == "equal":
            return "**equal**"
        if s == "differs":
            return "differs: " + "; ".join(r["diffs"])
        if s == "failed":
            return "failed: `" + r["error"].replace("|", "/").replace("`", "'") + "`"
        return s

    def wire(r: dict[str, Any] | None) -> str:
        if r is None or "wire_down_B" not in r:
            return "–"
        return f"{r['wire_down_B'] / 1e3:,.0f} / {r['wire_up_B'] / 1e3:,.0f}"

    lines = [
        "# Every method on every engine",
        "",
        f"Written by `benchmarks/flower_methods.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared with other jobs: wall times are noisy), CPU only, "
        f"`OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}`. Config: `tiny-vit` with the test suite's tiny "
        f"overrides (8 px digits, 2-block ViT of width 32, 2 tasks x 2 rounds), {CLIENTS} clients with 2 sampled "
        "per round (clients miss rounds and catch up), the test suite's fast options for GLFC/TARGET/LANDER. "
        "Engines: `inprocess` (reference), `flower-sim` (Ray), `flower` (a loopback deployment: SuperLink + "
        f"{CLIENTS} warm SuperNodes on 127.0.0.1 with one shared warm executor, reused across methods). Each run is "
        "a fresh `fedtalora run` process.",
        "",
        "**equal** = the same accuracy matrix, per-round clients / aggregated / samples / dropped / skipped, "
        "training losses, aggregation errors (per round and accumulated, absolute and in float32 roundings), "
        "naive-aggregation loss, maximum errors, and modelled uplink / downlink / method bytes per round as "
        "the in-process run, **bit for bit** (`==` on the floats of `metrics.json`; no tolerance).",
        "",
        "| method | flower-sim | flower (deployment) | final avg acc | modelled bytes down / up (kB, whole run) "
        "| wire down / up sim (kB) | wire down / up deployment (kB) | wall s in-proc / sim / deploy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        i, s, d = (latest.get((m, e)) for e in ENGINES)
        acc = "–" if not i or i.get("final_avg_acc") is None else f"{i['final_avg_acc']:.3f}"
        modelled = "–" if not i or "uplink_B" not in i else f"{i['downlink_B'] / 1e3:,.0f} / {i['uplink_B'] / 1e3:,.0f}"
        walls = " / ".join("–" if r is None else f"{r['wall_s']:.0f}" for r in (i, s, d))
        ref_cell = "" if i is None or i["status"] == "ok" else f" (in-process: {cell(i)})"
        lines.append(f"| `{m}`{ref_cell} | {cell(s)} | {cell(d)} | {acc} | {modelled} | {wire(s)} | {wire(d)} | {walls} |")
    lines += [
        "",
        "Accuracies are those of a tiny randomly initialised ViT on 8 px digits with default settings (nothing tuned, "
        "nothing chosen on test data): they show that the engines agree, not how good a method is. Bytes: modelled = "
        "the payload the in-process engine counts (identical on every engine); wire = Flower's serialised messages "
        "(records, packing headers, catch-ups of clients that missed rounds, method state). Wall time includes the "
        "`fedtalora run` process start and, for `flower-sim`, Ray's start-up; the first deployment run also pays the "
        "warm nodes' cold start.",
    ]
    MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    from fedtalora.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS.names()))
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--md", action="store_true", help="only rewrite flower_methods.md from the JSONL file")
    args = p.parse_args()
    if not args.md:
        bench(args.methods, args.engines, args.timeout)
    write_md()
    print(f"wrote {MD}")


if __name__ == "__main__":
    main()
