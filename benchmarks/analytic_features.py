"""The analytic (ridge) classifier on frozen all-MiniLM-L6-v2 features of Banking77: defaults chosen on validation data.

Everything here runs on cached frozen features (no LoRA): the pooled features of the whole Banking77 train
and test splits under the pre-trained backbone of the ``banking77`` preset, computed once with the
project's own model and feature extraction and stored as ``.npz`` under ``--cache``.

1. **Validation split**: 20 % of the training split, stratified by class and drawn from the seed
   (``numpy_rng(seed, "analytic-val")``); every choice below is made on it, never on test data.
2. **Settings**: ridge on the raw features (384 dims) and on a fixed random ReLU projection to
   ``M`` dims (RanPAC-style, :func:`fedtalora.core.analytic.random_projection`), fit on the other 80 %. For every
   lambda of :data:`fedtalora.core.analytic.RIDGE_GRID` (relative to ``tr(G) / M``): validation accuracy and
   squared error, and the GCV of the fit statistics. Three ways to pick lambda are compared: best
   validation accuracy (the reference), best validation squared error, and GCV on the training sums
   alone (what ``classifier.ridge=auto`` does). Nearest class mean and a joint multinomial logistic
   regression (scikit-learn, ``C`` chosen on validation) are the references.
3. **Test**: the chosen setting (the cheapest within one standard error of the best validation accuracy), refit on the whole training split
   (train + validation sums), then scored on the test split once; the other settings' test accuracies
   are listed too, marked as not used for any choice.
4. **Federated class-incremental**: the chosen projection, 7 tasks x 11 intents in the preset's class
   order, 10 clients, Dirichlet(0.1) and quantity(alpha=2) partitions drawn exactly as a run draws them
   (``Experiment.build``): per client and task the statistics :func:`~fedtalora.core.analytic.ridge_statistics`,
   summed on the "server", solved after every task with ``ridge=auto`` and with the fixed lambda chosen
   on validation. The centralized class-incremental run (one client) and the joint fit must give the
   same ``W`` and predictions; the script checks it numerically and reports the largest difference.
   Uplink: bytes per client per task (:func:`~fedtalora.core.analytic.statistics_nbytes`).

    python benchmarks/analytic_features.py --data ../shared/data/banking77
    python benchmarks/analytic_features.py --data ../shared/data/banking77 --dims 0 1000 2000   # fewer settings

Needs ``pip install -e ".[text]"`` (MiniLM) and scikit-learn (for the logistic-regression ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtalora.config import RunConfig, resolve
from fedtalora.core.analytic import (
    RIDGE_GRID,
    RidgeStatistics,
    project,
    random_projection,
    ridge_scores,
    ridge_statistics,
    select_ridge,
    solve_ridge,
    statistics_nbytes,
    sum_statistics,
)
from fedtalora.core.metrics import summarize
from fedtalora.seeding import numpy_rng

RESULTS = Path(__file__).resolve().parent / "results"


# --- features ----------------------------------------------------------------------------------------


def cached_features(cfg: RunConfig, cache: Path) -> dict[str, np.ndarray]:
    """Frozen pooled features of the whole train and test splits, head-position targets, task structure."""
    path = cache / f"banking77-minilm-seed{cfg.seed}.npz"
    if not path.is_file():
        from fedtalora.api import prepare
        from fedtalora.fed.client import extract_features

        setup = prepare(cfg)
        exp = setup.exp
        feats = {split: extract_features(setup.model, getattr(exp.dataset, split),
                                         np.arange(len(getattr(exp.dataset, split).labels)),
                                         transform=setup.transform, batch_size=256, device=setup.device).numpy()
                 for split in ("train", "test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, xtr=feats["train"], xte=feats["test"], ytr=exp.train_targets, yte=exp.test_targets,
                 test_task=exp.test_task, offsets=np.array([t.label_offset for t in exp.scenario.tasks]),
                 sizes=np.array([len(t.classes) for t in exp.scenario.tasks]))
    z = np.load(path)
    return {k: z[k] for k in z.files}


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a validation split: ``round(fraction * n_c)`` samples of every class ``c``."""
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.choice(idx, int(round(fraction * len(idx))), replace=False)] = True
    return val


