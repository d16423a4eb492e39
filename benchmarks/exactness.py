"""Exactness of the global model before and after the exact base accumulation, and what it costs.

Subcommands (each prints JSON lines and rewrites ``benchmarks/results/exactness.md`` from everything measured
so far, kept in ``benchmarks/results/exactness.json``)::

    python benchmarks/exactness.py table   # {large, tiny} x {random, same-direction} residuals, 3,000 rounds,
                                           # today's fold vs the exact base, reported vs oracle error
    python benchmarks/exactness.py cost    # ViT-B/16 blocks 0-3: accumulator memory, server seconds per round
    python benchmarks/exactness.py all

**table.** One adapted layer (``--shape``, LoRA rank ``--rank``, scaling 2) driven by synthetic clients for
``--rounds`` rounds: ``random`` (each round 3..K of K clients take part with random sample counts and
perturb the global factors they start from at random) or ``same`` (two clients whose residual, and so
whose update, is the same matrix every round: systematic drift). The update's norm is ``--large`` or
``--tiny`` of ``||W||``. Both schemes see the same client factors in one pass:

* *fold* (before): ``b += fl32(R)`` with ``R`` from the float32 factors (:func:`fedtalora.core.aggregation.lora_residual`),
  reported error = what a run reports today (:func:`fedtalora.core.aggregation.aggregation_errors`, from the
  factors before the fold);
* *exact* (after): :class:`fedtalora.core.exact.ExactBase` with :func:`fedtalora.core.aggregation.exact_residual`,
  reported errors = :func:`fedtalora.core.exact.round_error` and :func:`fedtalora.core.exact.accumulated_error`.

The oracle is this script's own float64 chain ``E*_t = E*_{t-1} + sum_k p_k dE_k`` from the clients'
factors, against the model's ``E = b + s Bbar Abar`` formed densely in float64. Errors are given per round
(the worst round) and accumulated (after the last round), in units of the update and of one float32
rounding of the base weight (``u ||b||``, ``u = 2**-24``); the worst over ``--seeds`` seeds.

**cost.** The 16 adapted layers of ViT-B/16 blocks 0-3 (shapes read from ``timm`` on the meta device):
the accumulator's memory (``W0`` float32 + ``D`` float64, and the alternatives), checkpoint and catch-up
sizes, and the server's seconds per round (FedAvg + residual + apply, and the truthful metrics) for
today's fold and the exact base, interleaved, medians of ``--repeats``. CPU timings on a shared machine
are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STORE = RESULTS / "exactness.json"
REPORT = RESULTS / "exactness.md"
sys.path.insert(0, str(HERE.parent / "src"))

from fedtalora.core.aggregation import (  # noqa: E402
    LoraPair,
    aggregate_lora,
    aggregation_errors,
    exact_factors_nbytes,
    exact_residual,
    lora_residual,
    normalize_weights,
)
from fedtalora.core.exact import (  # noqa: E402
    ExactBase,
    U,
    accumulated_error,
    round_error,
    round_errors,
)

F32, F64 = torch.float32, torch.float64


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0]}


def emit(name: str, record: dict[str, Any]) -> dict[str, Any]:
    record = {"measurement": name, **record, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(record), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    store[name] = record
    STORE.write_text(json.dumps(store, indent=1))
    return record


# --------------------------------------------------------------------------------------------------
# table: 3,000 rounds, fold vs exact, reported vs oracle
# --------------------------------------------------------------------------------------------------


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t))


def run_case(kind: str, size: float, rounds: int, seed: int, d_out: int, d_in: int, r: int, K: int,
             s: float = 2.0) -> dict[str, dict[str, float]]:
    """One pass of ``rounds`` rounds; both schemes on the same client factors. Returns per scheme the
    worst per-round and the final accumulated errors (reported and oracle, both units)."""
    g = torch.Generator().manual_seed(seed * 1_000 + (0 if kind == "random" else 1) + int(-math.log10(size)) * 10)
    W0 = torch.randn(d_out, d_in, generator=g) * 0.02
    norm_w = _norm(W0)
    B0 = torch.zeros(d_out, r) if kind == "random" else torch.randn(d_out, r, generator=g) * 0.02
    A0 = torch.randn(r, d_in, generator=g) * d_in ** -0.5
    dB, dA = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    c = math.sqrt(size * norm_w / (s * _norm(dB.double() @ dA.double())))
    Bo, Ao = B0, A0
    chain = W0.double() + s * B0.double() @ A0.double()
    chain0 = chain.clone()
    exact = ExactBase({"w": W0})
    fold = W0.clone()
    E_prev = {"fold": chain.clone(), "exact": chain.clone()}
    worst = {m: dict.fromkeys(("rep_round_upd", "ora_round_upd", "rep_round_u", "ora_round_u"), 0.0)
             for m in ("fold", "exact")}
    out: dict[str, dict[str, float]] = {}
    for t in range(rounds):
        if kind == "same":
            Bs, As, w = [B0 + c * dB, B0 - c * dB], [A0 + c * dA, A0 - c * dA], normalize_weights([1, 1])
        else:
            m = int(torch.randint(3, K + 1, (1,), generator=g))
            w = normalize_weights(torch.randint(1, 500, (m,), generator=g).tolist())
            xi = [torch.randn(d_out, r, generator=g) for _ in range(m)]
            eta = [torch.randn(r, d_in, generator=g) for _ in range(m)]
            lin = s * sum(pk * (x.double() @ Ao.double() + Bo.double() @ e.double())
                          for pk, x, e in zip(w.tolist(), xi, eta, strict=True))
            sigma = size * norm_w / _norm(lin)
            Bs, As = [Bo + sigma * x for x in xi], [Ao + sigma * e for e in eta]
        agg = aggregate_lora([{"B": B, "A": A} for B, A in zip(Bs, As, strict=True)], w,
                             [LoraPair("w", "A", "B", s)], residual=False)
        Bn, An = agg.state["B"], agg.state["A"]
        # oracle
        p = w.tolist()
        prod_o = Bo.double() @ Ao.double()
        update = s * sum(pk * (B.double() @ A.double() - prod_o) for pk, B, A in zip(p, Bs, As, strict=True))
        chain = chain + update
        upd = _norm(update)
        # today's fold, and what a run reports today
        res32 = lora_residual(Bs, As, w, s)
        rep_fold = aggregation_errors(Bs, As, w, s, Bn, An, res32)[0]
        fold = fold + res32
        # the exact base, and its truthful metrics
        base_old = exact.base("w")
        exact.add({"w": exact_residual(Bs, As, w, s, Bn, An)})
        base = exact.base("w")
        rep = round_error(base_old, base, (Bo, Ao), (Bn, An), Bs, As, w, s)
        lora_new = s * Bn.double() @ An.double()
        for name, b, rep_upd, rep_u in (("fold", fold, rep_fold, rep_fold * upd / (U * _norm(fold.double()))),
                                        ("exact", base, rep.relative, rep.in_rounding)):
            wn = _norm(b.double())  # the unit: one float32 rounding of the base weight, u ||b||
            E = b.double() + lora_new
            ora = _norm(E - E_prev[name] - update)
            E_prev[name] = E
            wst = worst[name]
            wst["rep_round_upd"] = max(wst["rep_round_upd"], rep_upd)
            wst["rep_round_u"] = max(wst["rep_round_u"], rep_u)
            wst["ora_round_upd"] = max(wst["ora_round_upd"], ora / upd)
            wst["ora_round_u"] = max(wst["ora_round_u"], ora / (U * wn))
            acc_upd = _norm(chain - chain0)
            err = _norm(E - chain)
            wst["worst_over_bound"] = max(wst.get("worst_over_bound", 0.0), err / max(2 * U * wn, 1e-5 * acc_upd))
            if t == rounds - 1:
                out[name] = {**wst, "ora_acc_upd": err / acc_upd, "ora_acc_u": err / (U * wn),
                             "update_over_w": upd / wn, "acc_update_over_w": acc_upd / wn,
                             "within_bound": float(wst["worst_over_bound"] <= 1.0)}
        Bo, Ao = Bn, An
    acc = accumulated_error(exact.base("w"), exact.w0["w"], exact.acc["w"], (Bo, Ao), (B0, A0), s)
    out["exact"].update(rep_acc_upd=acc.relative, rep_acc_u=acc.in_rounding)
    out["fold"].update(rep_acc_upd=float("nan"), rep_acc_u=float("nan"))  # not reported today
    return out


def bench_table(args: argparse.Namespace) -> None:
    d_out, d_in = args.shape
    for kind in ("random", "same"):
        for label, size in (("large", args.large), ("tiny", args.tiny)):
            t0 = time.perf_counter()
            runs = [run_case(kind, size, args.rounds, seed, d_out, d_in, args.rank, args.clients)
                    for seed in range(args.seeds)]
            worst = {m: {k: max(run[m][k] for run in runs) if k != "within_bound" else min(run[m][k] for run in runs)
                         for k in runs[0][m]} for m in ("fold", "exact")}
            emit(f"table/{kind}/{label}", {"kind": kind, "size": size, "rounds": args.rounds, "seeds": args.seeds,
                                           "shape": [d_out, d_in], "rank": args.rank, "clients": args.clients,
                                           "fold": worst["fold"], "exact": worst["exact"],
                                           "seconds": time.perf_counter() - t0})
    report()


# --------------------------------------------------------------------------------------------------
# cost: ViT-B/16 blocks 0-3
# --------------------------------------------------------------------------------------------------


def vit_b_shapes() -> tuple[dict[str, tuple[int, int]], int]:
    """The adapted layers of ViT-B/16 blocks 0-3 (qkv/proj/fc1/fc2) as (d_out, d_in), read from timm
    (``vit_base_patch16_224``, no weights, on the meta device), and the backbone's parameter count."""
    import timm

    with torch.device("meta"):
        net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    subs = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    shapes = {f"blocks.{b}.{sub}": tuple(net.get_submodule(f"blocks.{b}.{sub}").weight.shape)
              for b in range(4) for sub in subs}
    return shapes, sum(p.numel() for p in net.parameters())


