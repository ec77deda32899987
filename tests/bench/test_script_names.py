"""``python benchmarks/X.py`` puts benchmarks/ first on sys.path, so a script named like an installed module
(transformers imports the ``kernels`` package, for one) would be imported in its place."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_script_shadows_an_importable_module(monkeypatch):
    here = {str(_BENCH), "", "."}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here and Path(p or ".").resolve() != _BENCH])
    names = sorted(p.stem for p in _BENCH.glob("*.py"))
    assert "kernel_bench" in names  # the glob found the scripts
    specs = {n: importlib.util.find_spec(n) for n in names}
    # another test may have imported a script's helper (``_runs``) from benchmarks/ already: not a shadow
    shadowing = {n: s.origin for n, s in specs.items() if s is not None and Path(s.origin or "").parent != _BENCH}
    assert not shadowing, f"benchmark scripts named like importable modules (rename them): {shadowing}"