def _acc(scores: torch.Tensor, y: np.ndarray) -> float:
    return float((scores.argmax(1).cpu().numpy() == y).mean())


# --- 2. settings on the validation split ---------------------------------------------------------------


def sweep_setting(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, dim: int,
                  num_classes: int, seed: int) -> dict[str, Any]:
    """Validation accuracy / squared error of every lambda of the grid, GCV of the fit statistics."""
    t0 = time.perf_counter()
    proj = random_projection(x_fit.shape[1], dim, seed)
    phi_fit, phi_val = project(torch.tensor(x_fit), proj), project(torch.tensor(x_val), proj)
    stats = ridge_statistics(phi_fit, torch.tensor(y_fit), num_classes)
    del phi_fit
    e, v = torch.linalg.eigh(stats.gram)
    sel = select_ridge(stats, eig=(e, v))  # GCV on the fit sums: what ridge=auto would choose
    q = v.T @ stats.corr
    onehot = torch.nn.functional.one_hot(torch.tensor(y_val), num_classes).double()
    accs, mses = [], []
    for rel in RIDGE_GRID:
        w = v @ (q / (e.clamp_min(0) + rel * sel.scale).unsqueeze(1))
        s = phi_val @ w
        accs.append(_acc(s, y_val))
        mses.append(float(((s - onehot) ** 2).sum(1).mean()))
    best_acc = max(range(len(accs)), key=lambda i: (accs[i], i))  # ties: the larger lambda
    best_mse = min(range(len(mses)), key=lambda i: (mses[i], -i))
    gcv_i = RIDGE_GRID.index(sel.relative)
    return {
        "dim": dim, "features": dim or x_fit.shape[1], "grid": list(RIDGE_GRID), "val_accuracy": accs,
        "val_sq_error": mses, "gcv": list(sel.gcv),
        "by_val_accuracy": {"relative_lambda": RIDGE_GRID[best_acc], "val_accuracy": accs[best_acc]},
        "by_val_sq_error": {"relative_lambda": RIDGE_GRID[best_mse], "val_accuracy": accs[best_mse]},
        "by_gcv": {"relative_lambda": sel.relative, "val_accuracy": accs[gcv_i]},
        "seconds": time.perf_counter() - t0,
    }


def score_on_test(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, dim: int, num_classes: int,
                 seed: int, relative: float) -> dict[str, Any]:
    """Refit on the whole training split with the validation-chosen relative lambda, and with GCV (auto)."""
    t0 = time.perf_counter()
    proj = random_projection(x_tr.shape[1], dim, seed)
    stats = ridge_statistics(project(torch.tensor(x_tr), proj), torch.tensor(y_tr), num_classes)
    phi_te = project(torch.tensor(x_te), proj)
    scale = float(torch.diagonal(stats.gram).sum()) / stats.dim
    known = stats.counts > 0
    fixed = _acc(ridge_scores(phi_te, solve_ridge(stats.gram, stats.corr, relative * scale), known), y_te)
    sel = select_ridge(stats)
    auto = _acc(ridge_scores(phi_te, solve_ridge(stats.gram, stats.corr, sel.lam), known), y_te)
    return {"test_accuracy": fixed, "test_accuracy_auto": auto, "auto_relative_lambda": sel.relative,
            "absolute_lambda": relative * scale, "seconds": time.perf_counter() - t0}


def nearest_class_mean(x_fit: np.ndarray, y_fit: np.ndarray, x_ev: np.ndarray, y_ev: np.ndarray, c: int) -> float:
    means = np.stack([x_fit[y_fit == k].mean(0) for k in range(c)])
    a = x_ev / np.linalg.norm(x_ev, axis=1, keepdims=True)
    b = means / np.linalg.norm(means, axis=1, keepdims=True)
    return float(((a @ b.T).argmax(1) == y_ev).mean())


