"""Recompute the numbers that ``docs/study-reswu.md`` (and the README's summary) quote, from the result files.

Reads ``benchmarks/results/study_reswu.json`` (CPU, 3 seeds) and ``study_reswu_gpu.json`` (H100, seed 0) and
prints each quoted quantity as computed, so the prose can be checked against the data it rests on::

    python benchmarks/study_reswu_check.py

Definitions (as in the study): aggregation loss = a run's ``agg_loss_mean`` (mean over rounds of the worst
layer's ``|s B̄Ā − Σ p_k s B_k A_k| / |Σ p_k s B_k A_k|``, on that run's own trajectory); residual gain =
F_AA(fedtalora) − F_AA(fedlora), paired by seed. A seed pair *collapses* on one side when that run's F_AA is
below half of the other's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BASE_CELL = {"rank": 4, "blocks": "lower"}


def load(results: Path) -> tuple[list[tuple[str, dict[str, Any]]], dict[tuple[str, str], dict[str, Any]]]:
    cells, runs = [], {}
    for name in ("study_reswu.json", "study_reswu_gpu.json"):
        data = json.loads((results / name).read_text())
        for bench, rows in data["cells"].items():
            cells += [(bench, c) for c in rows]
        for bench, rows in data["runs"].items():
            runs.update({(bench, r["label"]): r["seeds"] for r in rows})
    return cells, runs


def _key(c: dict[str, Any]) -> tuple[Any, ...]:
    return c["lr"], c["partition"], c["epochs"], c["rank"], c["blocks"]


def pairs(cells: list[tuple[str, dict[str, Any]]], runs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (fedtalora cell, seed) with its fedlora partner."""
    naive = {(b, _key(c)): c for b, c in cells if c["method"] == "fedlora"}
    out = []
    for b, c in cells:
        if c["method"] != "fedtalora":
            continue
        f = naive[(b, _key(c))]
        rt, rl = runs[(b, c["label"])], runs[(b, f["label"])]
        for s in rt:
            out.append({"bench": b, "cell": c["label"], "cell_loss": c["agg_loss_mean"], "seed": s,
                        "faa_res": rt[s]["faa"], "faa_naive": rl[s]["faa"], "loss_res": rt[s]["agg_loss_mean"],
                        "loss_naive": rl[s]["agg_loss_mean"], "gain_pp": 100 * (rt[s]["faa"] - rl[s]["faa"])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--threshold", type=float, default=0.2, help="mean aggregation loss that splits the seed pairs")
    args = ap.parse_args()
    cells, runs = load(args.results)
    res = [(b, c) for b, c in cells if c["method"] == "fedtalora"]
    print(f"paired cells: {len(res)}")

    print("\n# GPU (full Banking77, seed 0): residual gain per LoRA rate, pp")
    for b, c in res:
        if b == "text-full":
            print(f"  lr {c['lr']:<6g} gain {100 * c['residual_gain']:+.4f} pp   mean loss {c['agg_loss_mean']:.3g}")

    print("\n# growth of the mean aggregation loss per LoRA-rate step (rank 4, lower blocks)")
    for bench in ("text", "image"):
        for epochs in (1, 5):
            ratios = []
            for method in ("fedtalora", "fedlora"):
                for part in sorted({c["partition"] for b, c in cells if b == bench}):
                    row = sorted((c for b, c in cells if b == bench and c["method"] == method
                                  and c["partition"] == part and c["epochs"] == epochs
                                  and all(c[k] == v for k, v in BASE_CELL.items())), key=lambda c: c["lr"])
                    ratios += [(row[i]["lr"], row[i + 1]["lr"], row[i + 1]["agg_loss_mean"] / row[i]["agg_loss_mean"])
                               for i in range(len(row) - 1)]
            if ratios:
                r = [x[2] for x in ratios]
                print(f"  {bench}, {epochs} epoch(s): x{min(r):.1f} .. x{max(r):.1f} per step "
                      f"({len(r)} steps over both methods and all partitions)")
                for lo, hi in sorted({(a, b) for a, b, _ in ratios}):
                    step = [x[2] for x in ratios if (x[0], x[1]) == (lo, hi)]
                    print(f"    {lo:g} -> {hi:g}: x{min(step):.1f} .. x{max(step):.1f}")

    print("\n# residual gain (cell means, pp) by mean aggregation loss of the cell")
    for lo, hi in ((0, 0.01), (0.01, 0.05), (0.05, float("inf"))):
        sel = [(b, c) for b, c in res if lo <= c["agg_loss_mean"] < hi]
        g = [100 * c["residual_gain"] for _, c in sel]
        lg = [100 * c["lora_gain"] for _, c in sel if c["lora_gain"] is not None]
        print(f"  [{lo}, {hi}): {len(sel)} cells, residual gain {min(g):+.2f} .. {max(g):+.2f}, "
              f"LoRA gain {min(lg):+.2f} .. {max(lg):+.2f}")
        for bench in ("text", "image", "text-full"):
            gb = [100 * c["residual_gain"] for b, c in sel if b == bench]
            if gb:
                print(f"    {bench}: {len(gb)} cells, {min(gb):+.2f} .. {max(gb):+.2f}")
    pos = [(b, c) for b, c in res if c["residual_gain_std"] == c["residual_gain_std"]  # not NaN
           and c["residual_gain"] > 0 and c["residual_gain"] > c["residual_gain_std"]]
    print(f"  cells with a positive gain above its std over seeds: {len(pos)}: "
          + ", ".join(f"{b} {c['label']} {100 * c['residual_gain']:+.2f}±{100 * c['residual_gain_std']:.2f}"
                      for b, c in pos))

    print(f"\n# seed pairs by the mean aggregation loss (threshold {args.threshold})")
    ps = pairs(cells, runs)
    for which in ("loss_res", "loss_naive"):
        above = [p for p in ps if p[which] >= args.threshold]
        below = [p for p in ps if p[which] < args.threshold]
        for name, sel in (("above", above), ("below", below)):
            res_c = sum(p["faa_res"] < 0.5 * p["faa_naive"] for p in sel)
            naive_c = sum(p["faa_naive"] < 0.5 * p["faa_res"] for p in sel)
            both = sum(max(p["faa_res"], p["faa_naive"]) < 0.02 for p in sel)
            print(f"  by {which} {name}: {len(sel)} pairs; residual run collapsed {res_c}, naive run collapsed "
                  f"{naive_c}, both near chance (F_AA < 2 %) {both}")
    print("  the collapses:")
    for p in ps:
        if p["faa_res"] < 0.5 * p["faa_naive"] or p["faa_naive"] < 0.5 * p["faa_res"]:
            print(f"    {p['bench']} {p['cell']} seed {p['seed']}: F_AA {100 * p['faa_res']:.1f} (residual) vs "
                  f"{100 * p['faa_naive']:.1f} (naive), losses {p['loss_res']:.3f} / {p['loss_naive']:.3f}")
    print("  per-seed gains of the cells with a mean loss >= 0.05:")
    for b, c in res:
        if c["agg_loss_mean"] >= 0.05:
            g = [p["gain_pp"] for p in ps if p["bench"] == b and p["cell"] == c["label"]]
            sd = statistics.stdev(g) if len(g) > 1 else float("nan")
            print(f"    {b} {c['label']}: {100 * c['residual_gain']:+.1f} ± {sd:.1f} pp; seeds "
                  + ", ".join(f"{x:+.1f}" for x in g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