def measure_cost(clients: int = 10, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """The accumulator's memory and the server's seconds per round, today's fold vs the exact base, on the 16
    adapted layers of ViT-B/16 blocks 0-3 with ``clients`` clients at r = 8 (``benchmarks/perf.py exact``
    reports the same measurement). Returns ``{"memory": {...}, "time": {...}}``."""
    shapes, backbone_params = vit_b_shapes()
    n = sum(a * b for a, b in shapes.values())
    K, r, C = clients, 8, 100
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    W0 = {layer: (torch.randn(*shape, generator=g) * 0.02).to(dev) for layer, shape in shapes.items()}
    exact = ExactBase(W0)
    fold = {layer: w.clone() for layer, w in W0.items()}
    pairs = [LoraPair(layer, f"{layer}.lora_A", f"{layer}.lora_B", 2.0) for layer in shapes]
    state = {}
    for layer, (d_out, d_in) in shapes.items():
        state[f"{layer}.lora_A"] = torch.randn(r, d_in, generator=g) * d_in ** -0.5
        state[f"{layer}.lora_B"] = torch.randn(d_out, r, generator=g) * 0.01
    state["head.weight"], state["head.bias"] = torch.randn(C, 768, generator=g) * 0.02, torch.zeros(C)
    updates = [{k: (v + torch.randn(v.shape, generator=g) * 1e-3).to(dev) for k, v in state.items()} for _ in range(K)]
    state = {k: v.to(dev) for k, v in state.items()}

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    weights = normalize_weights(torch.randint(100, 900, (K,), generator=g).tolist())
    largest = max(a * b for a, b in shapes.values())
    memory = {
        "adapted_elements": n,
        "base_fp32_bytes": 4 * n,
        "exact_w0_plus_d_bytes": exact.nbytes,
        "alt_t_fp64_bytes": 8 * n,
        "alt_hi_lo_fp32_bytes": 4 * n,
        "transient_peak_bytes": 8 * largest * 2,  # one layer's float64 residual, the float64 W0 + D
        "metrics_snapshot_bytes": 4 * n,  # the base of every layer before the round, for the per-round error
        "checkpoint_today_bytes": 4 * n,
        "checkpoint_exact_bytes": 4 * n + 8 * n,  # base (for the check fl32(W0 + D) == b) + D
        "dense_catch_up_today_bytes": 4 * n,
        "dense_catch_up_exact_bytes": 8 * n,
        "factored_catch_up_today_bytes": sum((a + b) * (K - 1) * r * 4 for a, b in shapes.values()),
        "factored_catch_up_exact_bytes": sum(exact_factors_nbytes(a, b, r, K) for a, b in shapes.values()),
        "vit_b_model_fp32_bytes": 4 * backbone_params,
    }
    memory = {"layers": len(shapes), "shapes": {k: list(v) for k, v in shapes.items()}, **memory}

    def today() -> dict[str, float]:
        t0 = clock()
        agg = aggregate_lora(updates, weights, pairs, residual=True)
        t1 = clock()
        with torch.no_grad():
            for layer, res in agg.residuals.items():
                fold[layer].add_(res)
        t2 = clock()
        return {"aggregate": t1 - t0, "apply": t2 - t1, "metrics": 0.0, "total": t2 - t0}

    model_base = {layer: w.clone() for layer, w in W0.items()}  # the model's float32 weights

    def exact_round() -> dict[str, float]:
        t0 = clock()
        agg = aggregate_lora(updates, weights, pairs, residual=True, exact=True)
        t_snap = clock()
        base_old = {layer: w.clone() for layer, w in model_base.items()}  # the loop's snapshot (4 B/weight)
        t1 = clock()
        exact.add(agg.residuals)  # FedModel.add_to_base with the exact base:
        for layer in shapes:
            exact.materialise_into(layer, model_base[layer])  # D += R; b <- fl32(W0 + D)
        t2 = clock()
        round_errors(pairs, base_old, model_base, state, agg.state, updates, weights)
        base_new = model_base
        for p in pairs:
            accumulated_error(base_new[p.layer], exact.w0[p.layer], exact.acc[p.layer],
                              (agg.state[p.b_key], agg.state[p.a_key]), (state[p.b_key], state[p.a_key]), p.scaling)
        t3 = clock()
        return {"aggregate": t_snap - t0, "apply": t2 - t1, "metrics": t3 - t2 + t1 - t_snap, "total": t3 - t0}

    today(), exact_round()  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"today": [], "exact": []}
    for i in range(repeats):  # interleaved: A B, B A, ...
        order = (("today", today), ("exact", exact_round)) if i % 2 == 0 else (("exact", exact_round), ("today", today))
        for name, fn in order:
            runs[name].append(fn())
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    timing = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "clients": K, "rank": r,
              "repeats": repeats, "threads": torch.get_num_threads(), "today": med["today"], "exact": med["exact"],
              "ratio_total": med["exact"]["total"] / med["today"]["total"],
              "ratio_without_metrics": (med["exact"]["total"] - med["exact"]["metrics"]) / med["today"]["total"],
              "runs": runs}
    return {"memory": memory, "time": timing}