def logistic(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, x_tr: np.ndarray,
             y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> dict[str, Any]:
    """Joint multinomial logistic regression on standardized raw features; C chosen on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    grid = [0.01, 0.1, 1.0, 10.0]
    val = {}
    for c in grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        val[c] = float(clf.fit(x_fit, y_fit).score(x_val, y_val))
    best = max(grid, key=lambda c: (val[c], -c))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=2000))
    test = float(clf.fit(x_tr, y_tr).score(x_te, y_te))
    return {"grid": grid, "val_accuracy": [val[c] for c in grid], "C": best, "best_val_accuracy": val[best],
            "test_accuracy": test, "seconds": time.perf_counter() - t0}


# --- 4. federated class-incremental ---------------------------------------------------------------------


def class_incremental(f: dict[str, np.ndarray], partitions: list[list[np.ndarray]] | None, dim: int, seed: int,
                      ridge: float | str) -> dict[str, Any]:
    """Per task: each client's statistics of its task data, summed; solve; evaluate on the seen classes.
    ``partitions=None``: one client holding each task's whole data (the centralized run)."""
    proj = random_projection(f["xtr"].shape[1], dim, seed)
    phi_tr = project(torch.tensor(f["xtr"]), proj)
    phi_te = project(torch.tensor(f["xte"]), proj)
    ytr, yte, test_task = f["ytr"], f["yte"], f["test_task"]
    num_classes = int(f["offsets"][-1] + f["sizes"][-1])
    total: RidgeStatistics | None = None
    rows, sizes, weights, preds, nbytes, lams = [], [], [], [], [], []
    for t, (lo, n) in enumerate(zip(f["offsets"], f["sizes"], strict=True)):
        lo, n = int(lo), int(n)
        task_idx = np.flatnonzero((ytr >= lo) & (ytr < lo + n))
        parts = [task_idx] if partitions is None else partitions[t]
        for part in parts:
            s = ridge_statistics(phi_tr[torch.as_tensor(part)], torch.as_tensor(ytr[part]), n, offset=lo)
            if s.num_samples == 0:
                continue
            nbytes.append(statistics_nbytes(s.dim, int((s.counts > 0).sum())))
            full = RidgeStatistics(gram=s.gram, corr=torch.zeros(s.dim, num_classes, dtype=torch.float64),
                                   counts=torch.zeros(num_classes, dtype=torch.int64))
            full.corr[:, lo:lo + n] = s.corr
            full.counts[lo:lo + n] = s.counts
            total = full if total is None else sum_statistics([total, full])
        assert total is not None
        lam = select_ridge(total).lam if ridge == "auto" else float(ridge)
        w = solve_ridge(total.gram, total.corr, lam)
        pred = ridge_scores(phi_te, w, total.counts > 0)[:, :lo + n].argmax(1).numpy()
        rows.append([float((pred[test_task == j] == yte[test_task == j]).mean()) for j in range(t + 1)])
        sizes.append(int((test_task == t).sum()))
        weights.append(w)
        preds.append(pred)
        lams.append(lam)
    T = len(rows)
    summary = summarize([r + [None] * (T - len(r)) for r in rows], sizes)
    return {"F_AA": summary["final_average_accuracy"], "AIA": summary["average_incremental_accuracy"],
            "forgetting": summary["forgetting"], "weights": weights, "preds": preds, "lambdas": lams,
            "uplink_bytes_per_client_task": float(np.mean(nbytes)), "uploads": len(nbytes)}


def federated(f: dict[str, np.ndarray], args: argparse.Namespace, dim: int, fixed_lambda: float) -> list[dict[str, Any]]:
    from fedtalora.fed.build import Experiment

    out = []
    for ridge in ("auto", fixed_lambda):
        central = class_incremental(f, None, dim, args.seed, ridge)
        joint_stats = ridge_statistics(project(torch.tensor(f["xtr"]), random_projection(f["xtr"].shape[1], dim,
                                                                                          args.seed)),
                                       torch.tensor(f["ytr"]), int(f["offsets"][-1] + f["sizes"][-1]))
        lam_joint = select_ridge(joint_stats).lam if ridge == "auto" else float(ridge)
        w_joint = solve_ridge(joint_stats.gram, joint_stats.corr, lam_joint)
        rows = [{"partition": "centralized (1 client)", "ridge": ridge, **_public(central),
                 "rel_dW_vs_joint": _rel(central["weights"][-1], w_joint)}]
        for name, over in (("dirichlet 0.1, 10 clients", ["partition.kind=dirichlet", "partition.beta=0.1"]),
                           ("quantity alpha=2, 10 clients", ["partition.kind=quantity", "partition.alpha=2"])):
            cfg = resolve("banking77", [f"data.root={args.data}", f"seed={args.seed}", "fed.num_clients=10", *over])
            exp = Experiment.build(cfg)
            assert np.array_equal(exp.train_targets, f["ytr"]), "cached features are of another class order"
            fed = class_incremental(f, exp.partitions, dim, args.seed, ridge)
            dw = max(float((a - b).abs().max() / b.abs().max())
                     for a, b in zip(fed["weights"], central["weights"], strict=True))
            same = all(np.array_equal(a, b) for a, b in zip(fed["preds"], central["preds"], strict=True))
            rows.append({"partition": name, "ridge": ridge, **_public(fed), "rel_dW_vs_centralized": dw,
                         "predictions_equal_centralized": same,
                         "rel_dW_vs_joint": _rel(fed["weights"][-1], w_joint)})
        for r in rows:
            print(json.dumps(r), flush=True)
        out += rows
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max())


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("weights", "preds")}


