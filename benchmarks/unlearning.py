"""SOUL (Sophia) vs AdamW unlearning on the fictitious-author benchmark: every objective x optimizer.

    python benchmarks/unlearning.py                 # scale small (40 authors x 20 QA), ~45 min on 2 cores
    python benchmarks/unlearning.py --quick         # 2 methods, 1 seed, forget10 only (a smoke run)

Protocol (all on the benchmark models of ``benchmarks/tofu_baselines.py``, built or reused from the
cache):

1. **Sweep** (forget05, unlearning seed 0): for each method x optimizer, lr in ``--lrs``; for Sophia
   also rho in ``--rhos``. 5 epochs over the forget set, batch 8 (+ 8 retain), constant lr, grad clip 1.
   Selection rule: among settings whose model utility is >= 95% of the finetuned model's, the one with
   the highest forget quality (ties: higher utility); if none keeps 95%, the one with the highest utility.
2. **Final**: the selected setting on forget01/05/10 with unlearning seeds 1 and 2 (the sweep's seed
   0 is not reused, so selection and report are separate runs).
3. **One-shot Newton baseline** (``theta + scale * (n_F/n) (diag H + damping)^-1 grad L_forget``,
   GNB diagonal, damping 1e-2 ~ 7x the mean diagonal; scale 1, the first-order formula, diverges with
   a diagonal H): ``scale`` swept on forget05 by the same rule, then run on every split.

Forget quality is always against retrain seed 1 of the split; the finetuned and retrain-seed2 rows
are the start and the ceiling. Writes ``benchmarks/results/unlearning.{json,md,png}`` (JSON: a list of
rows with method, optimizer, split, seed, lr and the fields of ``results.json``) and keeps a partial
file so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _runs import ResumableRuns, select, slim  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.demos.unlearn_tofu import plot_tradeoff  # noqa: E402
from soulkit.unlearn.evaluate import conventions  # noqa: E402
from soulkit.unlearn.models import load_model  # noqa: E402
from soulkit.unlearn.newton import newton_unlearn  # noqa: E402
from soulkit.unlearn.suite import UnlearningSuite, default_unlearn_config  # noqa: E402

METHODS = ("ga", "graddiff", "npo", "simnpo", "idk")
OPTIMIZERS = ("adamw", "sophia")
SPLITS = ("forget01", "forget05", "forget10")
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--lrs", default="1e-4,2e-4,3e-4,5e-4,1e-3")
    ap.add_argument("--rhos", default="0.04,1.0")
    ap.add_argument("--newton-scales", default="0.03,0.1,0.3")
    ap.add_argument("--quick", action="store_true", help="graddiff,npo; forget10; seed 1; lrs 3e-4,1e-3")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hessian-bias-correction", action="store_true",
                    help="Sophia with hessian_bias_correction=True (h / (1 - beta2**n))")
    ap.add_argument("--no-newton", action="store_true", help="skip the one-shot Newton baseline")
    ap.add_argument("--tag", default="", help="suffix of the output files (unlearning<tag>.md, ...)")
    args = ap.parse_args()
    if args.quick:
        args.methods, args.splits, args.seeds, args.lrs, args.rhos = "graddiff,npo", "forget10", "1", "3e-4,1e-3", "1.0"
        args.newton_scales = "0.1"
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    splits = args.splits.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    rhos = [float(x) for x in args.rhos.split(",")]
    sweep_split = "forget05" if "forget05" in splits else splits[0]

    suite = UnlearningSuite.from_scale(args.scale, cache_dir=args.cache_dir, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"unlearning{args.tag}"
    run = ResumableRuns(args.out / f".{stem}.partial.json")
    t_start = time.perf_counter()

    # reference rows
    ft_dir = suite.finetuned_dir()
    refs = {}
    for split in splits:
        refs[("finetuned", split)] = run(f"finetuned|{split}", lambda s=split: slim(suite.evaluate_dir(ft_dir, s)))
        refs[("retrain-seed2", split)] = run(f"retrain2|{split}", lambda s=split: slim(
            suite.evaluate_dir(suite.retrained_dir(s, 2), s)))
    mu_ft = refs[("finetuned", sweep_split)]["model_utility"]

    def unlearn(method: str, opt: str, split: str, seed: int, lr: float, rho: float | None) -> dict:
        kw = ({"optimizer_kwargs": {"rho": rho, "hessian_bias_correction": args.hessian_bias_correction}}
              if opt == "sophia" else {})
        cfg = default_unlearn_config(method, opt, lr=lr, seed=seed, show_progress=False, **kw)
        res, _ = suite.unlearn(method, opt, split, config=cfg)
        return {**slim(res), "lr": lr, "rho": rho}

    # 1. sweep
    chosen: dict[tuple[str, str], dict] = {}
    sweep_rows = []
    for method in methods:
        for opt in OPTIMIZERS:
            cands = []
            for lr in lrs:
                for rho in (rhos if opt == "sophia" else [None]):
                    key = f"sweep|{method}|{opt}|{sweep_split}|0|{lr}|{rho}"
                    r = run(key, lambda m=method, o=opt, lr=lr, rho=rho: unlearn(m, o, sweep_split, 0, lr, rho))
                    cands.append(r)
                    sweep_rows.append({"method": method, "optimizer": opt, "split": sweep_split, "seed": 0, **r})
            chosen[(method, opt)] = select(cands, mu_ft)

    # 2. final runs
    rows = []
    for split in splits:
        for name in ("finetuned", "retrain-seed2"):
            rows.append({"method": name, "optimizer": None, "split": split, "seed": None, "lr": None,
                         **refs[(name, split)]})
        for method in methods:
            for opt in OPTIMIZERS:
                c = chosen[(method, opt)]
                for seed in seeds:
                    key = f"final|{method}|{opt}|{split}|{seed}|{c['lr']}|{c['rho']}"
                    r = run(key, lambda m=method, o=opt, s=split, sd=seed, c=c: unlearn(m, o, s, sd, c["lr"], c["rho"]))
                    rows.append({"method": method, "optimizer": opt, "split": split, "seed": seed, **r})

    # 3. one-shot Newton
    model, tok = load_model(ft_dir)

    def newton(split: str, scale: float) -> dict:
        forget, retain = suite.benchmark.split(split)
        t = time.perf_counter()
        new, info = newton_unlearn(model, tok, forget, retain=retain, scale=scale, damping=1e-2)
        secs = time.perf_counter() - t
        res = suite.evaluate(new, tok, split)
        return {**slim(res), "unlearn_seconds": secs, "lr": None, "rho": None, "newton_scale": scale,
                "step_norm": info["step_norm"]}

    scales = [] if args.no_newton else [float(x) for x in args.newton_scales.split(",")]
    cands = [run(f"sweep|newton|{sweep_split}|{s}", lambda s=s: newton(sweep_split, s)) for s in scales]
    sweep_rows += [{"method": "newton", "optimizer": None, "split": sweep_split, "seed": 0, **r} for r in cands]
    best = select(cands, mu_ft) if cands else None
    for split in splits if best else []:
        r = run(f"final|newton|{split}|{best['newton_scale']}", lambda s=split: newton(s, best["newton_scale"]))
        rows.append({"method": "newton", "optimizer": None, "split": split, "seed": 0, **r})

    info = machine_info()
    for r in rows:
        r["machine"] = machine_line(info)
        r["scale"] = args.scale
    atomic_write_json(args.out / f"{stem}.json", rows)
    eval_config = {**asdict(suite.eval_config), "conventions": conventions(suite.eval_config)}
    atomic_write_json(args.out / f"{stem}_sweep.json", {"machine": info, "selection_split": sweep_split,
                                                          "finetuned_utility": mu_ft, "eval_config": eval_config,
                                                          "rows": sweep_rows})
    md = markdown(rows, sweep_rows, chosen, best, info, args, time.perf_counter() - t_start, mu_ft,
                  eval_config["conventions"])
    atomic_write_text(args.out / f"{stem}.md", md)
    plot_rows = _aggregate(rows, splits[-1] if "forget05" not in splits else "forget05")
    plot_tradeoff(plot_rows, args.out / f"{stem}.png",
                  title=f"{plot_rows[0]['split']}: forget quality vs utility (mean over seeds), {args.scale} scale")
    plot_sweep(sweep_rows, mu_ft, args.out / f"{stem}_sweep.png", sweep_split)
    run.finish()
    print(md)


def plot_sweep(sweep_rows: list[dict], mu_ft: float, path: Path, split: str) -> None:
    """Every sweep setting: forget quality vs utility, one line per method x optimizer (lr increasing)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from soulkit._io import atomic_write_bytes

    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    groups: dict[tuple, list[dict]] = {}
    for r in sweep_rows:
        if r["method"] != "newton" and r.get("rho") in (None, max(x.get("rho") or 0 for x in sweep_rows)):
            groups.setdefault((r["method"], r["optimizer"]), []).append(r)
    for i, ((m, o), rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["lr"])
        ax.plot([r["model_utility"] for r in rs], [max(r["forget_quality"], 1e-12) for r in rs],
                marker="*" if o == "sophia" else "o", ls="-" if o == "sophia" else "--", color=f"C{i // 2}",
                label=f"{m} x {o}")
    ax.axvline(0.95 * mu_ft, color="gray", lw=0.8, ls=":", label="95% of finetuned utility")
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality vs retrain (floor 1e-12)")
    ax.set_title(f"lr sweep on {split} (points: lr increasing to the left)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _aggregate(rows: list[dict], split: str) -> list[dict]:
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["split"] == split:
            groups.setdefault((r["method"], r["optimizer"]), []).append(r)
    for (m, o), rs in groups.items():
        out.append({"name": m if o is None else f"{m} x {o}", "optimizer": o, "split": split,
                    "forget_quality": statistics.fmean(r["forget_quality"] for r in rs),
                    "model_utility": statistics.fmean(r["model_utility"] for r in rs)})
    return out


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows, sweep_rows, chosen, best, info, args, total, mu_ft, conv) -> str:
    lines = [f"# Unlearning: objectives x {{AdamW, Sophia (SOUL)}} (scale `{args.scale}`)", "",
             f"Machine: {machine_line(info)}. Command: `python benchmarks/unlearning.py "
             f"{' '.join(sys.argv[1:])}`; whole run {total / 60:.0f} min (cached models reused).", "",
             "Forget quality (FQ) = KS-test p-value of forget-set truth-ratio statistics against retrain seed 1; "
             "MU = model utility (finetuned: " f"{mu_ft:.3f} on the selection split). Each unlearning row is one "
             "seed; settings chosen by the sweep below.", "",
             "Evaluation conventions (`unlearning_sweep.json` `eval_config`): "
             + "; ".join(f"{k}: {v}" for k, v in conv.items()) + ".", "",
             "| split | method | optimizer | seed | lr | rho | FQ | KS | MU | forget ROUGE | retain ROUGE | "
             "win rate | s |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['split']} | {r['method']} | {r['optimizer'] or '-'} | {_f(r['seed'], 'd')} | "
                     f"{_f(r.get('lr'), 'g')} | {_f(r.get('rho'), 'g')} | {_f(r['forget_quality'], '.2e')} | "
                     f"{_f(r['ks_statistic'], '.3f')} | {_f(r['model_utility'], '.3f')} | {_f(r['forget_rouge'], '.3f')} | "
                     f"{_f(r['retain_rouge'], '.3f')} | {_f(r.get('mean_win_rate'), '.3f')} | "
                     f"{_f(r.get('unlearn_seconds'), '.1f')} |")
    lines += ["", "## Mean over seeds", "", "| split | method | optimizer | FQ (mean) | MU (mean) | forget ROUGE |",
              "|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["split"], r["method"], r["optimizer"]), []).append(r)
    for (split, m, o), rs in groups.items():
        lines.append(f"| {split} | {m} | {o or '-'} | {statistics.fmean(r['forget_quality'] for r in rs):.3g} | "
                     f"{statistics.fmean(r['model_utility'] for r in rs):.3f} | "
                     f"{statistics.fmean(r['forget_rouge'] for r in rs):.3f} |")
    lines += ["", "## Sweep (selection split, seed 0)", "",
              "Rule: among settings keeping MU >= 95% of the finetuned model's, highest FQ; else highest MU.", "",
              "| method | optimizer | lr | rho / scale | FQ | MU | forget ROUGE | win rate | chosen |", "|" + "---|" * 9]
    for r in sweep_rows:
        if r["method"] == "newton":
            sel = best is not None and r["newton_scale"] == best["newton_scale"]
            lines.append(f"| newton | - | - | {r['newton_scale']:g} | {r['forget_quality']:.2e} | "
                         f"{r['model_utility']:.3f} | {r['forget_rouge']:.3f} | - | {'yes' if sel else ''} |")
            continue
        c = chosen[(r["method"], r["optimizer"])]
        sel = c["lr"] == r["lr"] and c["rho"] == r["rho"]
        lines.append(f"| {r['method']} | {r['optimizer']} | {r['lr']:g} | {_f(r['rho'], 'g')} | "
                     f"{r['forget_quality']:.2e} | {r['model_utility']:.3f} | {r['forget_rouge']:.3f} | "
                     f"{_f(r.get('mean_win_rate'), '.3f')} | {'yes' if sel else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
