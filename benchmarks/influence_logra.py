"""Does keeping projected training gradients pay off? LoGra-style ``projection=k`` against exact EK-FAC.

``InfluenceAnalyzer(..., projection=k)`` multiplies each tracked module's inputs and output gradients by
fixed Gaussian ``k x in`` and ``k x out`` matrices, fits K-FAC / EK-FAC in that ``k x k`` space, and
``train_statistics`` keeps every training example's projected gradient, after which a new query set is
scored without any pass over the training set. What it costs in accuracy and what it saves in time is
measured here on the task of ``influence_lm_lds.py`` (its functions are imported: the byte-level Llama,
the CPython-source corpus, the training recipe, the half-size subsets and their retraining, the damping
rule ``0.1 x`` the empirical Fisher's mean eigenvalue):

* **accuracy**: LDS (Spearman over subsets between predicted and retrained query losses, mean over
  queries) of exact EK-FAC, K-FAC and gradient dot products (identity), and of the same with
  ``projection`` k in ``--ks``; Pearson of each projected variant's scores with the exact one's;
* **time**: per variant, ``fit`` (+ ``train_statistics`` when projected: one more pass over the
  training set, paid once) and the scoring of the query set, which for the projected variants reads the
  kept gradients (``scores`` after ``train_statistics``) and for the exact ones runs its training pass;
  the ratio of the two scoring times is what every later query set saves. Methods alternate in
  ``--reps`` rounds (rotated), medians; 1 torch thread.
* **memory** of the kept statistics: ``n x modules x k x k x 4`` bytes, against the exact per-example
  gradients (``n x tracked parameters x 4``) that would be needed to skip the training pass without it.

**Selection rule (fixed before the run).** ``--ks`` 8, 16, 32 (the modules are 64 or 176 wide with the
default model, so 64 keeps the 64-wide sides exact and is left out); same damping for every variant
(the rule above; for projected variants the damping is the same number); label-sampling seed 0; the
claim "it pays off" needs a projected EK-FAC whose LDS is at least 90% of exact EK-FAC's while its
repeat scoring is at least 5x faster. Nothing is tuned on LDS.

    python benchmarks/influence_logra.py                 # 1024 x 64 B train, 64 queries, 50 subsets (as influence_lm_lds.py)
    python benchmarks/influence_logra.py --quick         # smoke: 256 sequences, 8 subsets

Writes ``benchmarks/results/influence_logra{tag}.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import influence_lm_lds as base  # noqa: E402
from _machine import machine_info, machine_line  # noqa: E402
from _timing import medians, time_rounds  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.influence import InfluenceAnalyzer, lds  # noqa: E402
from soulkit.influence.modules import tracked_modules  # noqa: E402

GOAL_LDS_SHARE, GOAL_SPEEDUP = 0.9, 5.0


def analyzer(model, method: str, k: int | None, damping: float, names: list[str]) -> InfluenceAnalyzer:
    kw = dict(modules=names) if method == "identity" else dict(fisher="true", fisher_samples=1, seed=0)
    return InfluenceAnalyzer(model, base.LM_LOSS, solver=method, l2=0.0, damping=damping, batch_size=base.BATCH,
                             progress=False, projection=k, **kw)


def run_variant(model, train, queries, method: str, k: int | None, damping: float, names: list[str]) -> dict:
    """Fit (+ keep the training gradients when projected), then score; seconds of each phase and the scores."""
    an = analyzer(model, method, k, damping, names)
    t0 = time.perf_counter()
    an.fit(train)
    t_fit = time.perf_counter() - t0
    t_stats = 0.0
    if k is not None:
        t0 = time.perf_counter()
        an.train_statistics(train)
        t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = an.scores(train, queries)
    t_scores = time.perf_counter() - t0
    return {"scores": s.double().numpy(), "fit": t_fit, "train_statistics": t_stats, "scores_seconds": t_scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke: 256 sequences, 16 queries, 8 subsets, 1 round")
    ap.add_argument("--ks", default="8,16,32")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--subsets", type=int, default=None, help="half-size subsets retrained (default 50)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    q = args.quick
    args.n_train = args.n_train or (256 if q else 1024)
    args.queries = args.queries or (16 if q else 64)
    args.subsets = args.subsets or (8 if q else 50)
    args.reps = args.reps or (1 if q else 3)
    args.epochs = args.epochs or (3 if q else 10)
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    info = machine_info()

    xtr, xq, data = base.corpus(args.n_train, args.queries, args.seq_len, args.seed)
    train, queries = base.Sequences(xtr), base.Sequences(xq)
    model = base.train_lm(xtr, args)
    names = [t.name for t in tracked_modules(model)]
    mean_eig, p_tracked = base.empirical_fisher_mean_eigenvalue(model, xtr, names)
    damping = base.DAMPING_SCALE * mean_eig
    print(f"model trained; damping {damping:.4g}; {p_tracked} tracked parameters in {len(names)} modules", flush=True)
    masks = base.subset_masks(args.n_train, args.subsets, args.seed)
    actual = np.zeros((args.subsets, args.queries))
    t0 = time.perf_counter()
    for s, mask in enumerate(masks):
        actual[s] = base.losses_of(base.train_lm(xtr[torch.from_numpy(mask)], args), xq)
    retrain_seconds = time.perf_counter() - t0
    print(f"retrained {args.subsets} subsets in {retrain_seconds:.0f}s", flush=True)

    variants = [(m, None) for m in ("ekfac", "kfac", "identity")] + [(m, k) for k in ks for m in ("ekfac", "identity")]
    label = {v: f"{v[0]}" + (f", k={v[1]}" if v[1] else " (exact)") for v in variants}
    kept: dict[str, dict] = {}
    phase_runs: dict[str, list[dict]] = {label[v]: [] for v in variants}

    def arm(v):
        def call():
            r = run_variant(model, train, queries, v[0], v[1], damping, names)
            kept[label[v]] = r
            phase_runs[label[v]].append({k: r[k] for k in ("fit", "train_statistics", "scores_seconds")})
        return call

    times = time_rounds({label[v]: arm(v) for v in variants}, reps=args.reps, warmup=0, cold_cache=False, rotate=True,
                        after_round=lambda i, t: print(f"round {i + 1} done", flush=True))
    med = medians(times)
    ref = kept["ekfac (exact)"]["scores"]
    ref_lds = lds(ref, masks, actual).lds
    exact_scoring = {m: float(np.median([p["scores_seconds"] for p in phase_runs[f"{m} (exact)"]]))
                     for m in ("ekfac", "kfac", "identity")}
    rows = []
    n_mod = len(names)
    for v in variants:
        name = label[v]
        r = kept[name]
        ph = {k: float(np.median([p[k] for p in phase_runs[name]])) for k in ("fit", "train_statistics",
                                                                             "scores_seconds")}
        res = lds(r["scores"], masks, actual)
        row = {"variant": name, "method": v[0], "projection": v[1], "lds": res.lds,
               "lds_share_of_exact_ekfac": res.lds / ref_lds if ref_lds else None,
               "pearson_vs_exact_ekfac": base.pearson(r["scores"], ref), "seconds_total": med[name],
               "fit_seconds": ph["fit"], "train_statistics_seconds": ph["train_statistics"],
               "scoring_seconds": ph["scores_seconds"]}
        if v[1] is not None:
            row["repeat_scoring_speedup"] = exact_scoring[v[0]] / ph["scores_seconds"]
            row["statistics_mb"] = args.n_train * n_mod * v[1] * v[1] * 4 / 2**20
        rows.append(row)
    exact_grad_mb = args.n_train * p_tracked * 4 / 2**20
    goal_rows = [r for r in rows if r["method"] == "ekfac" and r["projection"]]
    met = [r for r in goal_rows if (r["lds_share_of_exact_ekfac"] or 0) >= GOAL_LDS_SHARE
           and r["repeat_scoring_speedup"] >= GOAL_SPEEDUP]
    total = time.perf_counter() - t_start
    report = {"machine": info, "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
              "config": {k: getattr(args, k) for k in ("n_train", "queries", "subsets", "reps", "seq_len", "hidden",
                                                        "layers", "heads", "epochs", "lr", "seed")} | {"ks": ks},
              "data": data, "damping": damping, "tracked_parameters": p_tracked, "tracked_modules": n_mod,
              "retrain_seconds": retrain_seconds, "exact_gradients_mb": exact_grad_mb, "rows": rows,
              "goal": {"lds_share": GOAL_LDS_SHARE, "speedup": GOAL_SPEEDUP, "met_by": [r["variant"] for r in met]},
              "total_seconds": total}
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"influence_logra{args.tag}"
    atomic_write_json(out / f"{stem}.json", report)
    lines = [
        "# Kept projected training gradients (LoGra-style `projection=k`) vs exact EK-FAC", "",
        f"Machine: {machine_line(info)}. Command: `{report['command']}`. Total {total / 60:.1f} min.", "",
        f"Task: `influence_lm_lds.py`'s byte-level Llama ({args.layers} layers, hidden {args.hidden}; {p_tracked:,} "
        f"tracked parameters in {n_mod} linear modules), {args.n_train} training sequences of {args.seq_len} bytes, "
        f"{args.queries} queries, LDS over {args.subsets} half-size subsets, each retrained "
        f"({retrain_seconds / 60:.1f} min). Damping {damping:.3g} for every variant (0.1 x the empirical Fisher's "
        f"mean eigenvalue). Seconds: medians over {args.reps} rotated rounds, 1 torch thread.", "",
        "| variant | LDS | share of exact EK-FAC's LDS | Pearson vs exact EK-FAC | fit s | keep training "
        "gradients s | scoring s | repeat scoring speedup | kept gradients MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['lds']:.3f} | {r['lds_share_of_exact_ekfac']:.2f} | {r['pearson_vs_exact_ekfac']:.3f} "
            f"| {r['fit_seconds']:.1f} | {r['train_statistics_seconds']:.1f} | {r['scoring_seconds']:.2f} | "
            + (f"{r['repeat_scoring_speedup']:.1f}x | {r['statistics_mb']:.1f} |" if r["projection"] else "- | - |"))
    lines += ["", f"Exact per-example gradients of the tracked modules would take {exact_grad_mb:,.0f} MB.",
              "'repeat scoring speedup' = the exact variant's scoring time (query gradients + one training pass) over "
              "the projected variant's (query gradients + one product with the kept gradients): what every query set "
              "after the first saves. Keeping the gradients costs one training pass, once.", "",
              f"Goal (fixed before the run): a projected EK-FAC with LDS >= {GOAL_LDS_SHARE:.0%} of exact EK-FAC's "
              f"and repeat scoring >= {GOAL_SPEEDUP:g}x faster. "
              + (f"Met by: {', '.join(r['variant'] for r in met)}." if met else "**Not met** by any k.")]
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