# --- report ------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def write_report(res: dict[str, Any], path: Path) -> None:
    a = res["args"]
    lines = [
        "# The analytic classifier on frozen all-MiniLM-L6-v2 features of Banking77",
        "",
        "Every hyper-parameter here (the projection dimension `M`, lambda, the logistic regression's `C`) was "
        "chosen on a **validation split**: 20 % of the Banking77 training split, stratified by class, drawn from "
        f"the seed; the models compared on it were fit on the other 80 %. The test split was used only to report "
        f"the chosen settings after the choice. Features: the frozen pre-trained backbone of the `banking77` preset "
        f"(mean-pooled all-MiniLM-L6-v2, 384 dims, max_length 64), seed {a['seed']} (class order, validation "
        f"split, projection). One seed: with about 2,000 validation samples at 90 % accuracy the binomial standard "
        f"error of a validation accuracy is about 0.7 points. Machine: {res['machine']}; timings are of a "
        f"shared machine and only indicative. Command: `{res['command']}`; code at commit {res['commit']}.",
        "",
        "## 1. Settings on the validation split",
        "",
        "Lambda is relative to the mean eigenvalue of the fit statistics, `lambda = s * tr(G) / M`, "
        "`s` in 10^-6 .. 10^2 (2 per decade). Val acc. at the lambda chosen by each criterion:",
        "",
        "| features | dims | best val acc. % (s) | val sq. error choice % (s) | GCV on the sums (`auto`) % (s) "
        "| uplink MB / client / task | s (fit + sweep) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["settings"]:
        name = "raw" if r["dim"] == 0 else f"random ReLU, M={r['dim']}"
        lines.append(
            f"| {name} | {r['features']} | {_pct(r['by_val_accuracy']['val_accuracy'])} "
            f"({r['by_val_accuracy']['relative_lambda']:.0e}) | {_pct(r['by_val_sq_error']['val_accuracy'])} "
            f"({r['by_val_sq_error']['relative_lambda']:.0e}) | {_pct(r['by_gcv']['val_accuracy'])} "
            f"({r['by_gcv']['relative_lambda']:.0e}) | {_mb(r['uplink_bytes_dirichlet'])} | {r['seconds']:.0f} |")
    ncm, lr = res["ncm"], res["logistic"]
    lines += [
        f"| nearest class mean (cosine) | 384 | {_pct(ncm['val_accuracy'])} | | | | |",
        f"| joint logistic regression (standardized, C={lr['C']:g}) | 384 | {_pct(lr['best_val_accuracy'])} | | | | "
        f"{lr['seconds']:.0f} |",
        "",
        "Uplink: one client's upload for one task, `M (M + 1) / 2` float64 numbers for the upper triangle of `G`, "
        "`M` per class it holds for `C` and a count per class, averaged over the 70 uploads of the Dirichlet(0.1), "
        "10-client partition (a client holds few classes of a task, so `G` dominates).",
        "",
        f"**Chosen: {res['chosen']['name']}, s = {res['chosen']['relative_lambda']:.0e}** (validation accuracy "
        f"{_pct(res['chosen']['val_accuracy'])} %). The rule, fixed before the sweep: the setting with the fewest "
        f"uplink bytes whose validation accuracy (lambda chosen on validation) is within one binomial standard "
        f"error ({_pct(res['chosen']['se'])} points) of the best ({_pct(res['chosen']['best_val_accuracy'])} %): "
        "the uplink grows with `M^2`, and differences under one standard error are not resolved by this split.",
        "",
        "## 2. Test accuracy (reported after the choice)",
        "",
        "Each setting refit on the whole training split (fit + validation sums) with its validation-chosen `s`, "
        "and with `ridge=auto` (GCV on the whole training split's sums). These numbers were computed after the "
        "choice; the rows other than the chosen one are for reference and informed nothing.",
        "",
        "| features | test acc. %, s from validation | test acc. %, `ridge=auto` (s) |",
        "|---|---|---|",
    ]
    for r in res["settings"]:
        name = "raw" if r["dim"] == 0 else f"random ReLU, M={r['dim']}"
        mark = " **(chosen)**" if r["dim"] == res["chosen"]["dim"] else ""
        t = r["test"]
        lines.append(f"| {name}{mark} | {_pct(t['test_accuracy'])} | {_pct(t['test_accuracy_auto'])} "
                     f"({t['auto_relative_lambda']:.0e}) |")
    lines += [
        f"| nearest class mean (cosine) | {_pct(ncm['test_accuracy'])} | |",
        f"| joint logistic regression (the ceiling) | {_pct(lr['test_accuracy'])} | |",
        "",
        "## 3. Federated class-incremental = centralized",
        "",
        f"{res['chosen']['name']}; 7 tasks x 11 intents (the preset's class order), each client's statistics of its "
        "data of the task summed by the server, solved after every task for all intents seen; test accuracy over "
        "the seen intents. Partitions drawn as a run draws them. `fixed` is the absolute lambda "
        f"{res['fixed_lambda']:.4g} (`s` from validation times `tr(G)/M` of the whole training split).",
        "",
        "| partition | ridge | F_AA % | AIA % | forgetting % | dW vs centralized | same predictions "
        "| dW vs joint fit | uplink MB / client / task |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["federated"]:
        ridge = "auto" if r["ridge"] == "auto" else "fixed"
        dw = r.get("rel_dW_vs_centralized")
        lines.append(
            f"| {r['partition']} | {ridge} | {_pct(r['F_AA'])} | {_pct(r['AIA'])} | {_pct(r['forgetting'])} "
            f"| {'—' if dw is None else f'{dw:.1e}'} | {r.get('predictions_equal_centralized', '—')} "
            f"| {r['rel_dW_vs_joint']:.1e} | {_mb(r['uplink_bytes_per_client_task'])} |")
    lines += [
        "",
        "`dW`: the largest entry-wise difference between the weight matrices, relative to the largest entry, "
        "over the tasks (float64 rounding of differently ordered sums); `same predictions`: every test prediction after every task "
        "identical. The last task's `W` is the joint fit on all 77 intents at once (`vs joint fit`), so the "
        "class-incremental federated F_AA is the joint ridge's test accuracy.",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("BANKING77", "../shared/data/banking77"))
    ap.add_argument("--cache", default="/tmp/analytic", help="folder of the cached features (.npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dims", type=int, nargs="*", default=[0, 1000, 2000, 4000, 8000])
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--out", default=str(RESULTS / "analytic_features.md"))
    args = ap.parse_args()

    cfg = resolve("banking77", [f"data.root={args.data}", f"seed={args.seed}", "train.device=cpu"])
    f = cached_features(cfg, Path(args.cache))
    x, y, xte, yte = f["xtr"].astype(np.float64), f["ytr"], f["xte"].astype(np.float64), f["yte"]
    c = int(f["offsets"][-1] + f["sizes"][-1])
    val = stratified_split(y, args.val_fraction, numpy_rng(args.seed, "analytic-val"))

    from fedtalora.fed.build import Experiment

    exp = Experiment.build(resolve("banking77", [f"data.root={args.data}", f"seed={args.seed}", "fed.num_clients=10"]))
    held = [int(len(np.unique(y[p]))) for parts in exp.partitions for p in parts if len(p)]

    settings = []
    for dim in args.dims:
        r = sweep_setting(x[~val], y[~val], x[val], y[val], dim, c, args.seed)
        r["uplink_bytes_dirichlet"] = float(np.mean([statistics_nbytes(r["features"], h) for h in held]))
        print(json.dumps({k: r[k] for k in ("dim", "by_val_accuracy", "by_val_sq_error", "by_gcv", "seconds")}),
              flush=True)
        settings.append(r)
    # the rule, fixed before looking: the cheapest setting (fewest uplink bytes) within one binomial standard
    # error of the best validation accuracy -- larger M costs M^2 bytes for gains the split cannot resolve
    top = max(r["by_val_accuracy"]["val_accuracy"] for r in settings)
    se = float(np.sqrt(top * (1 - top) / int(val.sum())))
    best = min((r for r in settings if r["by_val_accuracy"]["val_accuracy"] >= top - se),
               key=lambda r: r["uplink_bytes_dirichlet"])
    chosen = {"dim": best["dim"], "relative_lambda": best["by_val_accuracy"]["relative_lambda"], "se": se,
              "best_val_accuracy": top, "val_accuracy": best["by_val_accuracy"]["val_accuracy"],
              "name": "raw features" if best["dim"] == 0 else f"random ReLU projection, M={best['dim']}"}
    for r in settings:  # test, after the choice
        r["test"] = score_on_test(x, y, xte, yte, r["dim"], c, args.seed, r["by_val_accuracy"]["relative_lambda"])
        print(json.dumps({"dim": r["dim"], **r["test"]}), flush=True)
    ncm = {"val_accuracy": nearest_class_mean(x[~val], y[~val], x[val], y[val], c),
           "test_accuracy": nearest_class_mean(x, y, xte, yte, c)}
    lr = logistic(x[~val], y[~val], x[val], y[val], x, y, xte, yte)
    print(json.dumps({"ncm": ncm, "logistic": lr}), flush=True)

    proj = random_projection(x.shape[1], chosen["dim"], args.seed)
    full = ridge_statistics(project(torch.tensor(x), proj), torch.tensor(y), c)
    fixed_lambda = chosen["relative_lambda"] * float(torch.diagonal(full.gram).sum()) / full.dim
    del full
    fed = federated(f, args, chosen["dim"], fixed_lambda)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res = {"args": vars(args), "settings": settings, "chosen": chosen, "ncm": ncm, "logistic": lr,
           "fixed_lambda": fixed_lambda, "federated": fed, "commit": commit,
           "machine": f"{os.cpu_count()} CPU threads ({platform.machine()}), torch {torch.__version__}",
           "command": "python benchmarks/analytic_features.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_report(res, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
