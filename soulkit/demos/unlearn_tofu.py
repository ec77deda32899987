"""The unlearning story of ``soulkit demo``: SOUL (Sophia) vs AdamW on the fictitious-author benchmark.

Generates the benchmark at the ``demo`` scale (20 authors x 10 QA), trains the tiny Llama (world
knowledge, then all authors) and two exact retrains without the forget10 authors, unlearns forget10
with GradDiff and NPO under AdamW and under Sophia, evaluates everything against the retrain, prints
the table and writes ``unlearning.{md,json,png}`` (forget quality vs model utility). Models are
cached under ``<out>/cache``, so a second run skips the training.

    from soulkit.demos.unlearn_tofu import run_unlearning_demo
    print(run_unlearning_demo("soulkit-demo/unlearn").table)
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..unlearn.models import model_meta
from ..unlearn.suite import UnlearningSuite, default_unlearn_config

__all__ = ["UnlearnDemoResult", "run_unlearning_demo", "results_table", "plot_tradeoff"]

_COLUMNS = [("forget_quality", "forget quality", ".2e"), ("ks_statistic", "KS stat", ".3f"),
            ("model_utility", "model utility", ".3f"), ("forget_rouge", "forget ROUGE", ".3f"),
            ("retain_rouge", "retain ROUGE", ".3f"), ("seconds", "wall s", ".1f")]


@dataclass
class UnlearnDemoResult:
    rows: list[dict[str, Any]]
    table: str
    paths: dict[str, str] = field(default_factory=dict)


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per model (finetuned, retrain, method x optimizer)."""
    lines = ["| model | " + " | ".join(c[1] for c in _COLUMNS) + " |", "|---|" + "---:|" * len(_COLUMNS)]
    for r in rows:
        cells = ["-" if r.get(k) is None else format(r[k], spec) for k, _, spec in _COLUMNS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Forget quality (log scale) against model utility, one point per row; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    markers = {"adamw": "o", "sophia": "*", None: "s"}
    for r in rows:
        fq = max(r.get("forget_quality") or 1e-300, 1e-300)
        ax.scatter(r["model_utility"], fq, marker=markers.get(r.get("optimizer"), "s"), s=90 if r.get("optimizer")
                   == "sophia" else 50, label=r["name"])
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality vs retrain (higher is better)")
    ax.set_title(title or "unlearning: forget quality vs utility")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def run_unlearning_demo(out: str | os.PathLike, *, split: str = "forget10", methods: Sequence[str] = ("graddiff", "npo"),
                        optimizers: Sequence[str] = ("adamw", "sophia"), scale: str = "demo",
                        progress: bool | None = None) -> UnlearnDemoResult:
    """Run the story into ``out`` and return the rows, the markdown table and the written paths."""
    out = Path(out)
    suite = UnlearningSuite.from_scale(scale, cache_dir=out / "cache", progress=progress)
    rows: list[dict[str, Any]] = []
    ft = suite.finetuned_dir()
    res = suite.evaluate_dir(ft, split)
    rows.append({"name": "finetuned", **res, "seconds": model_meta(ft)["seconds"]})
    rt = suite.retrained_dir(split, 2)
    res = suite.evaluate_dir(rt, split)
    rows.append({"name": "retrain (seed 2)", **res, "seconds": model_meta(rt)["seconds"]})
    for method in methods:
        for opt in optimizers:
            res, _ = suite.unlearn(method, opt, split, config=default_unlearn_config(
                method, opt, show_progress=progress))
            rows.append({"name": f"{method} x {opt}", **res, "seconds": res["unlearn_seconds"]})
    for r in rows:
        r.pop("raw", None)
    table = results_table(rows)
    bench = suite.benchmark
    header = (f"Unlearning {split} ({len(bench.split(split)[0])} QA of {len(bench.forget_authors(split))} authors) "
              f"from a tiny Llama fine-tuned on {len(bench.authors)} fictitious authors; forget quality is the "
              f"KS-test p-value against an exact retrain (seed 1). SOUL = the Sophia rows. wall s: training time "
              f"(finetuned, retrain) or unlearning time (without evaluation).")
    paths = {"md": str(out / "unlearning.md"), "json": str(out / "unlearning.json"), "png": str(out / "unlearning.png")}
    atomic_write_text(paths["md"], header + "\n\n" + table + "\n")
    atomic_write_json(paths["json"], rows)
    plot_tradeoff(rows, paths["png"], title=f"{split}: forget quality vs utility ({scale} scale)")
    return UnlearnDemoResult(rows=rows, table=header + "\n\n" + table + "\n\nwrote " + ", ".join(paths.values()),
                             paths=paths)