def bench_cost(args: argparse.Namespace) -> None:
    cost = measure_cost(args.clients, args.repeats, args.device)
    if args.device == "cpu":
        emit("cost/memory", cost["memory"])
    emit("cost/time" if args.device == "cpu" else f"cost/time-{torch.device(args.device).type}", cost["time"])
    report()


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _f(x: float) -> str:
    if x != x:  # nan
        return "not reported"
    return f"{x:.2g}" if x != 0 else "0"


def report() -> None:
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    lines = ["# Exactness of the global model: today's fold vs the exact base", "",
             "Written by `benchmarks/exactness.py` (see its docstring for the method). `u = 2^-24`; "
             "`u·‖W‖` is one float32 rounding of the weight (`W` = the float32 base weight `b` the layer "
             "computes with). Acceptance bound: the model within max(2·u·‖W‖, 1e-5 of the accumulated "
             "update) of the exact chain at every round.", ""]
    rows = [v for k, v in sorted(store.items()) if k.startswith("table/")]
    if rows:
        rec = rows[0]
        lines += [f"## Errors over {rec['rounds']} rounds",
                  "",
                  f"One layer {rec['shape'][0]}×{rec['shape'][1]}, LoRA rank {rec['rank']}, scaling 2; `random`: "
                  f"3..{rec['clients']} of {rec['clients']} clients per round with random sample counts; `same`: "
                  "two clients whose residual is the same matrix every round. Update size: per-round update norm "
                  f"/ ‖W‖. Worst over {rec['seeds']} seeds. *Reported*: what the run would write "
                  "(`aggregation_error`, and for the exact base `aggregation_error_accumulated`); *oracle*: an "
                  "independent float64 chain from the clients' factors.", "",
                  "| residual | update / ‖W‖ | scheme | worst round: reported (of update) | oracle (of update) | "
                  "reported (u‖W‖) | oracle (u‖W‖) | accumulated after last round: reported (of acc. update) | "
                  "oracle (of acc. update) | reported (u‖W‖) | oracle (u‖W‖) | "
                  "within bound at every round (worst error / bound) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = {("random", "large"): 0, ("random", "tiny"): 1, ("same", "large"): 2, ("same", "tiny"): 3}
        for key in sorted((k for k in store if k.startswith("table/")),
                          key=lambda k: order[tuple(k.split("/")[1:])]):
            rec = store[key]
            for scheme, label in (("fold", "before: fold"), ("exact", "after: exact base")):
                m = rec[scheme]
                lines.append(
                    f"| {rec['kind']} | {rec['size']:.0e} | {label} | {_f(m['rep_round_upd'])} | {_f(m['ora_round_upd'])} | "
                    f"{_f(m['rep_round_u'])} | {_f(m['ora_round_u'])} | {_f(m['rep_acc_upd'])} | {_f(m['ora_acc_upd'])} | "
                    f"{_f(m['rep_acc_u'])} | {_f(m['ora_acc_u'])} | {'yes' if m['within_bound'] else '**no**'} ({m['worst_over_bound']:.2g}) |")
        lines.append("")
    mem = store.get("cost/memory")
    if mem:
        MiB = 2 ** 20
        lines += ["## Memory, ViT-B/16 blocks 0–3 (qkv/proj/fc1/fc2)", "",
                  f"{mem['layers']} layers, {mem['adapted_elements']:,} weights (shapes from timm "
                  "`vit_base_patch16_224`). Today keeps nothing beside the float32 base.", "",
                  "| what | MiB |", "|---|---|",
                  f"| the adapted base weights themselves (float32, for scale) | {mem['base_fp32_bytes'] / MiB:.0f} |",
                  f"| **accumulator: W0 float32 + D float64 (chosen)** | **{mem['exact_w0_plus_d_bytes'] / MiB:.0f}** |",
                  f"| alternative: T = W0 + D float64 only | {mem['alt_t_fp64_bytes'] / MiB:.0f} |",
                  f"| alternative: float32 (b, lo) pair, lo only | {mem['alt_hi_lo_fp32_bytes'] / MiB:.0f} |",
                  f"| transient per round: one layer's float64 residual + W0 + D | {mem['transient_peak_bytes'] / MiB:.0f} |",
                  f"| transient per round: base snapshot for the per-round error | {mem['metrics_snapshot_bytes'] / MiB:.0f} |",
                  f"| checkpoint tensors of the base: today / exact (b + D) | {mem['checkpoint_today_bytes'] / MiB:.0f} / "
                  f"{mem['checkpoint_exact_bytes'] / MiB:.0f} |",
                  f"| dense catch-up: today (b) / exact (D) | {mem['dense_catch_up_today_bytes'] / MiB:.0f} / "
                  f"{mem['dense_catch_up_exact_bytes'] / MiB:.0f} |",
                  f"| factored catch-up per round, 10 clients r=8: today (K−1)r / exact K r + weights | "
                  f"{mem['factored_catch_up_today_bytes'] / MiB:.2f} / {mem['factored_catch_up_exact_bytes'] / MiB:.2f} |",
                  f"| the whole ViT-B/16 backbone (float32, for scale) | {mem['vit_b_model_fp32_bytes'] / MiB:.0f} |", ""]
    tm = store.get("cost/time")
    if tm:
        a, b = tm["today"], tm["exact"]
        lines += ["## Server seconds per round, ViT-B/16 blocks 0–3", "",
                  f"{tm['clients']} clients, r={tm['rank']}, CPU, {tm['threads']} thread(s), median of "
                  f"{tm['repeats']} interleaved repeats; load average {tm['machine']['loadavg']:.1f} on "
                  f"{tm['machine']['cpus']} cores at the time (shared machine: noisy, compare the ratio).", "",
                  "| step | today's fold (s) | exact base (s) |", "|---|---|---|",
                  f"| FedAvg + residual (+ today's factor-side error) | {a['aggregate']:.3f} | {b['aggregate']:.3f} |",
                  f"| apply to the base | {a['apply']:.3f} | {b['apply']:.3f} |",
                  f"| truthful metrics (per-round + accumulated) | — | {b['metrics']:.3f} |",
                  f"| **total** | **{a['total']:.3f}** | **{b['total']:.3f}** |", "",
                  f"Exact / today: {tm['ratio_total']:.2f}× with the metrics, {tm['ratio_without_metrics']:.2f}× "
                  "without them. For scale: `results/perf.md` (agg) estimates one client's local round of ViT-B/16 "
                  "at 224 px (cifar100 preset, 2,500 images) at ~5,000 s on this CPU, and measured today's server "
                  "step at 0.67 s on a quieter machine.", ""]
    for key, rec in sorted(store.items()):
        if key.startswith("cost/time-"):
            a, b = rec["today"], rec["exact"]
            lines += [f"GPU ({rec.get('device', '?')}): today {a['total'] * 1e3:.1f} ms, exact {b['total'] * 1e3:.1f} ms "
                      f"per round ({rec['ratio_total']:.2f}×).", ""]
    REPORT.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["table", "cost", "all", "report"])
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=2, default=[96, 64])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--large", type=float, default=1e-3)
    ap.add_argument("--tiny", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the server's tensors live for `cost` (cpu, cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what in ("table", "all"):
        bench_table(args)
    if args.what in ("cost", "all"):
        bench_cost(args)
    if args.what == "report":
        report()


if __name__ == "__main__":
    main()
