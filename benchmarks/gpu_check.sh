#!/usr/bin/env bash
# One prepared GPU check: CUDA tests, the kernel, step and projection benchmarks, and the factored
# influence route on CUDA checked against the CPU; a short table last.
#
# Runs with the machine's own python3 (which already holds CUDA torch, triton, transformers, scipy,
# safetensors, tqdm, matplotlib, scikit-learn and pytest) and PYTHONPATH=. -- no venv, no pip: the
# device machine has no network. From the repository root: bash benchmarks/gpu_check.sh
# Results land in benchmarks/results/{kernels,step,projection}_cuda.* and influence_cuda_check.json,
# copied under $OUT when it is set; each section has its own time limit so one hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=.
unset TRITON_INTERPRET
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  || { echo "no usable CUDA torch/triton in $PY"; exit 1; }
section() { echo; echo "== $1 =="; }
section "gpu tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/optim 2>&1 | tail -n 15
section "Triton kernels compiled on CUDA against their references"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_sophia_triton.py tests/kernels/test_adahessian_triton.py tests/kernels/test_projection.py 2>&1 | tail -n 5
section "kernel benchmarks"
timeout 240 "$PY" benchmarks/kernel_bench.py --device cuda --reps 20 --kernels sophia,adahessian,projection "$@" 2>&1 | tail -n 30
section "Sophia.step vs AdamW(fused=True).step (GPT-2 small and a 1B Llama layout)"
timeout 120 "$PY" benchmarks/step.py --device cuda --reps 30 2>&1 | tail -n 8
timeout 120 "$PY" benchmarks/step.py --device cuda --reps 30 --layout llama-1b --tag llama1b 2>&1 | tail -n 8
section "projection benchmark"
timeout 120 "$PY" benchmarks/projection.py --device cuda --max-dense-gib 16 2>&1 | tail -n 12
section "factored influence (EK-FAC) on CUDA vs CPU"
timeout 180 "$PY" - <<'EOF' 2>&1 | tail -n 12
import json, time, torch, torch.nn.functional as F, transformers
from soulkit.influence import InfluenceAnalyzer, OutputLoss
transformers.utils.logging.set_verbosity_error()
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096)).eval()
ids = torch.randint(0, 4096, (72, 64))
train = [{"input_ids": ids[i]} for i in range(64)]
queries = [{"input_ids": ids[64 + i]} for i in range(8)]
loss = OutputLoss(lambda m, b: m(input_ids=b["input_ids"]).logits[:, :-1],
                  lambda z, b: F.cross_entropy(z.transpose(1, 2), b["input_ids"][:, 1:], reduction="none").sum(1))
out = {}
for dev in ("cpu", "cuda"):
    m = model.to(dev)
    an = InfluenceAnalyzer(m, loss, solver="ekfac", l2=1e-3, fisher="empirical", batch_size=16, progress=False)
    t0 = time.perf_counter(); an.fit(train); s = an.scores(train, queries)
    if dev == "cuda": torch.cuda.synchronize()
    out[dev] = (s.float().cpu(), time.perf_counter() - t0)
rel = ((out["cuda"][0] - out["cpu"][0]).norm() / out["cpu"][0].norm()).item()
res = {"rel_error_cuda_vs_cpu": rel, "seconds_cpu": out["cpu"][1], "seconds_cuda": out["cuda"][1],
       "device": torch.cuda.get_device_name(0)}
json.dump(res, open("benchmarks/results/influence_cuda_check.json", "w"), indent=2)
print(res)
assert rel < 1e-3, f"CUDA scores differ from the CPU's: {rel:.2e}"
EOF
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/kernels_cuda* benchmarks/results/step_cuda* benchmarks/results/projection_cuda* \
     benchmarks/results/influence_cuda_check.json "$OUT"/ 2>/dev/null || true
fi
