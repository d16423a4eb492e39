"""Where does the residual pay off? A measured map of Fed-TaLoRA against its two simplest rivals.

One command runs the whole study and writes its report::

    python benchmarks/study_reswu.py --data ../shared/data --out runs/study-reswu --workers 2

Two benchmarks, each a grid of federated class-incremental runs of three methods that differ in ONE
mechanism each: ``fedtalora`` (shared LoRA + head, exact residual), ``fedlora`` (the same, factors
averaged naively: no residual) and ``head-only`` (no LoRA: the frozen backbone and a federated head).

* **text**: Banking77 (77 intents, 7 tasks) with the pre-trained all-MiniLM-L6-v2 (preset
  ``study-banking77``: a per-class subset, so that ~120 runs fit a 2-core CPU);
* **image**: Omniglot-small (156 characters of five alphabets, 6 tasks) with a small ViT (4 blocks,
  width 96) that this script first pre-trains, centrally, on three *other* alphabets of Omniglot
  (Balinese, Early Aramaic, Korean; no class or drawing of the benchmark is seen), because no
  pre-trained small ViT can be downloaded here (preset ``study-omniglot``).

The grid (the same for both benchmarks, three seeds each):

* core: LoRA learning rate {0.001, 0.005, 0.02, 0.1} (head-only has no LoRA rate) x partition
  {Dirichlet 0.05, Dirichlet 0.5, quantity alpha=2} x local epochs 1; and local epochs 5 under
  Dirichlet 0.05 (where clients disagree most, the residual has the most to repair);
* capacity: rank {4, 16} x LoRA blocks {lower half, all} under Dirichlet 0.05, local epochs 1, LoRA
  rates 0.02 and 0.1 (rank 4 in the lower half is the core's setting).

For every cell: F_AA and AIA (mean +- std over seeds); the aggregation loss (what averaging the factors
loses of the clients' averaged update, ``naive_aggregation_loss`` of every round, measured in every
LoRA run); the residual's gain (fedtalora - fedlora, paired by seed: same data, partitions and
initialisation); LoRA's gain (fedtalora - head-only, paired by seed). Plots: residual gain against
aggregation loss; F_AA against LoRA learning rate per method.

The runs are a sweep (``fedtalora sweep``; the grid files are written to ``OUT/grids``): finished runs
are skipped and interrupted ones resume, so an interrupted study continues where it stopped when the
same command runs again. ``--workers N`` runs N runs at once (one torch thread each).

Outputs: ``benchmarks/results/study_reswu.md`` (tables), ``study_reswu.json`` (every cell) and
``docs/img/study_reswu_*.png`` (plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"

LRS = (0.001, 0.005, 0.02, 0.1)
CAPACITY_LRS = (0.02, 0.1)
LORA_METHODS = ("fedtalora", "fedlora")
METHODS = (*LORA_METHODS, "head-only")
SEEDS = (0, 1, 2)

# The small ViT of the image benchmark (the study-omniglot preset's model.kwargs).
VIT = {"patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3}
PRETRAIN_ALPHABETS = ("Balinese", "Early_Aramaic", "Korean")



def _partitions(quantity_alpha: int) -> dict[str, tuple[str, ...]]:
    return {"dir0.05": ("partition.kind=dirichlet", "partition.beta=0.05"),
            "dir0.5": ("partition.kind=dirichlet", "partition.beta=0.5"),
            f"q{quantity_alpha}": ("partition.kind=quantity", f"partition.alpha={quantity_alpha}")}


# name -> preset, data folder under --data, LoRA blocks (lower half, all), partitions. Quantity alpha: about a
# quarter of a task's classes per client (5 clients must cover them: 11 intents -> 3, 26 characters -> 6).
BENCHMARKS: dict[str, dict[str, Any]] = {
    # text: a fifth, higher rate, because at 0.1 one round of one epoch leaves MiniLM's aggregation loss < 1e-3
    "text": {"preset": "study-banking77", "data": "banking77", "title": "Banking77 + MiniLM",
             "blocks": {"lower": "[0,1,2]", "all": "[0,1,2,3,4,5]"}, "partitions": _partitions(3),
             "lrs": (*LRS, 0.5)},
    "image": {"preset": "study-omniglot", "data": "omniglot-small", "title": "Omniglot-small + small ViT",
              "blocks": {"lower": "[0,1]", "all": "[0,1,2,3]"}, "partitions": _partitions(6)},
    # The GPU version's core: the banking77 preset as shipped (all data, 10 clients, Dirichlet 0.1, 3 rounds x
    # 2 local epochs per task, rank 8 in layers 0-2), the three methods across the four LoRA rates.
    "text-full": {"preset": "banking77", "data": "banking77", "title": "Banking77 + MiniLM, full data and budget",
                  "blocks": {"lower": "[0,1,2]"}, "partitions": {"dir0.1": ()}, "lr_only": {"epochs": 2, "rank": 8}},
}

logger = logging.getLogger("study_reswu")


# --------------------------------------------------------------------------------------------------
# The small ViT's pre-training (image benchmark)
# --------------------------------------------------------------------------------------------------


def pretrain_vit(data_root: Path, out: Path, *, epochs: int = 60, lr: float = 1e-3, seed: int = 0) -> Path:
    """Pre-train the study's small ViT on Omniglot alphabets the benchmark never uses; cached in ``out``.

    Central training of ``vit_tiny_patch16_224`` with :data:`VIT` at 28 px on every drawing of the
    :data:`PRETRAIN_ALPHABETS` characters of ``images_background_small1`` (86 classes): AdamW, cosine
    schedule, random flips and shifts. The backbone (no classifier) is saved as safetensors, which
    ``model.checkpoint`` loads strictly.
    """
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fedtalora.data import ImageTransform
    from fedtalora.data.images import load_omniglot
    from fedtalora.seeding import numpy_rng, seeded_torch, torch_generator

    path = out / f"omniglot-vit-pretrained-seed{seed}.safetensors"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    data = load_omniglot(data_root, seed=seed, size=28, parts=("images_background_small1",))
    keep = [i for i, n in enumerate(data.class_names) if n.split("/")[0] in PRETRAIN_ALPHABETS]
    remap = np.full(data.num_classes, -1)
    remap[keep] = np.arange(len(keep))
    images = torch.cat([data.train.inputs, data.test.inputs])
    labels = remap[np.concatenate([data.train.labels, data.test.labels])]
    images, labels = images[torch.from_numpy(labels >= 0)], torch.from_numpy(labels[labels >= 0])
    with seeded_torch(seed, "pretrain-init"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(keep), img_size=28, **VIT)
    pcfg = model.pretrained_cfg
    transform = ImageTransform(28, tuple(pcfg["mean"]), tuple(pcfg["std"]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(labels) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch_generator(seed, "pretrain-augment")
    rng = numpy_rng(seed, "pretrain-shuffle")
    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(labels)))
        total = 0.0
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            x = transform(images[idx], train=True, generator=gen)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # strokes move a little
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        logger.info("pretrain epoch %d/%d: loss %.3f", epoch + 1, epochs, total / len(labels))
    model.reset_classifier(0)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    logger.info("pre-trained the small ViT on %d images of %d classes in %.0f s -> %s",
                len(labels), len(keep), time.perf_counter() - t0, path)
    return path


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


def cells(bench: dict[str, Any], lrs: tuple[float, ...] | None = None) -> list[dict[str, Any]]:
    """Every cell of one benchmark's grid: method, LoRA rate, partition, local epochs, rank, blocks
    (``lrs``: the LoRA rates; default: the benchmark's own, else :data:`LRS`)."""
    lrs = lrs or bench.get("lrs", LRS)
    skewed, *_ = bench["partitions"]  # the most non-IID partition: where the residual has most to repair
    out: list[dict[str, Any]] = []

    def add(method: str, lr: float | None, part: str, epochs: int, rank: int = 4, blocks: str = "lower") -> None:
        cell = {"method": method, "lr": lr, "partition": part, "epochs": epochs, "rank": rank, "blocks": blocks}
        if cell not in out:
            out.append(cell)

    if "lr_only" in bench:  # the preset's own budget and capacity; only the method and the LoRA rate vary
        epochs, rank = bench["lr_only"]["epochs"], bench["lr_only"]["rank"]
        for method in LORA_METHODS:
            for lr in lrs:
                add(method, lr, skewed, epochs, rank)
        add("head-only", None, skewed, epochs, 4)
        return out

    for part in bench["partitions"]:
        for method in LORA_METHODS:
            for lr in lrs:
                add(method, lr, part, 1)
        add("head-only", None, part, 1)
    for method in LORA_METHODS:
        for lr in lrs:
            add(method, lr, skewed, 5)
    add("head-only", None, skewed, 5)
    for rank, blocks in ((16, "lower"), (4, "all"), (16, "all")):
        for method in LORA_METHODS:
            for lr in CAPACITY_LRS:
                add(method, lr, skewed, 1, rank, blocks)
    return out


def cell_label(cell: dict[str, Any]) -> str:
    lr = "-" if cell["lr"] is None else f"lr{cell['lr']:g}"
    return f"{cell['method']} {lr} {cell['partition']} e{cell['epochs']} r{cell['rank']} {cell['blocks']}"


def cell_overrides(cell: dict[str, Any], bench: dict[str, Any]) -> list[str]:
    sets = [f"method={cell['method']}", *bench["partitions"][cell["partition"]],
            f"train.local_epochs={cell['epochs']}", f"lora.rank={cell['rank']}", f"lora.alpha={cell['rank']}",
            f"lora.blocks={bench['blocks'][cell['blocks']]}"]
    if cell["lr"] is not None:
        sets.append(f"train.lr={cell['lr']:g}")
    return sets


def write_grid(name: str, out: Path, data_root: Path, checkpoint: Path | None, extra: list[str],
               lrs: tuple[float, ...] | None = None, seeds: tuple[int, ...] = SEEDS) -> Path:
    """The benchmark's grid as a ``fedtalora sweep`` file in ``OUT/grids`` (runnable on its own)."""
    import yaml

    bench = BENCHMARKS[name]
    common = [f"data.root={(data_root / bench['data']).resolve()}"]
    if checkpoint is not None:
        common.append(f"model.checkpoint={checkpoint.resolve()}")
    common += extra
    grid = {
        "name": f"study-reswu-{name}",
        "output": str(out.resolve()),
        "presets": [bench["preset"]],
        "overrides": [{"label": cell_label(c), "set": cell_overrides(c, bench)} for c in cells(bench, lrs)],
        "seeds": list(seeds),
        "common": common,
    }
    path = out / "grids" / f"study-reswu-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {bench['title']}: written by benchmarks/study_reswu.py\n" + yaml.safe_dump(grid, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def collect(grid: Any, bench: dict[str, Any], lrs: tuple[float, ...] | None = None) -> list[dict[str, Any]]:
    """One record per cell: per-seed F_AA, AIA, forgetting, aggregation loss, bytes, seconds, read from the
    ``metrics.json`` of every complete run of ``grid`` (runs still missing are left out)."""
    from fedtalora.app.sweep import plan

    by_label = {cell_label(c): c for c in cells(bench, lrs)}
    records: dict[str, dict[str, Any]] = {}
    for spec in plan(grid):
        metrics_path = spec.run_dir / "metrics.json"
        if spec.setting.label not in by_label or not metrics_path.is_file():
            continue
        m = json.loads(metrics_path.read_text())
        if m.get("complete") is not True:
            continue
        label = spec.setting.label
        rec = records.setdefault(label, {**by_label[label], "label": label, "seeds": {}})
        losses = [r["naive_aggregation_loss"] for r in m["rounds"] if r.get("naive_aggregation_loss") is not None]
        rec["seeds"][spec.seed] = {
            "faa": m["final_average_accuracy"], "aia": m["average_incremental_accuracy"],
            "forgetting": m["forgetting"], "agg_loss_mean": float(np.mean(losses)) if losses else None,
            "agg_loss_max": max(losses) if losses else None, "agg_error_max": m["max_aggregation_error"],
            "downlink_mb": m["downlink_bytes_total"] / 1e6, "seconds": m["wall_seconds"],
        }
    return [records[k] for k in by_label if k in records]


def analyse(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: mean +- std over seeds; the residual's and LoRA's gains, paired by seed."""
    index = {(r["method"], r["lr"], r["partition"], r["epochs"], r["rank"], r["blocks"]): r for r in records}
    rows = []
    for r in records:
        seeds = r["seeds"]
        row = {k: r[k] for k in ("method", "lr", "partition", "epochs", "rank", "blocks", "label")}
        row["n"] = len(seeds)
        for key in ("faa", "aia", "forgetting", "agg_loss_mean", "agg_loss_max", "agg_error_max", "downlink_mb",
                    "seconds"):
            vals = [s[key] for s in seeds.values() if s[key] is not None]
            row[key], row[f"{key}_std"] = _mean_std(vals) if vals else (None, None)
        if r["method"] == "fedtalora":
            for other, name in (("fedlora", "residual_gain"), ("head-only", "lora_gain")):
                key = (other, r["lr"] if other == "fedlora" else None, r["partition"], r["epochs"],
                       r["rank"] if other == "fedlora" else 4, r["blocks"] if other == "fedlora" else "lower")
                ref = index.get(key)
                common = sorted(set(seeds) & set(ref["seeds"])) if ref else []
                diffs = [seeds[s]["faa"] - ref["seeds"][s]["faa"] for s in common]
                row[name], row[f"{name}_std"] = _mean_std(diffs) if diffs else (None, None)
                row[f"{name}_seeds"] = len(diffs)
                if other == "fedlora" and ref:  # what averaging the factors loses on fedlora's own trajectory
                    row["fedlora_agg_loss_mean"] = np.mean([ref["seeds"][s]["agg_loss_mean"] for s in common])
        rows.append(row)
    return rows


def _pct(mean: float | None, std: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return text + (f" ± {100 * std:.1f}" if std is not None and not math.isnan(std) else "")


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.2g}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | LoRA lr | partition | epochs | rank | blocks | F_AA % | AIA % | forgetting % | agg. loss "
             "(mean / max round) | residual gain (pp) | LoRA gain over head-only (pp) | downlink MB | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "–" if r["agg_loss_mean"] is None else f"{_sci(r['agg_loss_mean'])} / {_sci(r['agg_loss_max'])}"
        lr = "–" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(
            f"| {r['method']} | {lr} | {r['partition']} | {r['epochs']} | "
            f"{r['rank'] if r['method'] != 'head-only' else '–'} | {r['blocks'] if r['method'] != 'head-only' else '–'} | "
            f"{_pct(r['faa'], r['faa_std'])} | {_pct(r['aia'], r['aia_std'])} | {_pct(r['forgetting'])} | {loss} | "
            f"{_pct(r.get('residual_gain'), r.get('residual_gain_std'), signed=True)} | "
            f"{_pct(r.get('lora_gain'), r.get('lora_gain_std'), signed=True)} | {r['downlink_mb']:.1f} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def plots(results: dict[str, list[dict[str, Any]]], images: Path, stem: str = "study_reswu") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    paths = []
    # 1. the residual's gain against the aggregation loss it repairs (every fedtalora cell, both benchmarks)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, rows), marker in zip(results.items(), "os", strict=False):
        pts = [(r["fedlora_agg_loss_mean"], r["residual_gain"], r["residual_gain_std"]) for r in rows
               if r["method"] == "fedtalora" and r.get("residual_gain") is not None]
        if pts:
            x, y, e = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
            ax.errorbar(x, 100 * y, yerr=100 * np.nan_to_num(e), fmt=marker, capsize=2, alpha=0.8,
                        label=BENCHMARKS[name]["title"])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("aggregation loss of naive averaging (mean over rounds, fedlora runs)")
    ax.set_ylabel("residual gain: F_AA fedtalora - fedlora (pp)")
    ax.set_title("Residual gain vs measured aggregation loss (mean ± std over 3 seeds)")
    ax.legend()
    fig.tight_layout()
    paths.append(images / f"{stem}_gain_vs_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 2. F_AA against the LoRA learning rate per method (core cells: rank 4, lower blocks)
    for name, rows in results.items():
        rank = BENCHMARKS[name].get("lr_only", {}).get("rank", 4)
        settings = list(dict.fromkeys((r["partition"], r["epochs"]) for r in rows if r["method"] == "fedtalora"
                                      and r["rank"] == rank and r["blocks"] == "lower"))
        if not settings:
            continue
        fig, axes = plt.subplots(1, len(settings), figsize=(3.3 * len(settings) + 0.6, 3.4), sharey=True,
                                 squeeze=False)
        for ax, (part, epochs) in zip(axes[0], settings, strict=True):
            for method, style in (("fedtalora", "-o"), ("fedlora", "--s")):
                pts = sorted((r["lr"], r["faa"], r["faa_std"]) for r in rows if r["method"] == method and
                             r["partition"] == part and r["epochs"] == epochs and r["rank"] == rank
                             and r["blocks"] == "lower")
                if pts:
                    x, y, e = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
                    ax.errorbar(x, 100 * y, yerr=100 * np.nan_to_num(e), fmt=style, capsize=2, label=method)
            ho = [r for r in rows if r["method"] == "head-only" and r["partition"] == part and r["epochs"] == epochs]
            if ho:
                ax.axhline(100 * ho[0]["faa"], color="gray", ls=":", label="head-only")
            ax.set_xscale("log")
            ax.set_xlabel("LoRA learning rate")
            ax.set_title(f"{part}, {epochs} local epoch{'s' if epochs > 1 else ''}")
        axes[0][0].set_ylabel("F_AA (%)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{BENCHMARKS[name]['title']}: F_AA vs LoRA rate (mean ± std, 3 seeds)")
        fig.tight_layout()
        paths.append(images / f"{stem}_faa_vs_lr_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def report(results: dict[str, list[dict[str, Any]]], out: Path, images: Path, meta: dict[str, Any],
           stem: str = "study_reswu", raw: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    lines = ["# Study: where does the residual pay off?", "",
             f"`python benchmarks/study_reswu.py {meta['args']}` — {meta['when']}, {meta['machine']}; "
             f"{meta['runs']} runs, {meta['hours']:.2f} h of run time.", "",
             "Aggregation loss: `|s·B̄Ā − Σ p_k s·B_k A_k|_F / |Σ p_k s·B_k A_k|_F` of the worst layer, per round, "
             "measured on each run's own trajectory (fedtalora runs: what naive averaging *would* lose; the "
             "residual repairs it to ~1e-7). Gains are paired by seed (same data subset, class order, partition "
             "and initialisation), in percentage points of F_AA; ± is the sample std over seeds.", ""]
    for name, rows in results.items():
        lines += [f"## {BENCHMARKS[name]['title']}", "", table(rows), ""]
    for p in plots(results, images, stem):
        rel = os.path.relpath(p.resolve(), out.resolve())
        lines += [f"![{p.stem}]({rel})", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "cells": results, "runs": raw or {}}, indent=1,
                                                         default=float))
    return path


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _progress(spec: Any, i: int, n: int) -> None:
    logger.info("[%d/%d] %s seed %d: %s (%.0f s)%s", i + 1, n, spec.setting.label, spec.seed, spec.status,
                spec.seconds, f": {spec.error}" if spec.error else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder holding banking77/ and omniglot-small/")
    ap.add_argument("--out", type=Path, default=Path("runs/study-reswu"), help="sweep folders and the pre-trained ViT")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                    help="runs at once (one torch thread each)")
    ap.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only this benchmark")
    ap.add_argument("--pretrain-only", action="store_true", help="only pre-train the small ViT")
    ap.add_argument("--report-only", action="store_true", help="analyse what has run; run nothing")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where study_reswu.md/.json go")
    ap.add_argument("--images", type=Path, default=IMAGES, help="where the plots go")
    ap.add_argument("--name", default="study_reswu", help="file stem of the report and the plots")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="LoRA learning rates of the grid (default: each benchmark's own)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of every cell")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("fedtalora").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedtalora.app.sweep import load_grid, run_sweep

    names = args.only or ["image", "text"]
    t0 = time.perf_counter()
    checkpoint = None
    if "image" in names and not args.report_only:
        checkpoint = pretrain_vit(args.data / "omniglot-small", args.out)
        if args.pretrain_only:
            return 0
    elif "image" in names:
        checkpoint = args.out / "omniglot-vit-pretrained-seed0.safetensors"
    results, runs, seconds = {}, 0, 0.0
    raw: dict[str, list[dict[str, Any]]] = {}
    lrs = tuple(args.lrs) if args.lrs else None
    for name in names:
        grid = load_grid(str(write_grid(name, args.out, args.data, checkpoint if name == "image" else None, args.set,
                                         lrs, tuple(args.seeds))))
        if not args.report_only:
            for seed in grid.seeds:  # seed by seed: an interrupted study has every cell at the first seeds
                run_sweep(dataclasses.replace(grid, seeds=(seed,)), workers=args.workers, on_run=_progress)
            run_sweep(grid)  # all runs complete (skipped): writes the sweep's summaries over every seed
        records = collect(grid, BENCHMARKS[name], lrs)
        raw[name] = records
        runs += sum(len(r["seeds"]) for r in records)
        seconds += sum(s["seconds"] for r in records for s in r["seeds"].values())
        results[name] = analyse(records)
    import platform

    meta = {"args": " ".join(sys.argv[1:] if argv is None else argv), "when": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} workers",
            "runs": runs, "hours": seconds / 3600, "wall_hours": (time.perf_counter() - t0) / 3600}
    path = report(results, args.results, args.images, meta, args.name, raw)
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
