"""Does second-order unlearning (SOUL) beat first-order here, and if so is it the curvature, the retain weight or sign steps?

    python benchmarks/soul_repro.py                  # scale small: forget10 grid, then 3 seeds on forget10/05/01
    python benchmarks/soul_repro.py --quick          # smoke run: graddiff, 2 arms, a 2 x 2 grid, 1 seed

SOUL (Jia et al. 2024) tuned its retain weight gamma separately for its first- and second-order runs and released
an optimizer that differs from Sophia (``soulkit.optim.SoulReleasedSophia``: squared-gradient "Hessian" refreshed
every step, ``rho * bs = 204.8``, momentum updated twice). This benchmark compares, on equal footing:

* **methods** GradDiff, NPO (+ NLL retain term) and IDK (SOUL's "PO"); the retain weight ``gamma`` scales the
  retain term of each;
* **arms** ``adamw``; ``sophia`` (GNB, rho 1, the paper's Hessian without bias correction); ``sophia-hbc`` (the
  same with Hessian bias correction); ``soul-released`` (SOUL's optimizer as released, weight decay 0.1 as in
  its TOFU configs); ``signum`` (sign momentum, beta 0.9: what a fully clipped Sophia is).

Protocol, fixed before the run:

1. **Grid** on forget10 (SOUL's split), unlearning seed 0, SOUL's schedule (linear decay after a 10% linear
   warmup): lr in ``--lrs`` x gamma in ``--gammas`` for every method x arm. (The grid first stopped at 3e-4,
   because the unlearning benchmark's constant-lr sweep found 1e-3 costing 30% or more of the utility; the first
   grid put every arm's best point at 3e-4, at the edge, and with the decaying schedule the mean lr is about half
   the peak, so 1e-3 was added before any selection was made.)
   The **constant** schedule (the unlearning benchmark's) is run on the same lrs at gamma 1, as its own front,
   after the forget10 seeds.
2. **Fronts**: per method x arm, the Pareto front of (model utility, forget quality) over the grid points of
   the SOUL schedule plus the finetuned model itself (doing nothing is always a choice). Scalars that do not
   hang on one threshold: the best forget quality at utility floors of 90/95/98% of the finetuned model's,
   and the front score = mean of log10(best forget quality with utility >= u) over 16 floors u evenly from
   85% to 100% of the finetuned utility.
3. **Seeds**: per method x arm, the grid setting with the highest forget quality among those keeping >= 95%
   of the finetuned utility (ties: higher utility; none: highest utility) is rerun with seeds
   ``--seeds`` (1, 2, 3: not the grid's seed 0, so selection and report are separate runs) on forget10, then on
   forget05 and forget01.

Forget quality is always against retrain seed 1 of the split (the retrain seed 2 row is the ceiling). The
outputs (``soul_repro.{json,md,png}``; JSON: a list of rows with method, optimizer, split, lr, gamma,
schedule, seed, phase, forget_quality, model_utility and the other evaluation fields) are rewritten after
every phase, so a stopped run still leaves its finished phases; rerunning the command resumes, and
``--report-only`` writes the outputs from whatever has finished (the missing runs listed) without running more.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _runs import KEEP, ResumableRuns, select, slim  # noqa: E402

from soulkit._io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.unlearn.evaluate import conventions  # noqa: E402
from soulkit.unlearn.suite import UnlearningSuite, default_unlearn_config  # noqa: E402

METHODS = ("graddiff", "npo", "idk")
#: arm name -> (optimizer of the Unlearner, optimizer_kwargs)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "sophia": ("sophia", {"rho": 1.0, "hessian_bias_correction": False}),
    "sophia-hbc": ("sophia", {"rho": 1.0, "hessian_bias_correction": True}),
    "soul-released": ("soul-released", {}),
    "signum": ("signum", {}),
}
SPLITS = ("forget10", "forget05", "forget01")
SELECT_FLOOR = 0.95
REPORT_FLOORS = (0.90, 0.95, 0.98)
SCORE_FLOORS = tuple(0.85 + 0.01 * i for i in range(16))
FQ_FLOOR = 1e-30  # log10 of a forget quality of 0 (a diverged run)


def objective_kwargs(method: str, gamma: float) -> dict[str, Any]:
    """The objective's arguments: the retain term weighted by ``gamma`` (NPO gets the NLL retain term)."""
    return {"gamma": gamma, **({"retain_loss": "nll"} if method == "npo" else {})}


