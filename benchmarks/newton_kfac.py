"""One-shot Newton unlearning: diagonal (GNB) vs K-FAC vs EK-FAC curvature, on the fictitious-author benchmark.

    python benchmarks/newton_kfac.py --threads 1          # small scale, forget10, ~45 min on a busy 2-core CPU

Protocol (the benchmark models of ``benchmarks/tofu_baselines.py``, reused from the cache):

1. The finetuned model's K-FAC/EK-FAC factors are fitted once on the split's training set (retain + forget,
   true Fisher, seed 0; :func:`soulkit.unlearn.newton.qa_newton_factors`); EK-FAC factors serve K-FAC too.
2. Grid: for each curvature (``diagonal``: GNB diagonal over all parameters; ``kfac`` / ``ekfac``: the
   tracked linear modules only, embeddings and norms untouched), each damping in ``--dampings`` and each
   scale in ``--scales``, one Newton step ``theta + scale (n_F/n) (H + damping I)^-1 grad L_forget``
   (:func:`soulkit.unlearn.newton.newton_unlearn`), evaluated on the split (forget quality against
   retrain seed 1, model utility, ROUGE).
3. Selection rule (stated before the numbers in the md): per curvature, among grid settings whose model
   utility is >= 95% of the finetuned model's, the highest forget quality (ties: higher utility); if none
   keeps 95%, the highest utility. Selection and report use the same runs (no held-out split): the
   selected rows are the best a sweep finds, not a held-out estimate.
4. Iterated: each curvature's selected setting rerun with ``steps=--iterate`` Newton iterations (H fixed).

Writes ``benchmarks/results/newton_kfac.{json,md,png}``; keeps a partial file so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _runs import select  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.unlearn.models import load_model  # noqa: E402
from soulkit.unlearn.newton import CURVATURES, newton_unlearn, qa_newton_factors  # noqa: E402
from soulkit.unlearn.suite import UnlearningSuite  # noqa: E402

KEEP = ("forget_quality", "ks_statistic", "forget_quality_ceiling", "model_utility", "forget_rouge", "retain_rouge",
        "forget_probability", "retain_probability", "forget_truth_ratio", "real_authors_rouge", "world_facts_rouge")
RULE = ("per curvature, among the grid settings whose model utility is >= 95% of the finetuned model's, the "
        "highest forget quality (ties: higher utility); if none keeps 95%, the highest utility. Selection and "
        "report use the same runs (no held-out split).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small", help="benchmark scale (UnlearningSuite.from_scale)")
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--curvatures", default=",".join(CURVATURES))
    ap.add_argument("--dampings", default="1e-3,1e-2")
    ap.add_argument("--scales", default="0.03,0.05,0.1,0.2,0.3,0.5,1")
    ap.add_argument("--iterate", type=int, default=3, help="steps of the iterated rerun (0: skip it)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-partial", action="store_true",
                    help="compute nothing: report the rows an interrupted run left in the partial file, listing "
                         "the missing ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    curvatures = args.curvatures.split(",")
    bad = [c for c in curvatures if c not in CURVATURES]
    if bad:
        ap.error(f"--curvatures: unknown {bad}; choose from {CURVATURES}")
    dampings = [float(x) for x in args.dampings.split(",")]
    scales = [float(x) for x in args.scales.split(",")]

    t_start = time.perf_counter()
    suite = UnlearningSuite.from_scale(args.scale, cache_dir=args.cache_dir, progress=False)
    forget, retain = suite.benchmark.split(args.split)
    model, tok = (None, None) if args.report_partial else load_model(suite.finetuned_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / ".newton_kfac.partial.json"
    done: dict[str, dict] = json.loads(partial.read_text()) if partial.exists() else {}

    missing: list[str] = []

    def run(key: str, fn) -> dict | None:
        if key not in done and args.report_partial:
            missing.append(key)
            return None
        if key not in done:
            t = time.perf_counter()
            try:
                done[key] = fn()
            except FloatingPointError as e:  # a diverged step: worst scores, recorded as such
                done[key] = {k: None for k in KEEP} | {"forget_quality": 0.0, "model_utility": 0.0, "error": str(e)}
            done[key]["wall_seconds"] = time.perf_counter() - t
            atomic_write_json(partial, done)
            r = done[key]
            print(f"{key}: FQ {r['forget_quality']:.3g} MU {r['model_utility']:.3f} "
                  f"({r['wall_seconds']:.0f} s)", flush=True)
        return done[key]

    def reference(name: str, directory) -> dict:
        res = suite.evaluate_dir(directory, args.split)
        return {k: res.get(k) for k in KEEP}

    ft = run("finetuned", lambda: reference("finetuned", suite.finetuned_dir()))
    rt = run("retrain-seed2", lambda: reference("retrain-seed2", suite.retrained_dir(args.split, 2)))
    mu_ft = ft["model_utility"]

    factors = None
    fit_seconds = done.get("factors", {}).get("fit_seconds")
    if any(c != "diagonal" for c in curvatures) and not args.report_partial:
        t = time.perf_counter()
        factors = qa_newton_factors(model, tok, forget, retain=retain, method="ekfac")
        fit_seconds = time.perf_counter() - t
        done["factors"] = {"fit_seconds": fit_seconds, "meta": factors.meta}
        atomic_write_json(partial, done)
        print(f"EK-FAC factors: {fit_seconds:.0f} s", flush=True)

    def newton(curvature: str, damping: float, scale: float, steps: int) -> dict:
        kw = {} if curvature == "diagonal" else {"factors": factors}
        t = time.perf_counter()
        new, info = newton_unlearn(model, tok, forget, retain=retain, curvature=curvature, damping=damping,
                                   scale=scale, steps=steps, **kw)
        secs = time.perf_counter() - t
        res = suite.evaluate(new, tok, args.split)
        return {k: res.get(k) for k in KEEP} | {
            "unlearn_seconds": secs, "step_norm": info["step_norm"], "step_norms": info["step_norms"],
            "covered_fraction": info.get("covered_fraction", 1.0)}

    grid, chosen, iterated = [], {}, []
    for c in curvatures:
        rows = []
        for d in dampings:
            for s in scales:
                r = run(f"{c}|{d}|{s}|1", lambda c=c, d=d, s=s: newton(c, d, s, 1))
                if r is not None:
                    rows.append({"curvature": c, "damping": d, "scale": s, "steps": 1, **r})
        grid += rows
        chosen[c] = select(rows, mu_ft)
    if args.iterate > 1:
        for c in curvatures:
            b = chosen[c]
            r = run(f"{c}|{b['damping']}|{b['scale']}|{args.iterate}",
                    lambda c=c, b=b: newton(c, b["damping"], b["scale"], args.iterate))
            if r is not None:
                iterated.append({"curvature": c, "damping": b["damping"], "scale": b["scale"],
                                 "steps": args.iterate, **r})

    info = machine_info()
    total = time.perf_counter() - t_start
    if args.report_partial:  # the computing runs' time: every reported row plus the factor fit
        total = sum(r.get("wall_seconds", 0.0) for r in done.values()) + (fit_seconds or 0.0)
    out = {"machine": info, "machine_line": machine_line(info), "command": " ".join(sys.argv),
           "scale": args.scale, "split": args.split, "n_forget": len(forget), "n_train": len(forget) + len(retain),
           "selection_rule": RULE, "finetuned": ft, "retrain_seed2": rt, "factor_fit_seconds": fit_seconds,
           "grid": grid, "selected": {c: {k: chosen[c][k] for k in ("damping", "scale")} for c in curvatures},
           "iterated": iterated, "not_run": missing}
    atomic_write_json(args.out / "newton_kfac.json", out)
    atomic_write_text(args.out / "newton_kfac.md", markdown(out, mu_ft, total))
    plot(out, args.out / "newton_kfac.png")
    if not args.report_partial:
        partial.unlink(missing_ok=True)


def plot(out: dict, path: Path) -> None:
    """Forget quality (log) against model utility: one line per curvature x damping through its scales."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from soulkit._io import atomic_write_bytes

    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    styles = {"diagonal": "o-", "kfac": "s--", "ekfac": "^:"}
    for c in dict.fromkeys(r["curvature"] for r in out["grid"]):
        for d in dict.fromkeys(r["damping"] for r in out["grid"]):
            rs = sorted((r for r in out["grid"] if r["curvature"] == c and r["damping"] == d), key=lambda r: r["scale"])
            if rs:
                ax.plot([r["model_utility"] for r in rs], [max(r["forget_quality"], 1e-20) for r in rs],
                        styles.get(c, "x-"), label=f"{c}, damping {d:g}", ms=4)
    for name, r, m in (("finetuned", out["finetuned"], "k*"), ("retrain seed 2", out["retrain_seed2"], "g*")):
        ax.plot([r["model_utility"]], [r["forget_quality"]], m, ms=12, label=name)
    ax.axvline(0.95 * out["finetuned"]["model_utility"], color="gray", lw=0.8, ls=":", label="95% of finetuned MU")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (scale grows to the left)")
    ax.set_ylabel("forget quality vs retrain seed 1")
    ax.set_title(f"one-shot Newton, {out['split']} ({out['scale']}): diagonal vs K-FAC vs EK-FAC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(r: dict, sel: str = "") -> str:
    return (f"| {r['curvature']} | {r['damping']:g} | {r['scale']:g} | {r['steps']} | {_f(r['forget_quality'], '.2e')} | "
            f"{_f(r['model_utility'], '.3f')} | {_f(r.get('forget_rouge'), '.3f')} | {_f(r.get('retain_rouge'), '.3f')} | "
            f"{_f(r.get('forget_probability'), '.3f')} | {_f(r.get('step_norm'), '.3g')} | "
            f"{_f(r.get('unlearn_seconds'), '.0f')} | {sel} |")


def markdown(out: dict, mu_ft: float, total: float) -> str:
    ft, rt = out["finetuned"], out["retrain_seed2"]
    frac = next((r["covered_fraction"] for r in out["grid"] if r["curvature"] != "diagonal"), None)
    head = ("| curvature | damping | scale | steps | FQ | MU | forget ROUGE | retain ROUGE | forget prob | step norm | "
            "s | selected |")
    lines = [f"# One-shot Newton unlearning: diagonal vs K-FAC vs EK-FAC ({out['split']}, scale `{out['scale']}`)", "",
             f"Machine: {out['machine_line']}. Command: `{out['command']}`; whole run {total / 60:.0f} min "
             "(cached models reused).", "",
             f"Step: `theta + scale * (n_F/n) * (H + damping I)^-1 grad L_forget`, n_F = {out['n_forget']}, "
             f"n = {out['n_train']}. `diagonal`: GNB diagonal of H, every parameter moves. `kfac` / `ekfac`: the "
             "influence layer's K-FAC / EK-FAC Gauss-Newton (true Fisher, fitted once on retain + forget, "
             f"{_f(out['factor_fit_seconds'], '.0f')} s), applied to the attention and MLP projections only "
             f"(the tracked modules, {_f(frac, '.0%')} of the parameters); the tied embedding / LM head and the norms stay as "
             "they are. FQ = forget quality (KS p-value against retrain seed 1), MU = model utility.", "",
             f"Selection rule (fixed before the run): {out['selection_rule']}", "",
             *([f"**Not run**: the rows were computed by this command without `--report-partial`, which was "
                "stopped for time; these settings are missing (also from the selection): "
                f"{', '.join('`' + k + '`' for k in out['not_run'])} (curvature|damping|scale|steps).", ""]
               if out.get("not_run") else []),
             f"References: finetuned FQ {ft['forget_quality']:.2e}, MU {ft['model_utility']:.3f}, forget ROUGE "
             f"{_f(ft.get('forget_rouge'), '.3f')}; retrain seed 2 (the ceiling) FQ {rt['forget_quality']:.2e}, MU "
             f"{rt['model_utility']:.3f}, forget ROUGE {_f(rt.get('forget_rouge'), '.3f')}. The 95% utility bar: "
             f"{0.95 * mu_ft:.3f}.", "", "## Selected per curvature", "", head, "|" + "---|" * 12]
    sel = out["selected"]
    for c, s in sel.items():
        r = next(r for r in out["grid"] if r["curvature"] == c and r["damping"] == s["damping"]
                 and r["scale"] == s["scale"])
        lines.append(_row(r, "yes"))
    if out["iterated"]:
        lines += ["", "## Iterated (the selected setting, H fixed)", "", head, "|" + "---|" * 12]
        lines += [_row(r) for r in out["iterated"]]
    lines += ["", "## Grid", "", head, "|" + "---|" * 12]
    for r in out["grid"]:
        s = sel[r["curvature"]]
        lines.append(_row(r, "yes" if (r["damping"], r["scale"]) == (s["damping"], s["scale"]) else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
