"""What the Flower engines cost over ``engine=inprocess`` on the same run, and how they scale.

Measurements (each one line of ``benchmarks/results/flower.jsonl``, labelled with ``--label``):

``sim``      for each size (``tiny``: the tests' 2 tasks x 2 rounds x 3 clients of an 8 px digits ViT;
             ``small``: a larger ViT and more local work), the same config with ``engine=inprocess``
             and ``engine=flower-sim``: wall time, the *start-up* (from the call to the first round:
             Ray, actors, data and model builds, the hello exchange), seconds per round, the tear-down,
             peak memory and CPU seconds of the process tree;
``deploy``   a loopback deployment (SuperLink + 3 nodes on 127.0.0.1, ``flwr run``), ``tiny`` config,
             one task: the per-round overhead over in-process, and per node its cold start (process
             start -> ClientApp modules loaded; first message: data and model build), its warm rounds
             and its peak memory;
``scale``    ``flower-sim`` with 100 virtual clients (10 sampled per round) and a loopback deployment
             of 10 SuperNodes over TLS with SuperNode authentication (two shared warm executors), each
             side by side with in-process: seconds per round, peak memory (sum over the processes) and
             bytes on the wire per round.

Every Flower run is checked for the same accuracy matrix and aggregation errors as its in-process twin.
Memory is the sum over the processes of their PSS (proportional set size: shared library pages split
among the processes that map them; RSS sums, which count torch's libraries once per process, are in
the JSON lines too), sampled every 0.5 s. The machine is usually shared: each line records the load
average before it. Usage::

    python benchmarks/flower_overhead.py --label after                 # sim (tiny, small) + deploy
    python benchmarks/flower_overhead.py --only sim --sizes tiny --repeat 2
    python benchmarks/flower_overhead.py --only scale
    PYTHONPATH=/old/checkout/src python benchmarks/flower_overhead.py --label before --only sim deploy

``--md`` rewrites ``benchmarks/results/flower.md`` from all lines of the JSONL file (and the notes in
``benchmarks/results/flower_notes.md``). Sequential, ``OMP_NUM_THREADS=1`` unless set; needs
``pip install -e ".[flower]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtalora import resolve, run  # noqa: E402


def _preset() -> str:
    """The tiny random-ViT preset: ``tiny-vit`` (``demo`` in the code before issue 18 renamed it)."""
    try:
        resolve("tiny-vit", [])
        return "tiny-vit"
    except Exception:  # noqa: BLE001 - the older code
        return "demo"


PRESET = _preset()

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


def one_task(overrides: list[str], rounds: int, clients: int | None = None, per_round: int | None = None) -> list[str]:
    drop = ("scenario.num_tasks", "fed.rounds_per_task") + (("fed.num_clients", "fed.clients_per_round")
                                                             if clients else ())
    out = [o for o in overrides if not o.startswith(drop)] + ["scenario.num_tasks=1", f"fed.rounds_per_task={rounds}"]
    if clients:
        out += [f"fed.num_clients={clients}", f"fed.clients_per_round={per_round or clients}"]
    return out


# --- measuring ------------------------------------------------------------------------------------


MARK = f"flower-bench-{os.getpid()}"
os.environ["FEDTALORA_BENCH_MARK"] = MARK  # inherited by every process a measurement starts, however detached


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` and every process below them (from /proc; the measured code may predate fedtalora.flower.procs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _proc_stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.append(pid)
            stack.extend(children.get(pid, []))
    return seen


def marked_processes() -> list[int]:
    """Live processes started by this benchmark (they carry its environment marker), but itself."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if MARK.encode() not in f.read():
                    continue
        except OSError:
            continue
        fields = _proc_stat(int(entry))
        if fields is not None and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def leftovers_after(seconds: float) -> int:
    """Processes of this benchmark still running ``seconds`` after a measurement; they are then killed
    (so they do not weigh on the next measurement)."""
    import signal

    time.sleep(seconds)
    left = marked_processes()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Monitor:
    """Samples, every ``interval`` s, the processes below ``roots`` (callable: the root pids now): peak
    sum of PSS and of RSS, peak PSS per group (``group(pid_root)``), and the CPU seconds of every process
    seen (at its last sample)."""

    def __init__(self, roots: Any, interval: float = 0.5, groups: Any = None) -> None:
        self._descendants = descendants
        self.roots = roots
        self.groups = groups
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_by_group: dict[str, int] = {}
        self.peak_rss_by_group: dict[str, int] = {}
        self.cpu: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        total_pss = total_rss = 0
        by_group: dict[str, int] = {}
        rss_by_group: dict[str, int] = {}
        for root in self.roots():
            pids = self._descendants([root])
            pss = rss = 0
            for pid in pids:
                p, r = _pss(pid), _rss(pid)
                pss += p
                rss += r
                fields = _proc_stat(pid)
                self.cpu[(pid, int(fields[19]) if fields else 0)] = _cpu_seconds(pid)
            total_pss += pss
            total_rss += rss
            if self.groups is not None:
                g = self.groups(root)
                if g:
                    by_group[g] = by_group.get(g, 0) + pss
                    rss_by_group[g] = rss_by_group.get(g, 0) + rss
        self.peak_pss = max(self.peak_pss, total_pss)
        self.peak_rss = max(self.peak_rss, total_rss)
        for g, v in by_group.items():
            self.peak_by_group[g] = max(self.peak_by_group.get(g, 0), v)
        for g, v in rss_by_group.items():
            self.peak_rss_by_group[g] = max(self.peak_rss_by_group.get(g, 0), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Monitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def same_numbers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Identical accuracy matrices and per-round aggregation errors (bit for bit)."""
    return a["accuracy_matrix"] == b["accuracy_matrix"] and \
        [r.get("aggregation_error") for r in a["rounds"]] == [r.get("aggregation_error") for r in b["rounds"]]


def mean_round(metrics: dict[str, Any]) -> float:
    secs = [r["seconds"] for r in metrics["rounds"]]
    return sum(secs) / len(secs)


def wire_per_round(metrics: dict[str, Any]) -> dict[str, float]:
    """Mean bytes per round: on the wire (Flower's serialisation) where measured, else the modelled payload."""
    rounds = metrics["rounds"]
    n = len(rounds)
    out = {"modelled_down_B": sum(r["downlink_bytes"] for r in rounds) / n,
           "modelled_up_B": sum(r["uplink_bytes"] for r in rounds) / n}
    if "wire_downlink_bytes" in rounds[0]:
        out["wire_down_B"] = sum(r["wire_downlink_bytes"] for r in rounds) / n
        out["wire_up_B"] = sum(r["wire_uplink_bytes"] for r in rounds) / n
    return out


def timed_run(overrides: list[str], run_dir: Path | None = None) -> dict[str, Any]:
    """One run in this process, phases from its progress events; Ray pre-started where the code can."""
    cfg = resolve(PRESET, overrides)
    marks: dict[str, float] = {}

    def progress(event: dict[str, Any]) -> None:
        if event["event"] in ("start", "end"):
            marks[event["event"]] = time.perf_counter()

    with Monitor(lambda: [os.getpid()]) as mon:
        t0 = time.perf_counter()
        try:
            from fedtalora.flower.simulation import prestart
        except ImportError:  # the code before prestart existed
            prestart = None  # type: ignore[assignment]
        if prestart is not None:
            prestart(cfg)
        metrics = run(cfg, run_dir, progress=progress).metrics
        t_end = time.perf_counter()
    return {"metrics": metrics, "wall_s": t_end - t0, "startup_s": marks["start"] - t0,
            "teardown_s": t_end - marks["end"], "peak_pss_B": mon.peak_pss, "peak_rss_B": mon.peak_rss,
            "cpu_s": mon.cpu_seconds(), "leftover_processes_2s_after": leftovers_after(2.0)}


def bench_sim(size: str, label: str) -> dict[str, Any]:
    overrides = SIZES[size]
    load_before = load()
    ref = timed_run(overrides)
    got = timed_run([*overrides, "engine=flower-sim"])
    a, b = ref.pop("metrics"), got.pop("metrics")
    return {
        "what": "sim", "label": label, "size": size, "load_before": load_before,
        "rounds": len(a["rounds"]), "clients_per_round": len(a["rounds"][0]["clients"]),
        "inprocess": {**ref, "round_s": mean_round(a)}, "flower_sim": {**got, "round_s": mean_round(b)},
        "same_numbers": same_numbers(a, b), "wire": wire_per_round(b),
    }


# --- deployments ------------------------------------------------------------------------------------


_TASK_DONE = re.compile(r"task done in ([0-9.]+) s")
_LOADED = re.compile(r"ClientApp modules loaded in ([0-9.]+) s")


def _node_log_stats(folder: Path, pattern: str) -> dict[str, Any]:
    """Per log file matching ``pattern``: the executor's module load time and task times."""
    out: dict[str, Any] = {}
    for log in sorted(folder.glob(pattern)):
        text = log.read_text(errors="replace")
        loaded = _LOADED.search(text)
        out[log.stem] = {"modules_s": float(loaded.group(1)) if loaded else None,
                         "tasks_s": [float(x) for x in _TASK_DONE.findall(text)]}
    return out


def deployment_run(num_nodes: int, overrides: list[str], workdir: Path, env: dict[str, str],
                   **deployment: Any) -> dict[str, Any]:
    """``fedtalora run ... engine=flower`` against a fresh LocalDeployment; timings, memory, node logs."""
    from fedtalora.flower.deployment import LocalDeployment

    t0 = time.perf_counter()
    dep = LocalDeployment(num_nodes, workdir / "deployment", env=env, **deployment)
    run_proc: list[subprocess.Popen[str]] = []

    def roots() -> list[int]:
        return [*dep.pids, *(p.pid for p in run_proc if p.poll() is None)]

    def group(pid: int) -> str:
        return dep.roles.get(pid, "fedtalora run")

    with dep, Monitor(roots, groups=group) as mon:
        t_up = time.perf_counter() - t0
        t1 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "fedtalora", "run", PRESET, "--quiet", *overrides,
                                 "engine=flower", f"output.dir={workdir}", "output.name=run"],
                                env=dep.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run_proc.append(proc)
        out, err = proc.communicate(timeout=3600)
        t_run = time.perf_counter() - t1
    if proc.returncode != 0:
        raise SystemExit(f"deployment run failed:\n{err[-3000:]}\n{out[-2000:]}")
    left = leftovers_after(2.0)
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    nodes = {g: v for g, v in mon.peak_by_group.items() if g.startswith("node-")}
    nodes_rss = {g: v for g, v in mon.peak_rss_by_group.items() if g.startswith("node-")}
    return {"metrics": metrics, "deployment_start_s": t_up, "flwr_run_wall_s": t_run,
            "server_wall_s": metrics["wall_seconds"], "peak_pss_B": mon.peak_pss, "peak_rss_B": mon.peak_rss,
            "peak_pss_by_role_B": dict(mon.peak_by_group), "node_peak_pss_mean_B": (
                sum(nodes.values()) / len(nodes) if nodes else None),
            "peak_rss_by_role_B": dict(mon.peak_rss_by_group), "node_peak_rss_mean_B": (
                sum(nodes_rss.values()) / len(nodes_rss) if nodes_rss else None),
            "cpu_s": mon.cpu_seconds(), "logs": _node_log_stats(workdir / "deployment", "*.log"),
            "leftover_processes_2s_after": left}


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

    cfg = resolve(PRESET, overrides)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "partitions.json").write_text(json.dumps(Experiment.build(cfg).partitions_json()))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", COLD_START, str(folder / "config.yaml"), str(folder / "partitions.json")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return time.perf_counter() - t0, float(out[-2]), float(out[-1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = Path(sys.modules["fedtalora"].__file__).resolve().parents[1]  # the fedtalora being measured
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _supports_warm() -> bool:
    import inspect

    from fedtalora.flower.deployment import LocalDeployment

    return "warm" in inspect.signature(LocalDeployment).parameters


