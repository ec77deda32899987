#!/usr/bin/env bash
# One prepared GPU check: the CUDA tests and the kernel microbenchmarks, then a short table.
# Usage (on a CUDA machine, from the repository root): bash benchmarks/gpu_check.sh
# Results land in benchmarks/results/kernels_cuda.{md,json,png} and projection_cuda.{md,json} (and under $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "torch>=2.4" && "$VENV/bin/python" -m pip install --quiet -e ".[test]"
fi
PY="$VENV/bin/python"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
unset TRITON_INTERPRET
echo "== gpu tests =="
"$PY" -m pytest -q -m gpu tests/kernels tests/optim 2>&1 | tail -n 15
echo "== kernel tests compiled on CUDA =="
"$PY" -m pytest -q tests/kernels/test_sophia_triton.py 2>&1 | tail -n 5
echo "== kernel benchmarks =="
"$PY" benchmarks/kernels.py --device cuda "$@"
echo "== projection benchmark =="
"$PY" benchmarks/projection.py --device cuda --max-dense-gib 16
if [ -n "${OUT:-}" ]; then cp benchmarks/results/kernels_cuda.* benchmarks/results/projection_cuda.* "$OUT"/ 2>/dev/null || true; fi
