"""What the unlearning benchmarks share: the result fields they keep and a resumable table of runs.

A benchmark that makes hundreds of unlearning runs keys each by a string and keeps every finished
result in a hidden partial JSON file beside its outputs, so an interrupted run continues where it
stopped; the file goes once the outputs are written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soulkit._io import atomic_write_json

#: The fields of an evaluation (``results.json``) the benchmark tables keep.
KEEP = ("forget_quality", "ks_statistic", "forget_quality_ceiling", "model_utility", "forget_rouge", "retain_rouge",
        "forget_probability", "retain_probability", "forget_truth_ratio", "real_authors_rouge", "world_facts_rouge",
        "mia_auc", "privleak", "extraction_strength", "exact_memorization", "unlearn_seconds", "steps", "stopped",
        "mean_win_rate", "final_loss")


def slim(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` reduced to :data:`KEEP` (missing fields as ``None``)."""
    return {k: res.get(k) for k in KEEP}


def select(rows: list[dict[str, Any]], mu_ft: float, floor: float = 0.95) -> dict[str, Any]:
    """The selection rule the unlearning benchmarks share: among ``rows`` keeping model utility >= ``floor`` x
    the finetuned model's ``mu_ft``, the highest forget quality (ties: higher utility); if none does, the
    highest utility."""
    ok = [r for r in rows if r["model_utility"] >= floor * mu_ft]
    if ok:
        return max(ok, key=lambda r: (r["forget_quality"], r["model_utility"]))
    return max(rows, key=lambda r: r["model_utility"])


class ResumableRuns:
    """Results by key, computed once: ``runs(key, fn)`` returns the stored result or calls ``fn()``.

    Every new result is written to ``partial_path`` at once (atomically). A run whose model diverged
    (:class:`FloatingPointError`) is recorded with the worst scores (forget quality, utility and forget
    ROUGE 0) and its error, so a sweep goes on. Each stored result gains ``wall_seconds``.
    """

    def __init__(self, partial_path: Path, *, verbose: bool = True) -> None:
        self.path = Path(partial_path)
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.verbose = verbose

    def __call__(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key not in self.done:
            t = time.perf_counter()
            try:
                res = fn()
            except FloatingPointError as e:
                res = {k: None for k in KEEP} | {"forget_quality": 0.0, "model_utility": 0.0, "forget_rouge": 0.0,
                                                 "error": str(e)}
            res["wall_seconds"] = time.perf_counter() - t
            self.done[key] = res
            atomic_write_json(self.path, self.done)
            if self.verbose:
                print(f"{key}: FQ {res['forget_quality']:.3g} MU {res['model_utility']:.3f} forget ROUGE "
                      f"{res['forget_rouge']:.3f} ({res['wall_seconds']:.0f} s)", flush=True)
        return self.done[key]

    def finish(self) -> None:
        """Remove the partial file (call once the outputs are written)."""
        self.path.unlink(missing_ok=True)
