"""TOFU-style baselines: the finetuned model and the exact retrains, evaluated on forget01/05/10.

    python benchmarks/tofu_baselines.py                     # --scale small (default): 40 authors x 20 QA
    python benchmarks/tofu_baselines.py --scale tofu        # TOFU's 200 x 20 (a bigger machine)

Builds (or reuses from the cache) the benchmark's models: the base model (world knowledge), the
finetuned model (all authors) and two retrains per split (seeds 1 and 2, never trained on the
split's forget authors), and evaluates each on each split. Retrain seed 1 is the reference of forget
quality and privleak; its own row scores 1.0 by construction. Retrain seed 2 against seed 1 is the
realistic ceiling. Stage wall times come from the models' metadata (seconds of training) and this
run (seconds of evaluation).

Writes ``benchmarks/results/tofu_baselines.{json,md}``: a list of rows with ``model``, ``split`` and
the fields of ``soulkit evaluate``'s ``results.json`` (and the machine), and ``tofu_baselines_run.json``
with the recipe, fine-tune epochs, ROUGE checks and stage times.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.unlearn.evaluate import conventions  # noqa: E402
from soulkit.unlearn.models import model_meta  # noqa: E402
from soulkit.unlearn.suite import SCALES, UnlearningSuite  # noqa: E402

SPLITS = ("forget01", "forget05", "forget10")
COLUMNS = [("forget_quality", "FQ", ".2e"), ("ks_statistic", "KS", ".3f"), ("model_utility", "MU", ".3f"),
           ("forget_rouge", "forget ROUGE", ".3f"), ("retain_rouge", "retain ROUGE", ".3f"),
           ("forget_probability", "forget prob", ".3f"), ("forget_truth_ratio", "forget TR", ".3f"),
           ("extraction_strength", "ES", ".3f"), ("exact_memorization", "EM", ".3f")]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], info: dict, scale: str, stage_seconds: dict, total: float) -> str:
    lines = [f"# TOFU-style baselines (scale `{scale}`: {SCALES[scale].description})", "",
             f"Machine: {machine_line(info)}. Command: `python benchmarks/tofu_baselines.py --scale {scale}`.", "",
             "FQ = forget quality (KS-test p-value of forget-set truth-ratio statistics vs retrain seed 1); "
             "MU = model utility; TR = truth ratio; ES = extraction strength; EM = exact memorization; "
             "MIA = AUC forget vs holdout of the LOSS and Min-K% attacks, privleak of LOSS. retrain-seed1 is the "
             "reference (FQ 1 by construction); retrain-seed2 is the realistic ceiling.", "",
             "Evaluation conventions (results.json `config.conventions`): "
             + "; ".join(f"{k}: {v}" for k, v in conventions(SCALES[scale].eval).items()) + ".", ""]
    head = "| split | model | " + " | ".join(c[1] for c in COLUMNS) + " | MIA AUC LOSS | MIA AUC Min-K | privleak |"
    lines += [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for r in rows:
        auc = r.get("mia_auc") or {}
        pl = (r.get("privleak") or {}).get("loss")
        lines.append(f"| {r['split']} | {r['model']} | " + " | ".join(_fmt(r.get(k), s) for k, _, s in COLUMNS)
                     + f" | {_fmt(auc.get('loss'), '.3f')} | {_fmt(auc.get('min_k'), '.3f')} | {_fmt(pl, '.1f')} |")
    lines += ["", "Stage wall times (training, seconds): "
              + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()) + f"; whole run {total:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="small", choices=sorted(SCALES))
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--cache-dir", default=None, help="model cache (default $SOULKIT_CACHE or ~/.cache/soulkit)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = UnlearningSuite.from_scale(args.scale, cache_dir=args.cache_dir, progress=True)
    rows, stage_seconds = [], {}
    ft = suite.finetuned_dir()
    stage_seconds["base"] = model_meta(suite.zoo.base())["seconds"]
    stage_seconds["finetuned"] = model_meta(ft)["seconds"]
    for split in args.splits.split(","):
        for seed in (1, 2):
            d = suite.retrained_dir(split, seed)
            stage_seconds[f"retrain-{split}-seed{seed}"] = model_meta(d)["seconds"]
        for name, d in [("finetuned", ft), ("retrain-seed1", suite.retrained_dir(split, 1)),
                        ("retrain-seed2", suite.retrained_dir(split, 2))]:
            t = time.perf_counter()
            res = suite.evaluate_dir(d, split)
            res.pop("raw", None)
            rows.append({"model": name, "split": split, **res, "eval_wall_seconds": time.perf_counter() - t})
            print(f"{split} {name}: FQ {res['forget_quality']:.3g} KS {res['ks_statistic']:.3f} "
                  f"MU {res['model_utility']:.3f} forget ROUGE {res['forget_rouge']:.3f}", flush=True)
    total = time.perf_counter() - t0
    info = machine_info()
    ft_meta = model_meta(ft)
    for r in rows:
        r.update(scale=args.scale, machine=machine_line(info))
    run = {"machine": info, "scale": args.scale, "n_authors": len(suite.benchmark.authors),
           "n_qa": len(suite.benchmark.qa), "recipe": ft_meta.get("recipe"), "finetune_epochs":
           ft_meta["train"]["epochs"], "finetune_rouge_checks": ft_meta.get("rouge_checks"),
           "stage_seconds": stage_seconds, "total_seconds": total,
           "eval_config": {**asdict(suite.eval_config), "conventions": conventions(suite.eval_config)}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "tofu_baselines.json", rows)
    atomic_write_json(args.out / "tofu_baselines_run.json", run)
    atomic_write_text(args.out / "tofu_baselines.md", markdown(rows, info, args.scale, stage_seconds, total))
    print(markdown(rows, info, args.scale, stage_seconds, total))


if __name__ == "__main__":
    main()
