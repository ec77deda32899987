"""Linear datamodeling score (LDS, Park et al. 2023) of influence scores on a small MLP (digits).

A tanh MLP 64-32-10 on scikit-learn's digits (standardised; ``n_train`` random training examples,
``n_test`` test queries), float64, trained full-batch with L-BFGS to a gradient below 1e-7 on
``mean cross-entropy + (l2/2) ||theta||^2``. Influence scores come from the model trained on all of
the training set (seed 0). For LDS, ``--subsets`` random half-size subsets (alpha = 0.5) are each
retrained from scratch with ``--seeds`` initialisations (same recipe: mean loss over the subset +
the same l2); the actual output is the query's cross-entropy, averaged over seeds. The prediction
for a subset is ``sum over removed j of scores[q, j]`` (the removal-calibrated scores); LDS is the
Spearman correlation across subsets, averaged over queries (:func:`soulkit.influence.lds`).

Reported per ``l2`` and solver: LDS, the solver's residual/diagnostics, and time relative to the
``exact`` solver in the same run (one run each; indicative). Also reported: the seed-to-seed
agreement of the retrained outputs (Spearman across subsets between two single-seed retrains), a
rough ceiling for any attribution method on this noise level.

    python benchmarks/influence_lds.py [--l2 1e-3 1e-2] [--subsets 50] [--seeds 3] [--n-train 600]

Writes benchmarks/results/influence_lds.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _timing import time_result  # noqa: E402

from soulkit.influence import (  # noqa: E402
    ArnoldiSolver,
    CGSolver,
    ConvergenceWarning,
    DiagonalSolver,
    InfluenceAnalyzer,
    LissaSolver,
    OutputLoss,
    lds,
)

RESULTS = Path(__file__).resolve().parent / "results"
DT = torch.float64
LOSS = OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))


def configs() -> dict:
    """name -> InfluenceAnalyzer keyword arguments."""
    gn = {"curvature": "gauss_newton"}
    return {
        "exact (GN)": {"solver": "exact", **gn},
        "exact (GN), newton": {"solver": "exact", "loo": "newton", **gn},
        "exact (Hessian)": {"solver": "exact"},
        "cg (GN)": {"solver": CGSolver(tol=1e-6, max_iter=2000, on_fail="warn"), **gn},
        "lissa (GN, depth <= 2000)": {"solver": LissaSolver(tol=1e-6, depth=2000, on_fail="warn"), **gn},
        "arnoldi (GN, rank 100)": {"solver": ArnoldiSolver(rank=100, n_iter=200), **gn},
        "diagonal (GN, exact diag)": {"solver": DiagonalSolver(method="exact"), **gn},
        "diagonal (GNB, 50 samples)": {"solver": DiagonalSolver(method="gnb", n_samples=50), **gn},
        "identity (grad dot)": {"solver": "identity"},
    }


def data(n_train: int, n_test: int):
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    Xs = torch.tensor((X - mu) / sd, dtype=DT)
    yt = torch.tensor(y)
    return Xs[tr], yt[tr], Xs[te], yt[te]


def make(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(DT)


def train(x, t, seed: int, l2: float, hidden: int):
    m = make(seed, hidden)
    opt = torch.optim.LBFGS(
        m.parameters(), lr=1, max_iter=3000, tolerance_grad=1e-7, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), t) + 0.5 * l2 * sum((p**2).sum() for p in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    gmax = float(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).abs().max())
    m.zero_grad(set_to_none=True)
    return m.eval(), gmax


def query_losses(m, xq, yq) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(m(xq), yq, reduction="none").numpy()


def subset_masks(n: int, subsets: int, seed: int = 0) -> np.ndarray:
    """``[subsets, n]`` boolean masks of random half-size subsets (alpha = 0.5)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        masks[s, rng.choice(n, n // 2, replace=False)] = True
    return masks


def retrain_subsets(masks: np.ndarray, seeds: int, l2: float, hidden: int, xtr, ytr, xte, yte):
    """Retrain on every subset with ``seeds`` initialisations: (query losses ``[seeds, S, m]``, worst |grad|)."""
    t0 = time.perf_counter()
    per_seed = np.zeros((seeds, len(masks), len(yte)))
    worst = 0.0
    for s, mask in enumerate(masks):
        idx = torch.from_numpy(np.flatnonzero(mask))
        for seed in range(seeds):
            m, g = train(xtr[idx], ytr[idx], 1000 + 97 * s + seed, l2, hidden)
            worst = max(worst, g)
            per_seed[seed, s] = query_losses(m, xte, yte)
        if (s + 1) % 10 == 0:
            print(f"[l2={l2:g}] retrained {s + 1}/{len(masks)} subsets x {seeds} seeds "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    return per_seed, worst


def run_l2(l2: float, masks: np.ndarray, args, xtr, ytr, xte, yte) -> dict:
    n = len(ytr)
    print(f"[l2={l2:g}] training the full model ...", flush=True)
    full, gfull = train(xtr, ytr, 0, l2, args.hidden)
    acc = float((full(xte).argmax(1) == yte).double().mean())
    # actual outputs of the subset models
    t0 = time.perf_counter()
    per_seed, worst = retrain_subsets(masks, args.seeds, l2, args.hidden, xtr, ytr, xte, yte)
    t_retrain = time.perf_counter() - t0
    actual = per_seed.mean(0)  # [S, m]
    seed_agree = (
        float(np.nanmean([stats.spearmanr(per_seed[0, :, q], per_seed[1, :, q])[0] for q in range(len(yte))]))
        if args.seeds > 1
        else None
    )

    train_ds, test_ds = TensorDataset(xtr, ytr), TensorDataset(xte, yte)
    InfluenceAnalyzer(full, LOSS, solver="identity", progress=False).fit(train_ds).scores(
        train_ds, test_ds
    )  # warm-up
    rows, t_exact = {}, None
    for name, kw in configs().items():

        def solve(kw: dict = kw) -> dict:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    an = InfluenceAnalyzer(full, LOSS, l2=l2, batch_size=n, progress=False, **kw).fit(train_ds)
                    sc = an.scores(train_ds, test_ds).numpy()
                res = lds(sc, masks, actual)
                row = {"lds": res.lds, "lds_per_query_median": float(np.median(res.per_query))}
                row["warnings"] = [
                    str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)
                ]
                row["solver_info"] = {k: v for k, v in an.solver.info.items() if k != "eigenvalues"}
                return row
            except Exception as err:  # noqa: BLE001 - recorded in the results, not hidden
                return {"lds": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}

        row, elapsed = time_result(solve)
        if name == "exact (GN)":
            t_exact = elapsed
        row["time_vs_exact_gn"] = elapsed / t_exact if t_exact else None
        rows[name] = row
        shown = f"LDS {row['lds']:.3f}" if row.get("lds") is not None else row.get("error")
        print(f"[l2={l2:g}] {name:28s} {shown} ({elapsed:.1f}s)", flush=True)

    # ensemble: scores averaged over 3 independently trained full models (exact GN)
    def ensemble():
        ens = []
        for seed in range(3):
            m = full if seed == 0 else train(xtr, ytr, seed, l2, args.hidden)[0]
            an = InfluenceAnalyzer(
                m, LOSS, solver="exact", curvature="gauss_newton", l2=l2, batch_size=n, progress=False
            )
            ens.append(an.fit(train_ds).scores(train_ds, test_ds).numpy())
        return lds(np.mean(ens, 0), masks, actual)

    res, elapsed = time_result(ensemble)
    rows["exact (GN), 3-model ensemble"] = {"lds": res.lds, "lds_per_query_median": float(np.median(res.per_query)),
                                            "time_vs_exact_gn": elapsed / t_exact}  # fmt: skip
    print(f"[l2={l2:g}] {'exact (GN), 3-model ensemble':28s} LDS {res.lds:.3f}", flush=True)
    return {
        "l2": l2,
        "test_accuracy": acc,
        "full_model_max_abs_grad": gfull,
        "subset_models_max_abs_grad": worst,
        "retrain_seconds": t_retrain,
        "seed_to_seed_spearman": seed_agree,
        "solvers": rows,
    }


def plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = report["runs"]
    names = list(runs[0]["solvers"])
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        vals = [run["solvers"][k]["lds"] if run["solvers"][k].get("lds") is not None else 0.0 for k in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=f"l2 = {run['l2']:g}")
    ax.axhline(0.45, color="black", ls="--", lw=0.8, label="dattri TRAK-50, MNIST MLP (0.45)")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.set_title(f"LDS on digits MLP, {report['subsets']} half subsets x {report['seeds']} seeds")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(report, RESULTS / "influence_lds.png")
    tmp = RESULTS / "influence_lds.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, RESULTS / "influence_lds.json")
    md = ["# Linear datamodeling score (LDS) on a small MLP (digits)", ""]
    md.append(f"Machine: {machine_line(report['machine'])}. {report['threads']} torch thread(s). Total run time "
              f"{report['seconds'] / 60:.1f} min.")  # fmt: skip
    md += ["", f"Setup: tanh MLP 64-{report['hidden']}-10 ({report['params']} parameters), float64; digits "
           f"(standardised), {report['n_train']} training examples, {report['n_test']} test queries; objective mean "
           "cross-entropy + (l2/2)||theta||^2, full-batch L-BFGS to max |grad| < 1e-7. Scores from the full model "
           f"(seed 0). {report['subsets']} random half-size subsets (alpha = 0.5), each retrained from scratch with "
           f"{report['seeds']} seeds (outputs averaged); output = the query's cross-entropy; predicted = sum of the "
           "removed examples' scores; LDS = Spearman across subsets, mean over queries. Anchors (dattri, MNIST MLP): "
           "CG 0.26, LiSSA 0.14, TRAK-50 0.45; goal > 0.45.", ""]  # fmt: skip
    for run in report["runs"]:
        md += [f"## l2 = {run['l2']:g}", "",
               f"Test accuracy {run['test_accuracy']:.3f}; full model max |grad| {run['full_model_max_abs_grad']:.1e}, "
               f"subset models {run['subset_models_max_abs_grad']:.1e}; retraining {run['retrain_seconds'] / 60:.1f} min. "
               "Seed-to-seed Spearman of single retrains across subsets: "
               + (f"{run['seed_to_seed_spearman']:.3f}." if run["seed_to_seed_spearman"] is not None else "- (one seed)."),
               "",
               "| solver | LDS | LDS median over queries | time vs exact (GN) | notes |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for name, row in run["solvers"].items():
            if row.get("lds") is None:
                md.append(f"| {name} | - | - | - | {row.get('error')} |")
                continue
            info = row.get("solver_info", {})
            notes = []
            if "relative_residual" in info:
                notes.append(f"residual {info['relative_residual']:.1e}, {info.get('iterations')} it.")
            if "scale" in info:
                notes.append(f"scale {info['scale']:.3g}")
            if "ritz_residual" in info:
                notes.append(f"Ritz residual {info['ritz_residual']:.1e}")
            if "condition_number" in info:
                notes.append(f"cond {info['condition_number']:.2g}")
            if row.get("warnings"):
                notes.append("did not converge (warned)")
            tv = row.get("time_vs_exact_gn")
            md.append(f"| {name} | {row['lds']:.3f} | {row['lds_per_query_median']:.3f} | "
                      f"{tv:.2f}x | {'; '.join(notes)} |")  # fmt: skip
        md.append("")
    md += ["Reading. Every solver that converges to `A^{-1}` (exact, CG, LiSSA) gives the same LDS; low-rank "
           "Arnoldi, the diagonal and plain gradient dot products lose 0.1-0.2. The anchors come from a different "
           "task (MNIST, larger MLP, dattri's recipe): this digits setup is easier -- even gradient dot products "
           "(identity) reach 0.58-0.66 and single retrains agree with each other at 0.91-0.94 -- so the numbers here "
           "show the solvers against each other and against that ceiling, not a like-for-like win over dattri. "
           "Larger l2 makes retraining more reproducible and LDS higher. One run per setting (no repeat over "
           "subset draws). Newton-corrected leave-one-out targets single removals; for half-size subsets it does "
           "not help (0.74 / 0.85 vs 0.76 / 0.87).", "",
           "Comparisons with dattri / kronfluence were not run (not installable in this environment).", "",
           "![LDS](influence_lds.png)", ""]  # fmt: skip
    tmp = RESULTS / "influence_lds.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, RESULTS / "influence_lds.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rewrite", action="store_true", help="only rewrite md/png from the existing JSON")
    args = ap.parse_args()
    if args.rewrite:
        write(json.loads((RESULTS / "influence_lds.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = data(args.n_train, args.n_test)
    n = len(ytr)
    masks = subset_masks(n, args.subsets)
    report = {
        "machine": machine_info(), "threads": args.threads, "n_train": n, "n_test": len(yte),
        "hidden": args.hidden, "params": sum(p.numel() for p in make(0, args.hidden).parameters()),
        "subsets": args.subsets, "seeds": args.seeds, "runs": [],
    }  # fmt: skip
    for l2 in args.l2:
        report["runs"].append(run_l2(l2, masks, args, xtr, ytr, xte, yte))
    report["seconds"] = time.perf_counter() - t0
    write(report)
    print(f"wrote {RESULTS / 'influence_lds.md'} ({report['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