def bench_deploy(rounds: int, label: str, cold: bool = True) -> list[dict[str, Any]]:
    """In-process, then the loopback deployment with warm nodes (where the code has them), then (``cold``)
    the same deployment with plain ``flower-supernode`` s, which start a fresh ``flwr-clientapp`` process
    per message (the behaviour before issue 19), side by side under the same load."""
    overrides = one_task(TINY, rounds)
    load_before = load()
    ref = timed_run(overrides)
    a = ref.pop("metrics")
    warm = _supports_warm()
    variants = [True, False] if warm and cold else [warm]
    rows = []
    for w in variants:
        load_now = load()
        with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
            got = deployment_run(3, overrides, Path(tmp), _env(), **({"warm": w} if warm else {}))
            cold_s, imports, build = clientapp_cold_start(overrides, _env(), Path(tmp))
        b = got.pop("metrics")
        nodes = {k: v for k, v in got["logs"].items() if k.startswith("supernode")}
        first = [v["tasks_s"][0] for v in nodes.values() if v["tasks_s"]]
        later = [t for v in nodes.values() for t in v["tasks_s"][1:]]
        rows.append({
            "what": "deploy", "label": label, "size": "tiny", "warm": w, "load_before": load_before,
            "load_before_deployment": load_now, "rounds": rounds, "clients_per_round": 3,
            "inprocess": {**ref, "round_s": mean_round(a)},
            "deployment": {**got, "round_s": mean_round(b), "round_s_all": [r["seconds"] for r in b["rounds"]]},
            "round_overhead_s": mean_round(b) - mean_round(a),
            "node_modules_s": [v["modules_s"] for v in nodes.values()],
            "node_first_message_s": first, "node_warm_task_s_mean": sum(later) / len(later) if later else None,
            "same_numbers": same_numbers(a, b), "wire": wire_per_round(b),
            "clientapp_cold_start_s": cold_s, "clientapp_imports_s": imports, "clientapp_build_s": build,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- scale ------------------------------------------------------------------------------------------

SCALE_SIM = one_task(TINY, 5, clients=100, per_round=10) + ["partition.kind=iid"]
SCALE_DEPLOY = one_task(TINY, 3, clients=10, per_round=10) + ["partition.kind=iid", "flower.connect_timeout=300"]


def bench_scale(label: str, sim: bool = True, executors: int | None = 2) -> list[dict[str, Any]]:
    """``sim``: the 100-client flower-sim row; then the 10-node TLS + auth deployment with ``executors``
    shared warm executors (None: one executor per node)."""
    rows = []
    if sim:
        rows.append(bench_scale_sim(label))
        print(json.dumps(rows[-1]), flush=True)
    load_before = load()
    ref = timed_run(SCALE_DEPLOY)
    a = ref.pop("metrics")
    with tempfile.TemporaryDirectory(prefix="flower-scale-") as tmp:
        got = deployment_run(10, SCALE_DEPLOY, Path(tmp), _env(), warm=True, executors=executors, tls=True,
                             auth=True)
    b = got.pop("metrics")
    rows.append({"what": "scale-deploy", "label": label, "load_before": load_before, "clients": 10, "per_round": 10,
                 "rounds": len(a["rounds"]), "tls": True, "auth": True, "executors": executors,
                 "inprocess": {**ref, "round_s": mean_round(a), "wire": wire_per_round(a)},
                 "flower": {**got, "round_s": mean_round(b), "wire": wire_per_round(b)},
                 "same_numbers": same_numbers(a, b)})
    return rows


def bench_scale_sim(label: str) -> dict[str, Any]:
    load_before = load()
    ref = timed_run(SCALE_SIM)
    got = timed_run([*SCALE_SIM, "engine=flower-sim"])
    a, b = ref.pop("metrics"), got.pop("metrics")
    return {"what": "scale-sim", "label": label, "load_before": load_before, "clients": 100, "per_round": 10,
            "rounds": len(a["rounds"]), "inprocess": {**ref, "round_s": mean_round(a), "wire": wire_per_round(a)},
            "flower": {**got, "round_s": mean_round(b), "wire": wire_per_round(b)},
            "same_numbers": same_numbers(a, b)}


# --- report -----------------------------------------------------------------------------------------


def _gib(nbytes: float | None) -> str:
    return "–" if not nbytes else f"{nbytes / 2**30:.2f} GiB"


def _mib(nbytes: float | None) -> str:
    return "–" if not nbytes else f"{nbytes / 2**20:.0f} MiB"


def write_md(rows: Iterable[dict[str, Any]], notes: str = "") -> str:
    rows = list(rows)
    lines = [
        "# Flower engines: overhead over `engine=inprocess`, and scale",
        "",
        f"Written by `benchmarks/flower_overhead.py --md` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, `OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}`, "
        "CPU only. The machine is shared with other engineers' jobs (load average before each measurement in the "
        "tables: 1-, 5- and 15-minute), so absolute times are noisy and mostly pessimistic: compare rows taken "
        "side by side under similar load. `before`: the code before issue 19 (Flower's own Ray start-up); "
        "`after`: this code. Deployment rows: warm nodes (this code) and plain `flower-supernode` s, which start "
        "a fresh `flwr-clientapp` process per message (the behaviour before issue 19), measured one after the "
        "other in one invocation. Memory: peak of the sum over the processes of their PSS (RSS where said).",
        "",
        "## flower-sim vs inprocess (same config, whole run)",
        "",
        "| code | size | rounds × clients | inprocess wall | flower-sim wall | ratio | start-up in-proc / sim | "
        "s/round in-proc / sim | tear-down sim | peak memory in-proc / sim | CPU s in-proc / sim | processes left "
        "2 s after | same numbers | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["what"] != "sim":
            continue
        i, s = r["inprocess"], r["flower_sim"]
        lines.append(
            f"| {r['label']} | {r['size']} | {r['rounds']} × {r['clients_per_round']} | {i['wall_s']:.1f} s | "
            f"{s['wall_s']:.1f} s | **{s['wall_s'] / i['wall_s']:.2f}** | {i['startup_s']:.1f} / **{s['startup_s']:.1f}** s | "
            f"{i['round_s']:.2f} / {s['round_s']:.2f} | {s['teardown_s']:.1f} s | {_gib(i['peak_pss_B'])} / "
            f"{_gib(s['peak_pss_B'])} | {i['cpu_s']:.0f} / {s['cpu_s']:.0f} | {s.get('leftover_processes_2s_after', '–')} | "
            f"{'yes' if r['same_numbers'] else 'NO'} | "
            f"{r['load_before']} |")
    dep = [r for r in rows if r["what"] == "deploy"]
    if dep:
        lines += [
            "",
            "## Loopback deployment (SuperLink + 3 nodes on 127.0.0.1, `flwr run`), tiny config, one task",
            "",
            "| code | nodes | rounds | s/round in-proc | s/round deployment | **overhead per round** | node cold start: "
            "modules / first message | warm task (node) | peak memory per node PSS / RSS | whole deployment (PSS) "
            "| same numbers | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in dep:
            d = r["deployment"]
            mods = [m for m in r.get("node_modules_s", []) if m is not None]
            first = r.get("node_first_message_s") or []
            cold = (f"{sum(mods) / len(mods):.1f} s / {sum(first) / len(first):.1f} s" if mods and first else
                    f"every message: {r['clientapp_cold_start_s']:.1f} s (imports {r['clientapp_imports_s']:.1f}, "
                    f"build {r['clientapp_build_s']:.1f})")
            warm_task = r.get("node_warm_task_s_mean")
            lines.append(
                f"| {r['label']} | {'warm' if r.get('warm') else 'flwr-clientapp per message'} | {r['rounds']} | "
                f"{r['inprocess']['round_s']:.2f} | {d['round_s']:.2f} | **{r['round_overhead_s']:.1f} s** | {cold} | "
                f"{'–' if warm_task is None else f'{warm_task:.2f} s'} | {_mib(d.get('node_peak_pss_mean_B'))} / {_mib(d.get('node_peak_rss_mean_B'))} | "
                f"{_gib(d.get('peak_pss_B'))} | {'yes' if r['same_numbers'] else 'NO'} | "
                f"{r.get('load_before_deployment', r['load_before'])} |")
    scale = [r for r in rows if r["what"].startswith("scale")]
    if scale:
        lines += [
            "",
            "## Scale: 100 virtual clients (flower-sim), 10 SuperNodes over TLS with node authentication (deployment)",
            "",
            "| code | engine | clients (per round) | rounds | s/round | peak memory (sum) | bytes/round down / up "
            "| start-up | same numbers | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in scale:
            i, f = r["inprocess"], r["flower"]
            ex = r.get("executors")
            engine = "flower-sim" if r["what"] == "scale-sim" else \
                f"flower, TLS + auth, {f'{ex} shared executors' if ex else 'one executor per node'}"
            for name, side, wire in (("inprocess", i, i["wire"]), (engine, f, f["wire"])):
                down = wire.get("wire_down_B", wire["modelled_down_B"])
                up = wire.get("wire_up_B", wire["modelled_up_B"])
                kind = "wire" if "wire_down_B" in wire else "modelled"
                startup = side.get("startup_s", side.get("deployment_start_s"))
                lines.append(
                    f"| {r['label']} | {name} | {r['clients']} ({r['per_round']}) | {r['rounds']} | {side['round_s']:.2f} | "
                    f"{_gib(side['peak_pss_B'])} | {down / 1e3:,.0f} / {up / 1e3:,.0f} kB ({kind}) | "
                    f"{'–' if startup is None else f'{startup:.1f} s'} | "
                    f"{'yes' if r['same_numbers'] else 'NO'} | {r['load_before']} |")
    return "\n".join(lines) + "\n" + (f"\n{notes.strip()}\n" if notes.strip() else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=["sim", "deploy"], choices=["sim", "deploy", "scale"])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--deploy-rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--executors", type=int, default=2,
                   help="scale: shared warm executors of the 10-node deployment (0: one per node)")
    p.add_argument("--scale-deploy-only", action="store_true", help="scale: skip the flower-sim row")
    p.add_argument("--no-cold", action="store_true",
                   help="deploy: skip the cold deployment (a flwr-clientapp process per message)")
    p.add_argument("--label", default="after", help="the code measured (before / after)")
    p.add_argument("--md", action="store_true", help="only rewrite flower.md from flower.jsonl")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if not args.md:
        for _ in range(args.repeat):
            rows: list[dict[str, Any]] = []
            if "sim" in args.only:
                rows += [bench_sim(size, args.label) for size in args.sizes]
            if "deploy" in args.only:
                rows += bench_deploy(args.deploy_rounds, args.label, cold=not args.no_cold)
            if "scale" in args.only:
                rows += bench_scale(args.label, sim=not args.scale_deploy_only,
                                    executors=args.executors or None)
            with open(RESULTS / "flower.jsonl", "a") as f:
                for r in rows:
                    print(json.dumps(r), flush=True)
                    f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    lines = [json.loads(x) for x in (RESULTS / "flower.jsonl").read_text().splitlines() if x.strip()]
    current = [r for r in lines if "label" in r]  # (lines of the script before issue 19 have no label)
    notes = RESULTS / "flower_notes.md"
    (RESULTS / "flower.md").write_text(write_md(current, notes.read_text() if notes.is_file() else ""))
    print(f"wrote {RESULTS / 'flower.md'}")


if __name__ == "__main__":
    main()