def front(points: list[dict]) -> list[dict]:
    """The Pareto front of ``points`` (maximise both model utility and forget quality), by utility."""
    best: list[dict] = []
    for p in sorted(points, key=lambda p: (-p["model_utility"], -p["forget_quality"])):
        if not best or p["forget_quality"] > best[-1]["forget_quality"]:
            best.append(p)
    return best[::-1]


def best_at_floor(points: list[dict], floor: float) -> dict | None:
    """The point with the highest forget quality (ties: higher utility) among those with utility >= floor."""
    ok = [p for p in points if p["model_utility"] >= floor]
    return max(ok, key=lambda p: (p["forget_quality"], p["model_utility"])) if ok else None


def front_score(points: list[dict], mu_ft: float) -> float:
    """Mean over :data:`SCORE_FLOORS` of log10 of the best forget quality keeping that fraction of ``mu_ft``
    (``points`` include the finetuned model, so every floor up to 100% has a point)."""
    vals = []
    for f in SCORE_FLOORS:
        b = best_at_floor(points, f * mu_ft - 1e-12)
        vals.append(math.log10(max(b["forget_quality"], FQ_FLOOR)) if b else math.log10(FQ_FLOOR))
    return statistics.fmean(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--splits", default=",".join(SPLITS), help="the first is the grid's split")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3")
    ap.add_argument("--gammas", default="0.3,1,3")
    ap.add_argument("--quick", action="store_true", help="graddiff; adamw, soul-released; lrs 1e-4,1e-3; "
                    "gammas 1,3; seed 1; forget10 only")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-results", action="store_true",
                    help="first take every run of the committed soul_repro.json into the partial file (same keys), "
                         "so that this invocation adds only the runs that json lacks")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the outputs from the finished runs of the partial file, listing the rest")
    args = ap.parse_args()
    if args.quick:
        args.methods, args.arms, args.lrs, args.gammas = "graddiff", "adamw,soul-released", "1e-4,1e-3", "1,3"
        args.seeds, args.splits = "1", "forget10"
    methods, arms, splits = args.methods.split(","), args.arms.split(","), args.splits.split(",")
    for a in arms:
        if a not in ARMS:
            ap.error(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    gammas = [float(x) for x in args.gammas.split(",")]
    if any(g < 0 for g in gammas):
        ap.error("--gammas must be >= 0")
    torch.set_num_threads(args.threads)
    grid_split = splits[0]

    suite = UnlearningSuite.from_scale(args.scale, cache_dir=args.cache_dir, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        seed_partial(args.out / "soul_repro.json", args.out / ".soul_repro.partial.json")
    run = ResumableRuns(args.out / ".soul_repro.partial.json")
    t_start = time.perf_counter()
    info = machine_info()
    eval_conf = {**asdict(suite.eval_config), "conventions": conventions(suite.eval_config)}

    refs: dict[tuple[str, str], dict] = {}
    for split in splits:
        refs[("finetuned", split)] = run(f"finetuned|{split}", lambda s=split: slim(
            suite.evaluate_dir(suite.finetuned_dir(), s)))
        refs[("retrain-seed2", split)] = run(f"retrain2|{split}", lambda s=split: slim(
            suite.evaluate_dir(suite.retrained_dir(s, 2), s)))
    mu_ft = refs[("finetuned", grid_split)]["model_utility"]
    n_forget = {s: len(suite.benchmark.split(s)[0]) for s in splits}

    def unlearn(method: str, arm: str, split: str, seed: int, lr: float, gamma: float, schedule: str) -> dict:
        opt, opt_kw = ARMS[arm]
        cfg = default_unlearn_config(method, opt, lr=lr, seed=seed, show_progress=False, optimizer_kwargs=opt_kw)
        if schedule == "soul":
            cfg = default_unlearn_config(method, opt, lr=lr, seed=seed, show_progress=False, optimizer_kwargs=opt_kw,
                                         schedule="linear",
                                         warmup_steps=max(1, round(0.1 * cfg.total_steps(n_forget[split]))))
        res, _ = suite.unlearn(method, opt, split, config=cfg, objective_kwargs=objective_kwargs(method, gamma))
        return slim(res)

    rows: list[dict] = []
    missing: list[str] = []  # --report-only: the planned runs not in the partial file

    def record(phase: str, method: str, arm: str, split: str, seed: int, lr: float, gamma: float,
               schedule: str) -> dict:
        key = f"{phase}|{method}|{arm}|{split}|{seed}|{lr:g}|{gamma:g}|{schedule}"
        if args.report_only and key not in run.done:
            missing.append(key)
            return None
        r = run(key, lambda: unlearn(method, arm, split, seed, lr, gamma, schedule))
        row = {"phase": phase, "method": method, "optimizer": arm, "split": split, "seed": seed, "lr": lr,
               "gamma": gamma, "schedule": schedule, **r}
        rows.append(row)
        return row

    def write(phases_done: str) -> None:
        out_rows = [{"phase": "reference", "method": name, "optimizer": None, "split": split, "seed": None,
                     "lr": None, "gamma": None, "schedule": None, **refs[(name, split)]}
                    for split in splits for name in ("finetuned", "retrain-seed2")] + rows
        for r in out_rows:
            r["machine"], r["scale"] = machine_line(info), args.scale
        atomic_write_json(args.out / "soul_repro.json", out_rows)
        atomic_write_text(args.out / "soul_repro.md", markdown(out_rows, refs, mu_ft, grid_split, info, args,
                                                              time.perf_counter() - t_start, phases_done, eval_conf))
        plot(out_rows, mu_ft, grid_split, args.out / "soul_repro.png")

    def grid(schedule: str, gammas_: list[float]) -> None:
        for method in methods:
            for arm in arms:
                for lr in lrs:
                    for gamma in gammas_:
                        record("grid", method, arm, grid_split, 0, lr, gamma, schedule)

    def seeds_on(split: str) -> None:
        for method in methods:
            for arm in arms:
                pts = [r for r in rows if r["phase"] == "grid" and r["method"] == method and r["optimizer"] == arm
                       and r["schedule"] == "soul"]
                if not pts:  # --report-only before this grid ran
                    continue
                c = select(pts, mu_ft, SELECT_FLOOR)  # the rule of step 3
                for seed in seeds:
                    record("seeds", method, arm, split, seed, c["lr"], c["gamma"], "soul")

    # phases in order of what the comparison needs most; the outputs are rewritten after each
    grid("soul", gammas)
    write("grid (SOUL's schedule)")
    seeds_on(grid_split)
    write(f"grid (SOUL's schedule), seeds on {grid_split}")
    grid("constant", [1.0])
    write(f"grid (both schedules), seeds on {grid_split}")
    for i, split in enumerate(splits[1:], start=2):
        seeds_on(split)
        write("grid (both schedules), seeds on " + ", ".join(splits[:i]))
    if args.report_only:
        left: dict[str, int] = {}
        for key in missing:
            phase, method, _, split, *_rest, schedule = key.split("|")
            name = f"{phase} {method} {split}" + (f" ({schedule} schedule)" if phase == "grid" else "")
            left[name] = left.get(name, 0) + 1
        write("a report of the finished runs only; not run: "
              + (", ".join(f"{n} ({c} runs)" for n, c in left.items()) or "nothing"))
        return
    run.finish()
    print((args.out / "soul_repro.md").read_text())


def seed_partial(results: Path, partial: Path) -> None:
    """Add the runs of a written ``soul_repro.json`` to the partial file under the keys ``main`` gives them
    (runs already in the partial file are kept as they are)."""
    done = json.loads(partial.read_text()) if partial.exists() else {}
    names = {"finetuned": "finetuned", "retrain-seed2": "retrain2"}
    added = 0
    for r in json.loads(results.read_text()):
        if r["phase"] == "reference":
            key = f"{names[r['method']]}|{r['split']}"
        else:
            key = (f"{r['phase']}|{r['method']}|{r['optimizer']}|{r['split']}|{r['seed']}|{r['lr']:g}|{r['gamma']:g}|"
                   f"{r['schedule']}")
        if key not in done:
            done[key] = {k: r.get(k) for k in (*KEEP, "wall_seconds", "error") if k in r}
            added += 1
    atomic_write_json(partial, done)
    print(f"{added} runs of {results} taken into {partial}", flush=True)


def _points(rows: list[dict], method: str, arm: str, split: str, schedule: str, ft: dict) -> list[dict]:
    pts = [r for r in rows if r["phase"] == "grid" and r["method"] == method and r["optimizer"] == arm
           and r["split"] == split and r["schedule"] == schedule]
    return pts + [{**ft, "lr": 0.0, "gamma": None, "finetuned": True}] if pts else []


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], refs: dict, mu_ft: float, grid_split: str, info: dict, args, total: float,
             phases_done: str, eval_conf: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["phase"] == "grid"))
    arms = list(dict.fromkeys(r["optimizer"] for r in rows if r["phase"] == "grid"))
    ft = refs[("finetuned", grid_split)]
    lines = [f"# SOUL put to a fair test (scale `{args.scale}`)", "",
             f"Machine: {machine_line(info)}. Command: `python benchmarks/soul_repro.py {' '.join(sys.argv[1:])}`; "
             f"{total / 60:.0f} min so far (cached models reused). Phases finished: {phases_done}.", "",
             "Protocol and selection rule (fixed before the run; `benchmarks/soul_repro.py`'s docstring): grid on "
             f"{grid_split} (seed 0) over lr x gamma with SOUL's schedule (10% warmup, linear decay), and over lr "
             "at gamma 1 with a constant lr; Pareto fronts of (model utility, forget quality) per method x arm, the "
             "finetuned model included; seeds rerun at the setting with the best forget quality keeping >= 95% of "
             f"the finetuned utility ({mu_ft:.3f}).", "",
             "Evaluation conventions: " + "; ".join(f"{k}: {v}" for k, v in eval_conf["conventions"].items()) + ".",
             "", "## References", "", "| split | model | FQ | MU | forget ROUGE |", "|---|---|---|---|---|"]
    for (name, split), r in refs.items():
        lines.append(f"| {split} | {name} | {r['forget_quality']:.2e} | {r['model_utility']:.3f} | "
                     f"{r['forget_rouge']:.3f} |")
    lines += ["", f"## Fronts on {grid_split} (SOUL's schedule, seed 0)", "",
              "Best FQ at a utility floor (fraction of the finetuned utility); front score = mean log10 of the best "
              "FQ over floors 85%..100% (higher is better; the finetuned model alone scores "
              f"{math.log10(max(ft['forget_quality'], FQ_FLOOR)):.2f}). Constant-schedule score in the last column "
              "(gamma 1).", "",
              "| method | arm | " + " | ".join(f"FQ @ MU>={f:.0%}" for f in REPORT_FLOORS)
              + " | front score | front score, gamma 1 only | constant schedule |",
              "|" + "---|" * (5 + len(REPORT_FLOORS))]
    for m in methods:
        for a in arms:
            pts = _points(rows, m, a, grid_split, "soul", ft)
            if not pts:
                continue
            g1 = [p for p in pts if p.get("finetuned") or p["gamma"] == 1.0]
            const = _points(rows, m, a, grid_split, "constant", ft)
            cells = []
            for f in REPORT_FLOORS:
                b = best_at_floor(pts, f * mu_ft)
                cells.append("-" if b is None else f"{b['forget_quality']:.2e} (finetuned)" if b.get("finetuned")
                             else f"{b['forget_quality']:.2e} (lr {b['lr']:g}, gamma {b['gamma']:g})")
            lines.append(f"| {m} | {a} | " + " | ".join(cells) + f" | {front_score(pts, mu_ft):.2f} | "
                         f"{front_score(g1, mu_ft):.2f} | {front_score(const, mu_ft) if const else float('nan'):.2f} |")
    seeds = [r for r in rows if r["phase"] == "seeds"]
    if seeds:
        lines += ["", "## Selected settings over seeds (mean ± sd)", "",
                  "| split | method | arm | lr | gamma | seeds | FQ | MU | forget ROUGE | win rate |",
                  "|" + "---|" * 10]
        groups: dict[tuple, list[dict]] = {}
        for r in seeds:
            groups.setdefault((r["split"], r["method"], r["optimizer"]), []).append(r)
        for (split, m, a), rs in groups.items():
            def ms(k: str, spec: str, rs=rs) -> str:
                v = [r[k] for r in rs if r.get(k) is not None]
                if not v:
                    return "-"
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                return f"{format(statistics.fmean(v), spec)} ± {format(sd, spec)}"
            lines.append(f"| {split} | {m} | {a} | {rs[0]['lr']:g} | {rs[0]['gamma']:g} | {len(rs)} | "
                         f"{ms('forget_quality', '.2e')} | {ms('model_utility', '.3f')} | {ms('forget_rouge', '.3f')} | "
                         f"{ms('mean_win_rate', '.3f')} |")
    lines += ["", f"## Grid ({grid_split}, seed 0)", "",
              "| method | arm | schedule | lr | gamma | FQ | MU | forget ROUGE | win rate |", "|" + "---|" * 9]
    for r in rows:
        if r["phase"] == "grid":
            lines.append(f"| {r['method']} | {r['optimizer']} | {r['schedule']} | {r['lr']:g} | {r['gamma']:g} | "
                         f"{r['forget_quality']:.2e} | {r['model_utility']:.3f} | {r['forget_rouge']:.3f} | "
                         f"{_fmt(r.get('mean_win_rate'), '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], mu_ft: float, grid_split: str, path: Path) -> None:
    """One panel per method: every grid point (faint), each arm's front (line) and its seed runs (mean, range)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows if r["phase"] == "grid"))
    arms = list(dict.fromkeys(r["optimizer"] for r in rows if r["phase"] == "grid"))
    ft = next(r for r in rows if r["method"] == "finetuned" and r["split"] == grid_split)
    rt = next(r for r in rows if r["method"] == "retrain-seed2" and r["split"] == grid_split)
    fig = Figure(figsize=(5.2 * len(methods), 4.6))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, m in zip(axes, methods):
        for i, a in enumerate(arms):
            pts = _points(rows, m, a, grid_split, "soul", ft)
            if not pts:
                continue
            color = f"C{i}"
            ax.scatter([p["model_utility"] for p in pts], [max(p["forget_quality"], FQ_FLOOR) for p in pts],
                       s=10, color=color, alpha=0.3)
            fr = front(pts)
            ax.plot([p["model_utility"] for p in fr], [max(p["forget_quality"], FQ_FLOOR) for p in fr],
                    color=color, lw=1.5, drawstyle="steps-pre", label=a)
            sd = [r for r in rows if r["phase"] == "seeds" and r["method"] == m and r["optimizer"] == a
                  and r["split"] == grid_split]
            if sd:
                mu = [r["model_utility"] for r in sd]
                fq = [max(r["forget_quality"], FQ_FLOOR) for r in sd]
                x, y = statistics.fmean(mu), statistics.fmean(fq)  # bars: the range over seeds (log-safe)
                ax.errorbar(x, y, xerr=[[x - min(mu)], [max(mu) - x]], yerr=[[y - min(fq)], [max(fq) - y]],
                            color=color, marker="D", ms=6, capsize=3)
        ax.axvline(SELECT_FLOOR * mu_ft, color="gray", lw=0.8, ls=":")
        ax.axhline(rt["forget_quality"], color="green", lw=0.8, ls="--", label="retrain seed 2")
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality vs retrain")
        ax.set_title(f"{m} ({grid_split}): fronts; diamonds: selected, mean and range over seeds", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
