"""Kernel microbenchmarks: a thin caller of :mod:`soulkit.bench.kernels` (``soulkit bench kernels``)
that writes into ``benchmarks/results/``. The module's docstring says what is measured and how.

    python benchmarks/kernel_bench.py                 # CPU: sizes up to 64M + GPT-2 small layout, Sophia and AdaHessian
    python benchmarks/kernel_bench.py --families adahessian          # one family only
    python benchmarks/kernel_bench.py --kernels projection --layouts none --sizes 1,4
    python benchmarks/kernel_bench.py --sizes 1 --layouts none --reps 2 --tag smoke   # smoke test
    python benchmarks/kernel_bench.py --threads 1 --tag 1thread   # kernels_cpu_1thread.*
Outputs benchmarks/results/kernels{_cpu,_cuda}[_<tag>].{md,json,png}.
"""

from __future__ import annotations

from pathlib import Path

from soulkit.bench.kernels import HP, LAYOUTS, main, make_tensors  # noqa: F401  (step.py reuses these)

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    raise SystemExit(main(default_out=RESULTS))
