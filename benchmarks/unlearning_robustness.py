"""Does it stay forgotten? Every attack and probe of ``soulkit attack`` on every objective x optimizer.

    python benchmarks/unlearning_robustness.py            # small scale, forget10, seeds 1,2,3 (~2.2 h at 1 thread)
    python benchmarks/unlearning_robustness.py --quick    # npo x adamw/sophia, seed 1, no sequential (smoke run)

Protocol (issue 16), on the benchmark models of ``benchmarks/tofu_baselines.py`` (built or reused from
the cache):

1. For each method x optimizer at the settings ``benchmarks/unlearning.py`` selects
   (:func:`soulkit.unlearn.suite.default_unlearn_config`) and each unlearning seed, the split is unlearned
   once from the finetuned model and the model saved under ``--work``.
2. Every attack of :mod:`soulkit.unlearn.attacks` runs on it, each with the split's retrain (seed 1) as
   the control: int4 and int8 quantization, relearning on the forget half and on related text (budgets
   10/25/50, the relearning seed = the unlearning seed), the held-out-phrasing, multi-hop,
   neighbour-author and two-shot probes. The two ends are attacked the same way: the finetuned model
   (knows everything) and retrain seed 2 (never saw the forget authors).
3. Sequential requests (forget01-sized, four, from the finetuned model) per method x optimizer x seed.

Writes ``benchmarks/results/unlearning_robustness<tag>.{json,md,png}`` (JSON: one row per model and
attack with the attack's headline numbers) and keeps a partial file so an interrupted run resumes. On
2 cores, run seeds in two processes (``--seeds 1 --tag _s1 --keep-partial``; ``--seeds 2 --no-ends --tag _s2
--keep-partial``; ...), then write the table with ``--report-only --merge`` of each partial file.
The md leads with the per-seed numbers and "Sophia vs AdamW at equal forgetting": each recovery regressed
on the forget ROUGE before the attack and a Sophia indicator over every unlearned model and seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _runs import ResumableRuns  # noqa: E402

from soulkit._io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.unlearn.attacks import AttackConfig, run_attack  # noqa: E402
from soulkit.unlearn.suite import UnlearningSuite, default_unlearn_config  # noqa: E402

METHODS = ("ga", "graddiff", "npo", "simnpo", "idk")
OPTIMIZERS = ("adamw", "sophia")
BUDGETS = (10, 25, 50)


def attack_configs(seed: int) -> dict[str, AttackConfig]:
    """The attacks every model gets (name -> config); relearning draws its halves and order from ``seed``."""
    return {
        "quantize-int4": AttackConfig("quantize", bits=4),
        "quantize-int8": AttackConfig("quantize", bits=8),
        "relearn-forget-half": AttackConfig("relearn", steps=BUDGETS, seed=seed),
        "relearn-related": AttackConfig("relearn", steps=BUDGETS, seed=seed, relearn_data="related"),
        "phrasings": AttackConfig("phrasings"),
        "multihop": AttackConfig("multihop"),
        "neighbours": AttackConfig("neighbours"),
        "few-shot": AttackConfig("few-shot", shots=2),
    }


def headline(name: str, res: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table shows for one attack's results (all higher = more of the forget set known, except
    model utility and the neighbour sets' scores, which are retain knowledge)."""
    before, after, control = res["before"], res["after"], res["control"]
    if name.startswith("quantize"):
        return {"forget_rouge_before": before["forget_rouge"], "forget_rouge": after["forget_rouge"],
                "forget_probability": after["forget_probability"], "forget_quality": after["forget_quality"],
                "model_utility": after["model_utility"], "rouge_excess": res["recovery"]["forget_rouge"]["excess"],
                "control_forget_rouge": control["after"]["forget_rouge"]}
    if name.startswith("relearn"):
        out = {"forget_rouge_before": before["forget_rouge"]}
        for b in map(str, BUDGETS):
            out[f"forget_rouge_{b}"] = after[b]["forget_rouge"]
            out[f"control_forget_rouge_{b}"] = control["after"][b]["forget_rouge"]
            out[f"rouge_excess_{b}"] = res["recovery"][b]["forget_rouge"]["excess"]
            out[f"probability_excess_{b}"] = res["recovery"][b]["forget_probability"]["excess"]
        return out
    if name in ("phrasings", "multihop"):
        return {"rouge_trained": before["forget_rouge"], "rouge_probe": after["forget_rouge"],
                "probability_probe": after["forget_probability"], "value_hit_probe": after["forget_value_hit"],
                "control_rouge_probe": control["after"]["forget_rouge"],
                "control_probability_probe": control["after"]["forget_probability"],
                "model_utility": res["evaluation"]["model_utility"]}
    if name == "neighbours":
        keep = ("shared_fact_rouge", "neighbour_rouge", "other_retain_rouge", "shared_fact_probability",
                "neighbour_probability", "other_retain_probability")
        return {**{k: after.get(k) for k in keep}, **{f"control_{k}": control["after"].get(k) for k in keep},
                "n_neighbours": res["neighbours"]["n_neighbours"], "model_utility": res["evaluation"]["model_utility"]}
    if name == "few-shot":
        return {"forget_rouge": before["forget_rouge"], "forget_rouge_few_shot": after["forget_rouge"],
                "control_forget_rouge_few_shot": control["after"]["forget_rouge"],
                "rouge_excess": res["recovery"]["forget_rouge"]["excess"]}
    if name == "sequential":
        out = {"model_utility_0": before["model_utility"]}
        for j, a in after.items():
            out[f"model_utility_{j}"] = a["model_utility"]
            out[f"forget_rouge_{j}"] = a["forget_rouge"]  # the requests so far
            out[f"forget_quality_{j}"] = a["forget_quality"]
            out[f"first_request_rouge_{j}"] = res["per_request"][j][0]["rouge"]
        out["first_request_rouge_0"] = res["per_request"]["0"][0]["rouge"]
        return out
    raise ValueError(f"no headline for attack {name!r}")


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.fmean(v) if v else None


