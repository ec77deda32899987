"""Influence scores against actual leave-one-out retraining (L2-regularised logistic regression).

Two problems from scikit-learn's bundled data, in float64: breast_cancer (standardised) and digits
1 vs 7 (standardised; constant pixels stay 0), an 80/20 stratified split, ``l2 = 0.05`` on every
parameter (weights and bias). The objective is ``(1/n) sum_j loss_j + (l2/2) ||theta||^2``; "without
``j``" minimises it with ``j``'s term removed (the regulariser and the ``1/n`` unchanged -- the
convention :class:`soulkit.influence.InfluenceAnalyzer` predicts; a check against the
mean-over-``(n - 1)`` convention is reported too). Training and every leave-one-out retrain use
scipy's L-BFGS (warm start from the full-data optimum, ``gtol = 1e-12``); the largest final gradient
norm is reported.

For each solver and ``loo`` mode the scores ``[n_test, n_train]`` are compared with the actual loss
changes: Pearson/Spearman/slope per test point (median and range) and pooled over all pairs. The
slope is least squares of actual on predicted (1 = calibrated). Times are ratios to the ``exact``
solver's fit+scores in the same run (one run each; indicative only).

    python benchmarks/influence_loo.py [--test-points 0 (all)] [--threads 1]

Writes benchmarks/results/influence_loo.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _timing import time_result  # noqa: E402

from soulkit.influence import (  # noqa: E402
    ArnoldiSolver,
    CGSolver,
    DiagonalSolver,
    InfluenceAnalyzer,
    LissaSolver,
    OutputLoss,
    loo_correlation,
    scatter_panels,
)

RESULTS = Path(__file__).resolve().parent / "results"
L2 = 0.05
LOSS = OutputLoss(
    lambda m, b: m(b[0]).squeeze(-1),
    lambda z, b: F.binary_cross_entropy_with_logits(z, b[1], reduction="none"),
)
GOAL_SOLVERS = ("exact", "cg", "lissa", "arnoldi (full rank)")


def solvers(p: int) -> dict:
    return {
        "exact": "exact",
        "cg": CGSolver(tol=1e-10),
        "lissa": LissaSolver(tol=1e-8, depth=50_000),
        "arnoldi (full rank)": ArnoldiSolver(rank=p, n_iter=p),
        "arnoldi (rank 10)": ArnoldiSolver(rank=10, n_iter=min(p, 40)),
        "diagonal (exact diag)": DiagonalSolver(method="exact"),
        "identity": "identity",
    }


# --------------------------------------------------------------------------------------------- data


def load(name: str):
    if name == "breast_cancer":
        X, y = load_breast_cancer(return_X_y=True)
    elif name == "digits_1_vs_7":
        X, y = load_digits(return_X_y=True)
        keep = (y == 1) | (y == 7)
        X, y = X[keep], (y[keep] == 7).astype(np.float64)
    else:
        raise ValueError(name)
    Xtr, Xte, ytr, yte = train_test_split(X, y.astype(np.float64), test_size=0.2, random_state=0, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0  # constant pixels stay 0 after centring
    return (Xtr - mu) / sd, ytr, (Xte - mu) / sd, yte


# ------------------------------------------------------------------------------------ training (numpy)


def objective(theta, Xa, y, w, l2, denom):
    z = Xa @ theta
    losses = np.logaddexp(0.0, z) - y * z
    s = 1.0 / (1.0 + np.exp(-z))
    f = (w * losses).sum() / denom + 0.5 * l2 * theta @ theta
    g = Xa.T @ (w * (s - y)) / denom + l2 * theta
    return f, g


def lbfgs(theta0, Xa, y, w, l2, denom):
    res = scipy.optimize.minimize(
        objective, theta0, args=(Xa, y, w, l2, denom), jac=True, method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 20_000, "maxcor": 30},
    )  # fmt: skip
    g = objective(res.x, Xa, y, w, l2, denom)[1]
    return res.x, float(np.abs(g).max()), int(res.nit)


def test_losses(theta, Xa_te, yte):
    z = Xa_te @ theta
    return np.logaddexp(0.0, z) - yte * z


def retrain_all(theta, Xa, y, Xa_te, yte, convention: str):
    """[n_test, n_train] actual loss change when each training point is removed."""
    n = len(y)
    base = test_losses(theta, Xa_te, yte)
    out = np.zeros((len(yte), n))
    dtheta = np.zeros((n, len(theta)))
    worst, iters = 0.0, []
    for j in range(n):
        w = np.ones(n)
        w[j] = 0.0
        denom = n if convention == "sum" else n - 1
        th, gmax, nit = lbfgs(theta, Xa, y, w, L2, denom)
        worst = max(worst, gmax)
        iters.append(nit)
        out[:, j] = test_losses(th, Xa_te, yte) - base
        dtheta[j] = th - theta
    return out, dtheta, worst, float(np.median(iters))


# ----------------------------------------------------------------------------------------- benchmark


def stats_of(pred: np.ndarray, actual: np.ndarray) -> dict:
    rows = loo_correlation(pred, actual)
    pooled = loo_correlation(pred.reshape(-1), actual.reshape(-1))
    pear = np.array([r.pearson for r in rows])
    spear = np.array([r.spearman for r in rows])
    slope = np.array([r.slope for r in rows])
    return {
        "pooled": pooled.as_dict(),
        "per_query_pearson_median": float(np.median(pear)),
        "per_query_pearson_min": float(pear.min()),
        "per_query_spearman_median": float(np.median(spear)),
        "per_query_slope_median": float(np.median(slope)),
        "per_query_slope_p10": float(np.percentile(slope, 10)),
        "per_query_slope_p90": float(np.percentile(slope, 90)),
        "per_query_slope_min": float(slope.min()),
        "per_query_slope_max": float(slope.max()),
    }


def run_dataset(name: str, args) -> dict:
    Xtr, ytr, Xte, yte = load(name)
    n, d = Xtr.shape
    Xa = np.hstack([Xtr, np.ones((n, 1))])
    Xa_te = np.hstack([Xte, np.ones((len(yte), 1))])
    theta, gmax, _ = lbfgs(np.zeros(d + 1), Xa, ytr, np.ones(n), L2, n)
    if args.test_points and args.test_points < len(yte):
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(yte), size=args.test_points, replace=False))
        Xte, yte, Xa_te = Xte[pick], yte[pick], Xa_te[pick]
    print(
        f"[{name}] n_train={n} n_test={len(yte)} p={d + 1}; retraining {n} leave-one-out models ...",
        flush=True,
    )
    t0 = time.perf_counter()
    actual, dtheta, worst, med_it = retrain_all(theta, Xa, ytr, Xa_te, yte, "sum")
    t_retrain = time.perf_counter() - t0
    actual_mean, _, worst_mean, _ = retrain_all(theta, Xa, ytr, Xa_te, yte, "mean")
    # the actual parameter change seen through each test gradient: what g_test^T (theta_{-j} - theta) is
    s_te = 1.0 / (1.0 + np.exp(-(Xa_te @ theta)))
    linearised = ((s_te - yte)[:, None] * Xa_te) @ dtheta.T
    print(
        f"[{name}] retraining done in {t_retrain:.1f}s (max |grad| {max(worst, worst_mean):.1e})", flush=True
    )

    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:d])[None])
        model.bias.copy_(torch.from_numpy(theta[d:]))
    dt = torch.float64
    train = TensorDataset(torch.from_numpy(Xtr).to(dt), torch.from_numpy(ytr).to(dt))
    test = TensorDataset(torch.from_numpy(Xte).to(dt), torch.from_numpy(yte).to(dt))

    results, scores_kept = {}, {}
    t_exact = None
    # warm-up (first-call overheads) so that the time ratios compare like with like
    InfluenceAnalyzer(model, LOSS, solver="exact", l2=L2, progress=False).fit(train).scores(train, test)
    for sname, solver in solvers(d + 1).items():
        for loo in ("first_order", "newton"):
            if sname == "identity" and loo == "newton":
                continue

            def solve(solver=solver, loo=loo):
                an = InfluenceAnalyzer(model, LOSS, solver=solver, l2=L2, loo=loo, batch_size=1024, progress=False)
                an.fit(train)
                return an, an.scores(train, test).numpy()

            (an, s), elapsed = time_result(solve)
            if sname == "exact" and loo == "first_order":
                t_exact = elapsed
            st = stats_of(s, actual)
            st["time_vs_exact_first_order"] = elapsed / t_exact if t_exact else None
            st["solver_info"] = {k: v for k, v in an.solver.info.items() if k != "eigenvalues"}
            results[f"{sname} | {loo}"] = st
            scores_kept[(sname, loo)] = s
            print(
                f"[{name}] {sname:22s} {loo:11s} pooled r={st['pooled']['pearson']:.4f} "
                f"slope={st['pooled']['slope']:.3f} | per-query r median {st['per_query_pearson_median']:.4f} "
                f"slope {st['per_query_slope_min']:.3f}..{st['per_query_slope_max']:.3f} ({elapsed:.1f}s)",
                flush=True,
            )
    vs_lin = {
        f"exact | {loo}": stats_of(scores_kept[("exact", loo)], linearised)
        for loo in ("first_order", "newton")
    }
    mean_conv = stats_of(scores_kept[("exact", "first_order")], actual_mean)
    mean_conv_newton = stats_of(scores_kept[("exact", "newton")], actual_mean)
    return {
        "n_train": n,
        "n_test": int(len(yte)),
        "params": d + 1,
        "train_max_abs_grad": gmax,
        "loo_max_abs_grad": max(worst, worst_mean),
        "loo_median_lbfgs_iterations": med_it,
        "retrain_seconds": t_retrain,
        "actual_abs_mean": float(np.abs(actual).mean()),
        "results": results,
        "vs_linearised_actual": vs_lin,
        "mean_over_n_minus_1_convention": {
            "exact | first_order": mean_conv,
            "exact | newton": mean_conv_newton,
        },
        "_scatter": {
            "first order (exact)": (scores_kept[("exact", "first_order")], actual),
            "newton (exact)": (scores_kept[("exact", "newton")], actual),
        },
    }


def goals(report: dict) -> list[str]:
    """The issue's goals, each read two ways: pooled over all (test, train) pairs, and per test point."""
    lines = []
    for ds, r in report["datasets"].items():
        for s in GOAL_SOLVERS:
            st = r["results"][f"{s} | first_order"]
            pooled, med = st["pooled"]["pearson"], st["per_query_pearson_median"]
            lines.append(
                f"- {ds}, {s}, first order, Pearson >= 0.99: pooled {pooled:.4f} -> {'PASS' if pooled >= 0.99 else 'FAIL'}; "
                f"per test point median {med:.4f} -> {'PASS' if med >= 0.99 else 'FAIL'} "
                f"(min {st['per_query_pearson_min']:.4f})"
            )
        st = r["results"]["exact | newton"]
        pooled, med = st["pooled"]["slope"], st["per_query_slope_median"]
        lo, hi = st["per_query_slope_p10"], st["per_query_slope_p90"]
        ok = lambda x: "PASS" if abs(x - 1) <= 0.05 else "FAIL"  # noqa: E731
        lines.append(
            f"- {ds}, exact, newton, slope within 1 +- 0.05: pooled {pooled:.3f} -> {ok(pooled)}; per test point median "
            f"{med:.3f} -> {ok(med)} (10th-90th percentile {lo:.3f}..{hi:.3f}, min..max "
            f"{st['per_query_slope_min']:.3f}..{st['per_query_slope_max']:.3f})"
        )
    return lines


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    panels = {}
    for ds, r in report["datasets"].items():
        sc = r.pop("_scatter")
        panels[ds] = {k: (v[0].reshape(-1), v[1].reshape(-1)) for k, v in sc.items()}
    scatter_panels(panels, RESULTS / "influence_loo.png",
                   suptitle="influence vs leave-one-out retraining (L2 logistic regression, l2 = 0.05)")  # fmt: skip
    tmp = RESULTS / "influence_loo.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, RESULTS / "influence_loo.json")

    md = ["# Influence scores vs actual leave-one-out retraining", ""]
    md.append(f"Machine: {machine_line(report['machine'])}. {report['threads']} torch thread(s). Total run time "
              f"{report['seconds']:.0f} s.")  # fmt: skip
    md += ["", "Setup: L2-regularised logistic regression, `l2 = 0.05` on weights and bias, float64; standardised "
           "features; 80/20 stratified split (seed 0); actual leave-one-out by L-BFGS retraining (warm start, "
           "gtol 1e-12) for **every** training point; all test points as queries. Scores predict "
           "`loss_test(theta without j) - loss_test(theta)`; statistics compare them with the retrained change. "
           "Slope: least squares of actual on predicted (1 = calibrated). Per-test-point statistics: median "
           "(and range) over test points; pooled: all (test, train) pairs.", ""]  # fmt: skip
    md += ["## Goals", ""] + goals(report) + [""]
    for ds, r in report["datasets"].items():
        md += [f"## {ds}", "",
               f"n_train {r['n_train']}, n_test {r['n_test']}, {r['params']} parameters; retraining {r['retrain_seconds']:.1f} s "
               f"(median {r['loo_median_lbfgs_iterations']:.0f} L-BFGS iterations, largest final |grad| "
               f"{r['loo_max_abs_grad']:.1e}); mean |actual change| {r['actual_abs_mean']:.2e}.", "",
               "| solver | loo | Pearson (pooled) | Spearman (pooled) | slope (pooled) | Pearson per test pt: median / min "
               "| slope per test pt: median [min, max] | time vs exact first-order |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for key, st in r["results"].items():
            s, loo = key.split(" | ")
            tv = st["time_vs_exact_first_order"]
            md.append(
                f"| {s} | {loo} | {st['pooled']['pearson']:.4f} | {st['pooled']['spearman']:.4f} | {st['pooled']['slope']:.3f} "
                f"| {st['per_query_pearson_median']:.4f} / {st['per_query_pearson_min']:.4f} "
                f"| {st['per_query_slope_median']:.3f} [{st['per_query_slope_min']:.3f}, {st['per_query_slope_max']:.3f}] "
                f"| {tv:.2f}x |"
            )
        md += [
            "",
            "Against the *linearised* actual change `g_test . (theta_without_j - theta)` (the retrained parameter "
            "change seen through the test gradient; what the scores estimate before the test loss's own curvature):",
            "",
        ]
        for key, st in r["vs_linearised_actual"].items():
            md.append(
                f"- {key}: pooled Pearson {st['pooled']['pearson']:.5f}, slope {st['pooled']['slope']:.4f}; per test "
                f"point Pearson median {st['per_query_pearson_median']:.5f}, slope median {st['per_query_slope_median']:.4f}"
            )
        mc = r["mean_over_n_minus_1_convention"]
        md += ["", "Against retraining on the mean over the remaining n - 1 losses instead (a per-test-point constant "
               "shift, see the analyzer docstring):", ""]  # fmt: skip
        for key, st in mc.items():
            md.append(
                f"- {key}: pooled Pearson {st['pooled']['pearson']:.4f}, slope {st['pooled']['slope']:.3f}; per test "
                f"point Pearson median {st['per_query_pearson_median']:.4f}, slope median {st['per_query_slope_median']:.3f}"
            )
        md.append("")
    md += [
        "Reading. All solvers that converge to `A^{-1}` (exact, CG, LiSSA, full-rank Arnoldi) give the same "
        "numbers to 4 digits, so the gap to the goal is the first-order approximation itself, not a solver: it "
        "under-predicts the high-leverage removals (pooled slope > 1), and those largest pairs dominate the pooled "
        "Pearson while the pooled Spearman stays at 0.9996+. The Newton-corrected estimate reproduces the "
        "retrained parameter change almost exactly (Pearson 0.9998+ against the linearised actual change); what "
        "is left against the actual change is the test loss's own curvature along that change, "
        "`0.5 dtheta^T H_test dtheta`, which no score of this form models; it is largest relative to the score "
        "for confidently-right test points (tiny gradients), where the per-test-point minimum Pearson and the "
        "extreme slopes come from.",
        "",
    ]
    md += ["Solver diagnostics (residuals, eigenvalues, LiSSA scale) are in influence_loo.json. `identity` (gradient "
           "dot products) is not calibrated: its slope has no meaning. Comparisons with dattri / kronfluence were "
           "not run (not installable in this environment).", "",
           "![scatter](influence_loo.png)", ""]  # fmt: skip
    tmp = RESULTS / "influence_loo.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, RESULTS / "influence_loo.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-points", type=int, default=0, help="random subset of test points (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits_1_vs_7"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = {"machine": machine_info(), "threads": args.threads, "l2": L2, "datasets": {}}
    for name in args.datasets:
        report["datasets"][name] = run_dataset(name, args)
    report["seconds"] = time.perf_counter() - t0
    report["goals"] = goals(report)
    write(report)
    print("\n".join(report["goals"]))
    print(f"wrote {RESULTS / 'influence_loo.md'}")


if __name__ == "__main__":
    main()
