"""The step a user calls: ``Sophia(params).step()`` against ``torch.optim.AdamW(params, fused=True).step()``.

Both optimizers hold the same parameter list (GPT-2 small's 148 tensors, 124M parameters, fp32)
with the same gradients; Sophia has folded one Hessian estimate first, so ``h`` is not zero.
Timed arms, one call each per round, in turn, each from a cold cache (``benchmarks/_timing.py``):

* ``adamw-fused``: the baseline, ``torch.optim.AdamW(fused=True).step()``;
* ``sophia``: ``Sophia(params).step()`` with its defaults (non-finite check on, a plain step: no
  refresh, no win-rate count);
* ``sophia-nocheck``: the same with ``nonfinite="ignore"`` (no check of the gradients);
* ``sophia-kernel``: the kernel the step wraps (``soulkit.kernels.sophia_step``) on its own;
* ``finite-check``: the non-finite check on its own (``soulkit.kernels.finite.all_finite``).

Selection rule, fixed before the run: the reported ratio is the median over rounds of
``time(arm) / time(adamw-fused)`` in the same round; the goal is ``sophia <= 1.0``.

    python benchmarks/step.py                      # writes results/step_<device>.{md,json}
    python benchmarks/step.py --reps 5 --tag smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, machine_line  # noqa: E402
from _timing import paired_iqr, paired_ratio, time_rounds  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.bench.kernels import HP, LAYOUTS, make_tensors  # noqa: E402
from soulkit.kernels import sophia_step  # noqa: E402
from soulkit.kernels.finite import all_finite  # noqa: E402
from soulkit.optim import Sophia  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# bytes each arm must read and write per fp32 parameter
TRAFFIC = {
    "adamw-fused": (16, 12),  # reads p, g, m, v; writes p, m, v
    "sophia": (20, 8),  # the check reads g; the update reads p, g, m, h and writes p, m
    "sophia-nocheck": (16, 8),
    "sophia-kernel": (16, 8),
    "finite-check": (4, 0),
}


def _params(tensors, grads):
    ps = [torch.nn.Parameter(t.clone()) for t in tensors]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def build_arms(layout: str, device: torch.device):
    ps, gs, ms, hs = make_tensors(LAYOUTS[layout](), device)
    adamw = torch.optim.AdamW(_params(ps, gs), lr=HP["lr"], weight_decay=HP["weight_decay"], fused=True)
    sophias = {}
    for name, kwargs in (("sophia", {}), ("sophia-nocheck", {"nonfinite": "ignore"})):
        opt = Sophia(_params(ps, gs), lr=HP["lr"], rho=HP["rho"], weight_decay=HP["weight_decay"], **kwargs)
        opt.update_hessian([h.clone() for h in hs])
        opt.step()  # the first step counts the win rate; later ones are plain steps
        sophias[name] = opt
    kernel_hp = dict(HP)
    arms = {
        "adamw-fused": adamw.step,
        "sophia": sophias["sophia"].step,
        "sophia-nocheck": sophias["sophia-nocheck"].step,
        "sophia-kernel": lambda: sophia_step(ps, gs, ms, hs, **kernel_hp),
        "finite-check": lambda: all_finite(gs),
    }
    n = sum(p.numel() for p in ps)
    return arms, n, (adamw, sophias)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layout", default="gpt2-small", choices=sorted(LAYOUTS))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="", help="write step_<device>_<tag>.* (keeps the default results)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info()
    print(machine_line(info), flush=True)
    arms, n, _keep = build_arms(args.layout, device)
    times = time_rounds(arms, reps=args.reps, warmup=args.warmup, device=device)
    rows = []
    for name in arms:
        med = statistics.median(times[name])
        read, write = TRAFFIC[name]
        iqr = paired_iqr(times, name, "adamw-fused")
        rows.append({
            "arm": name, "median_s": med, "vs_adamw_fused": paired_ratio(times, name, "adamw-fused"),
            "vs_adamw_fused_iqr": iqr, "bytes_read_per_param": read, "bytes_written_per_param": write,
            "read_gbs": read * n / med / 1e9,
        })
    stem = RESULTS / (f"step_{device.type}" + (f"_{args.tag}" if args.tag else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem.with_suffix(".json"), {
        "machine": info, "device": device.type, "layout": args.layout, "numel": n, "reps": args.reps,
        "warmup": args.warmup, "hyperparameters": HP, "rows": rows,
    })
    lines = [
        f"# Optimizer step a user calls ({device.type}, {args.layout} layout, {n / 1e6:.1f}M fp32 parameters)", "",
        f"Machine: {machine_line(info)}. {args.reps} rounds after {args.warmup} warm-up; each round calls every "
        "arm once, in turn, after rewriting a 256 MiB buffer (cold cache). `/ adamw-fused` is the median of the "
        "per-round ratios (selection rule fixed before the run; goal: `sophia` <= 1.0), `IQR` their 25th-75th "
        "percentiles. `read GB/s` = bytes the arm must read / median time.", "",
        "| arm | median | / adamw-fused | IQR | B read / param | B written / param | read GB/s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        iqr = r["vs_adamw_fused_iqr"]
        spread = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
        lines.append(
            f"| {r['arm']} | {r['median_s'] * 1e3:.1f} ms | {r['vs_adamw_fused']:.2f} | {spread} | "
            f"{r['bytes_read_per_param']} | {r['bytes_written_per_param']} | {r['read_gbs']:.1f} |"
        )
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