def _f(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def aggregate(rows: list[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model label, attack) -> the mean over seeds of each headline number, with ``n`` seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("numbers"):  # a run whose model diverged has none (ResumableRuns records its error)
            groups.setdefault((r["model"], r["attack"]), []).append(r["numbers"])
    return {key: {"n": len(vs), **{k: _mean([v.get(k) for v in vs]) for k in vs[0]}} for key, vs in groups.items()}


def run_key(model: str, seed: int | None, split: str, attack: str) -> str:
    """The key of one finished attack in the partial file (and of a row of the written JSON)."""
    return f"{model}|{seed}|{split}|{attack}"


def _by_run(rows: list[dict]) -> dict[tuple[str, int | None, str], dict[str, Any]]:
    """(model, seed, attack) -> headline numbers of the rows that have them."""
    return {(r["model"], r["seed"], r["attack"]): r["numbers"] for r in rows if r.get("numbers")}


#: Where a model's state before any attack is read: the int8 attack's "before" (quantization changes nothing
#: before it runs, and every model gets it).
BEFORE = "quantize-int8"

#: The per-seed summary: (column, attack, headline key).
PER_SEED = (("forget ROUGE", BEFORE, "forget_rouge_before"), ("utility", BEFORE, "model_utility"),
            ("int4 excess", "quantize-int4", "rouge_excess"),
            (f"relearn {BUDGETS[-1]} excess", "relearn-forget-half", f"rouge_excess_{BUDGETS[-1]}"),
            (f"related {BUDGETS[-1]} excess", "relearn-related", f"rouge_excess_{BUDGETS[-1]}"),
            ("phrasings ROUGE", "phrasings", "rouge_probe"), ("2-shot excess", "few-shot", "rouge_excess"),
            ("seq. utility after 4", "sequential", "model_utility_4"),
            ("seq. 1st author ROUGE after 4", "sequential", "first_request_rouge_4"))


def per_seed_table(rows: list[dict], labels: list[str]) -> list[str]:
    """One line per model and unlearning seed with the headline numbers, so the spread over seeds behind
    each mean shows (markdown lines)."""
    by = _by_run(rows)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    out = ["## Per seed", "", "Headline numbers of each unlearning seed (the ends: one row). Forget ROUGE and "
           "utility before any attack; excess = attacked model minus attacked control.", "",
           "| model | seed | " + " | ".join(c for c, _, _ in PER_SEED) + " |", "|---" * (len(PER_SEED) + 2) + "|"]
    for label in labels:
        for seed in (None, *seeds):
            vals = [(by.get((label, seed, a)) or {}).get(k) for _, a, k in PER_SEED]
            if any(v is not None for v in vals):
                out.append(f"| {label} | {'-' if seed is None else seed} | " + " | ".join(map(_f, vals)) + " |")
    return [*out, ""]


#: What "more robust at equal forgetting" is judged on: (column, attack, headline key) of the recovery, each
#: regressed on the forget ROUGE before the attack and a Sophia indicator.
EQUAL_FORGETTING = (
    (f"relearn {BUDGETS[-1]} excess", "relearn-forget-half", f"rouge_excess_{BUDGETS[-1]}"),
    (f"related {BUDGETS[-1]} excess", "relearn-related", f"rouge_excess_{BUDGETS[-1]}"),
    ("int4 excess", "quantize-int4", "rouge_excess"), ("phrasings ROUGE", "phrasings", "rouge_probe"))


def _points(rows: list[dict], attack: str, key: str) -> list[tuple[float, float, int]]:
    """(forget ROUGE before, recovery, is Sophia) for each unlearned model and seed."""
    by = _by_run(rows)
    pts = []
    for (model, seed, a), nums in by.items():
        base = by.get((model, seed, BEFORE))
        if a != attack or seed is None or base is None or nums.get(key) is None or " x " not in model:
            continue
        pts.append((base["forget_rouge_before"], nums[key], int(model.endswith(" x sophia"))))
    return pts


def sophia_offset(points: list[tuple[float, float, int]]) -> dict[str, float] | None:
    """Least squares ``recovery = a + b * forget_rouge_before + c * is_sophia``: ``c`` is how much more a
    Sophia model recovers than an AdamW model that forgot as much (its standard error from the residuals).
    None with fewer than five points or without both optimizers."""
    import numpy as np

    if len(points) < 5 or len({p[2] for p in points}) < 2:
        return None
    x = np.array([[1.0, p[0], p[2]] for p in points])
    y = np.array([p[1] for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    dof = len(y) - 3
    cov = (resid @ resid / dof) * np.linalg.inv(x.T @ x) if dof > 0 else np.full((3, 3), np.nan)
    return {"sophia": float(coef[2]), "sophia_se": float(np.sqrt(cov[2, 2])), "slope": float(coef[1]),
            "n": len(points)}


def equal_forgetting_table(rows: list[dict]) -> list[str]:
    out = ["## Sophia vs AdamW at equal forgetting", "",
           "Each recovery regressed over every unlearned model and seed on its forget ROUGE before the attack and "
           "a Sophia indicator (least squares): `Sophia offset` is how much more a Sophia model recovers than an "
           "AdamW model that had forgotten as much (negative: Sophia more robust), +- its standard error. Rule "
           "fixed before the third seed ran; the models also differ in utility, which this does not hold equal.",
           "", "| recovery | points | slope on forget ROUGE before | Sophia offset | +- s.e. |", "|---|---|---|---|---|"]
    for col, attack, key in EQUAL_FORGETTING:
        fit = sophia_offset(_points(rows, attack, key))
        if fit is not None:
            out.append(f"| {col} | {fit['n']} | {fit['slope']:.3f} | {fit['sophia']:+.3f} | {fit['sophia_se']:.3f} |")
    return [*out, ""]


def model_set_line(zoo) -> str:
    """Which models were attacked: the zoo key and, from the cached fine-tune's metadata (never building it),
    its epochs and where it was built. Models rebuilt on another CPU or library stack need not be these."""
    from soulkit.unlearn.models import model_meta

    meta = model_meta(zoo.root / "finetuned")
    if not meta:
        return f"Models: zoo key `{zoo.key}` (no fine-tune cached here)."
    built = meta.get("built_with") or {}
    where = f", built on {built['cpu']} with transformers {built.get('transformers')}" if built.get("cpu") else ""
    return (f"Models: zoo key `{zoo.key}`; the fine-tune ran {meta['train']['epochs']} epochs (probe ROUGE "
            f"{meta['rouge_checks'][-1]['rouge']:.4f}){where}.")


def markdown(rows: list[dict], labels: list[str], info: dict, args, total: float, models: str = "") -> str:
    agg = aggregate(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = [f"# Does it stay forgotten? ({args.scale} scale, {args.split})", "",
             f"Machine: {machine_line(info)}. Command: `python benchmarks/unlearning_robustness.py "
             f"{' '.join(sys.argv[1:])}`. The attacks took {total / 60:.0f} min (the sum of the rows' wall times; "
             f"runs merged from other processes included). {models}", "",
             "Every unlearned model (method x optimizer at the settings benchmarks/unlearning.py selects, mean over "
             f"unlearning seeds {args.seeds}) and the two ends (the finetuned model; retrain seed 2, which never saw "
             "the forget authors) under each attack of `soulkit attack`, the split's retrain (seed 1) attacked the "
             "same way as the control. `excess` = attacked model minus attacked control: what an attack brings back "
             "beyond what it teaches a model that never saw the authors.", "", *equal_forgetting_table(rows),
             *per_seed_table(rows, labels)]
    for attack in attacks:
        keys = [k for k in next(v for (m, a), v in agg.items() if a == attack) if k != "n"]
        lines += [f"## {attack}", "", "| model | seeds | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        for label in labels:
            v = agg.get((label, attack))
            if v is not None:
                lines.append(f"| {label} | {v['n']} | " + " | ".join(_f(v.get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    """Forget ROUGE after each attack (mean over seeds), one line per model; the ends dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    agg = aggregate(rows)
    cols = [("no attack", "quantize-int4", "forget_rouge_before"), ("int4", "quantize-int4", "forget_rouge"),
            ("int8", "quantize-int8", "forget_rouge"),
            (f"relearn {BUDGETS[-1]}", "relearn-forget-half", f"forget_rouge_{BUDGETS[-1]}"),
            (f"related {BUDGETS[-1]}", "relearn-related", f"forget_rouge_{BUDGETS[-1]}"),
            ("phrasings", "phrasings", "rouge_probe"), ("multihop", "multihop", "rouge_probe"),
            ("2-shot", "few-shot", "forget_rouge_few_shot")]
    fig = Figure(figsize=(15, 5.5))
    ax, sc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    ends = {"finetuned": "black", "retrain-seed2": "gray"}
    for i, label in enumerate(labels):
        ys = [(agg.get((label, a)) or {}).get(k) for _, a, k in cols]
        if ys[0] is None:  # no attack: before either quantization
            ys[0] = (agg.get((label, BEFORE)) or {}).get("forget_rouge_before")
        ax.plot(range(len(cols)), [float("nan") if y is None else y for y in ys],
                marker="o" if label in ends else "*", ls="--" if label in ends else "-",
                color=ends.get(label, f"C{i % 10}"), label=label, alpha=0.9)
    ax.set_xticks(range(len(cols)), [c for c, _, _ in cols], rotation=20)
    ax.set_ylabel("forget ROUGE-L recall (held-out half for relearning)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Does it stay forgotten? forget ROUGE after each attack")
    # the right panel: what relearning brings back against how much each model had forgotten, per seed
    _, attack, key = EQUAL_FORGETTING[0]
    pts = _points(rows, attack, key)
    for flag, name, marker in ((0, "AdamW", "o"), (1, "Sophia", "^")):
        xy = [(p[0], p[1]) for p in pts if p[2] == flag]
        if xy:
            sc.scatter(*zip(*xy), marker=marker, label=f"{name} (model x seed)", alpha=0.8)
    for label, color in ends.items():
        v = (agg.get((label, attack)) or {}).get(key)
        x = (agg.get((label, BEFORE)) or {}).get("forget_rouge_before")
        if v is not None and x is not None:
            sc.scatter([x], [v], marker="s", color=color, label=label)
    sc.set_xlabel("forget ROUGE before the attack")
    sc.set_ylabel(f"relearning ({BUDGETS[-1]} steps): ROUGE excess over the control")
    sc.set_title("recovery at equal forgetting")
    sc.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


#: The fields report() adds to a finished run when it writes the JSON (everything else is the run's own).
_ROW_FIELDS = ("model", "seed", "attack", "machine", "scale", "split")


def merged_runs(path: Path, scale: str, split: str) -> dict[str, dict[str, Any]]:
    """The finished attacks of ``path`` under the keys :func:`main` gives them: ``path`` is the partial file
    of another process of this benchmark (key -> run) or a written ``unlearning_robustness*.json`` (a list of
    rows, as committed). Rows of another scale or split are left out of a written JSON; its runs keep their
    numbers and wall times."""
    import json

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        return data
    if not isinstance(data, list) or not all(isinstance(r, dict) and "attack" in r for r in data):
        raise SystemExit(f"--merge {path}: neither a partial file (an object) nor a results JSON (a list of rows)")
    return {run_key(r["model"], r["seed"], split, r["attack"]): {k: v for k, v in r.items() if k not in _ROW_FIELDS}
            for r in data if r.get("scale") == scale and r.get("split") == split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small")
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--attacks", default=None, help="comma-separated names of attack_configs() (default: all)")
    ap.add_argument("--no-sequential", action="store_true", help="skip the sequential requests")
    ap.add_argument("--quick", action="store_true", help="npo; adamw, sophia; seed 1; no sequential")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help="where the unlearned models go (default: <cache>/robustness/<zoo key>)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: more oversubscribe a shared machine)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--sequential-only", action="store_true", help="only the sequential requests (implies --no-ends)")
    ap.add_argument("--no-ends", action="store_true", help="skip the two ends (a process that adds other seeds)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="partial file of another process of this benchmark (e.g. one run with --seeds 2 --no-ends "
                         "--tag _seed2), or a written results JSON: its finished attacks are taken in as if run here")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the outputs from the finished attacks, listing the missing ones")
    ap.add_argument("--keep-partial", action="store_true", help="keep the partial file once the outputs are written")
    args = ap.parse_args()
    if args.quick:
        args.methods, args.seeds, args.no_sequential = "npo", "1", True
    torch.set_num_threads(args.threads)
    methods, optimizers = args.methods.split(","), args.optimizers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(attack_configs(0)) if args.attacks is None else args.attacks.split(",")
    unknown = set(names) - set(attack_configs(0))
    if unknown:
        raise SystemExit(f"unknown attack(s) {sorted(unknown)}; choose from {', '.join(attack_configs(0))}")

    suite = UnlearningSuite.from_scale(args.scale, cache_dir=args.cache_dir, progress=False)
    suite.benchmark.split(args.split)
    work = args.work or suite.zoo.root.parent.parent / "robustness" / suite.zoo.key
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"unlearning_robustness{args.tag}"
    run = ResumableRuns(args.out / f".{stem}.partial.json", verbose=False)
    for other in args.merge:
        run.done.update({k: v for k, v in merged_runs(other, args.scale, args.split).items() if k not in run.done})
    missing: list[str] = []
    if args.report_only and not run.done:  # never overwrite finished outputs with an empty table
        raise SystemExit(f"--report-only: no finished attack in {run.path} (or --merge): nothing to report")

    def unlearned(method: str, opt: str, seed: int) -> Path:
        out_dir = work / args.split / f"{method}-{opt}-seed{seed}"
        if not (out_dir / "model").is_dir():
            cfg = default_unlearn_config(method, opt, seed=seed, show_progress=False)
            suite.unlearn(method, opt, args.split, config=cfg, out_dir=out_dir, evaluate=False)
        return out_dir / "model"

    # (label, unlearning seed); each model is built or found only when its first attack runs, so a
    # --report-only or --no-ends process trains nothing it does not attack
    models: list[tuple[str, int | None]] = [("finetuned", None), ("retrain-seed2", None)]
    models += [(f"{m} x {o}", s) for s in seeds for m in methods for o in optimizers]
    labels = list(dict.fromkeys(label for label, _ in models))
    rows: list[dict] = []
    memo: dict = {}  # what does not depend on the attacked model (the controls), computed once

    def report() -> None:
        """Write the results so far (after each model: an interrupted run leaves its tables)."""
        info = machine_info()
        done = [{**r, "machine": machine_line(info), "scale": args.scale, "split": args.split} for r in rows]
        atomic_write_json(args.out / f"{stem}.json", done)
        md = markdown(done, labels, info, args, sum(r.get("wall_seconds") or 0.0 for r in rows),
                      model_set_line(suite.zoo))
        n_done = len({(r["model"], r["seed"]) for r in rows if r["attack"] != "sequential"})
        n_seq = sum(r["attack"] == "sequential" for r in rows)
        if n_done < len(models) or (not args.no_sequential and n_seq < len(methods) * len(optimizers) * len(seeds)):
            title, rest = md.split("\n", 1)
            md = (f"{title}\n\n**Incomplete**: {n_done} of {len(models)} models attacked, {n_seq} sequential runs "
                  f"done; rerun the same command to continue.\n{rest}")
        atomic_write_text(args.out / f"{stem}.md", md)
        plot(done, labels, args.out / f"{stem}.png")
    def model_dir_of(label: str, seed: int | None) -> Path | None:
        """The attacked model's directory (None: the finetuned model, ``run_attack``'s default)."""
        if label == "finetuned":
            return None
        if label == "retrain-seed2":
            return suite.retrained_dir(args.split, 2)
        method, opt = label.split(" x ")
        return unlearned(method, opt, seed)

    def attack_model(label: str, seed: int | None) -> None:
        for name in names:
            cfg = attack_configs(seed or 0)[name]
            key = run_key(label, seed, args.split, name)

            def attack(label=label, seed=seed, name=name, cfg=cfg) -> dict:
                model_dir = model_dir_of(label, seed)
                res = run_attack(suite, args.split, cfg, model_dir=model_dir, cache=memo)
                nums = headline(name, res)
                print(f"{label} seed {seed} {name}: " + ", ".join(f"{k} {_f(v)}" for k, v in list(nums.items())[:4]),
                      flush=True)
                # ResumableRuns prints and records these three; an attack has no single forget quality
                return {"numbers": nums, "forget_quality": None, "model_utility": None, "forget_rouge": None,
                        "attack_seconds": res["attack_seconds"]}

            if args.report_only and key not in run.done:
                missing.append(key)
                continue
            r = run(key, attack)
            rows.append({"model": label, "seed": seed, "attack": name, **r})
        report()

    def sequential_run(method: str, opt: str, seed: int) -> None:
        cfg = AttackConfig("sequential", method=method, optimizer=opt, seed=seed)
        key = run_key(f"{method} x {opt}", seed, args.split, "sequential")
        if args.report_only and key not in run.done:
            missing.append(key)
            return

        def sequential() -> dict:
            res = run_attack(suite, args.split, cfg)
            return {"numbers": headline("sequential", res), "forget_quality": None, "model_utility": None,
                    "forget_rouge": None, "attack_seconds": res["attack_seconds"]}

        rows.append({"model": f"{method} x {opt}", "seed": seed, "attack": "sequential", **run(key, sequential)})
        report()

    # seed by seed (the two ends first): a stopped run has every model and request of its first seeds
    for label, seed in models:
        if seed is None and not (args.no_ends or args.sequential_only):
            attack_model(label, seed)
    for s in seeds:
        for label, seed in models:
            if seed == s and not args.sequential_only:
                attack_model(label, seed)
        if not args.no_sequential:
            for method in methods:
                for opt in optimizers:
                    sequential_run(method, opt, s)
    report()
    if missing:
        print(f"not run ({len(missing)}): " + ", ".join(missing))
    elif not args.keep_partial:
        run.finish()
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
