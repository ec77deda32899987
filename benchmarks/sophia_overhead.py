"""Sophia's per-step overhead over AdamW with everything but the optimizer held fixed.

``benchmarks/optimizers.py`` measures the overhead inside real training runs, where the two arms'
models drift apart: a model whose attention has become sharp runs its forward and backward slower
(denormal floats on x86), and that difference lands in "Sophia's overhead" although no optimizer
work causes it. Here every arm trains a copy of the same ``soulkit train`` model with **lr = 0**:
the optimizers do all their work (moments, Hessian refresh, clipping, weight-decay multiply) but
the parameters never change, so forward and backward cost the same for every arm and the time
difference is the optimizer's own.

Arms, interleaved window by window (one window = ``k`` consecutive training steps of the demo's
``soulkit.demos.lm.loop.train_step``: forward, loss, backward, grad clip, ``opt.step()``; Sophia refreshes its GNB
estimate from the step's logits once per window, as with ``hessian_update_interval = k``):

* ``adamw``: ``torch.optim.AdamW`` as the benchmarks use it (torch's default implementation);
* ``adamw-fused``: ``AdamW(fused=True)``;
* ``sophia``: ``soulkit.optim.Sophia`` (its default CPU dispatch), refresh every ``k`` steps;
* ``adamw-2micro`` / ``sophia-2micro-1refresh``: each step as 2 accumulated micro-batches of half the
  sequences; Sophia's refresh from the first micro-batch only (``accumulate_gnb`` on its logits), the
  cheaper refresh the README points to, compared with AdamW stepping the same way.

Reported: median window time per arm; overhead = Sophia window / AdamW window - 1; the extra time
of Sophia's refresh step and of its plain steps (medians of per-position step times), each relative
to AdamW's median step. Timing: ``benchmarks/_timing.py`` (windows in rotating rounds, each step
timed within its window).

    python benchmarks/sophia_overhead.py [--windows 12] [--k 10] [--threads 1]
Writes benchmarks/results/sophia_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, machine_line  # noqa: E402
from _timing import medians, paired_ratio, time_result, time_rounds  # noqa: E402

from soulkit.demos.lm.config import OptimizerSpec, TrainConfig  # noqa: E402
from soulkit.demos.lm.corpus import load_text_bytes, token_batch, train_offsets  # noqa: E402
from soulkit.demos.lm.loop import train_step  # noqa: E402
from soulkit.demos.lm.model import build_model  # noqa: E402
from soulkit.demos.lm.optimizer import arm_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=12, help="timed windows per arm (after one warm-up window)")
    ap.add_argument("--k", type=int, default=10, help="steps per window = Sophia's refresh interval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 windows (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for name in ("windows", "k", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.windows = min(args.windows, 3)
        config = TrainConfig(steps=(args.windows + 1) * args.k, hidden_size=32, num_layers=1, num_heads=2,
                             batch_size=4, seq_len=32, max_bytes=200_000, progress=False)
    else:
        config = TrainConfig(steps=(args.windows + 1) * args.k, progress=False)
    train, _, info = load_text_bytes(config)
    offsets = train_offsets(train.numel(), config)
    base = build_model(config, seed=0)
    n_params = sum(p.numel() for p in base.parameters())
    specs = {
        "adamw": OptimizerSpec("adamw", 1e-3, label="adamw"),
        "sophia": OptimizerSpec("sophia", 1e-3, label="sophia", rho=args.rho, hessian_update_interval=args.k,
                                hessian_bias_correction=True),
    }
    arms = {}
    for name, spec in specs.items():
        m = copy.deepcopy(base)
        m.train()
        opt = arm_optimizer(spec, m)
        for g in opt.param_groups:  # OptimizerSpec wants lr > 0; the measurement wants the model to stay put
            g["lr"] = 0.0
        arms[name] = (m, opt, spec)
    m = copy.deepcopy(base)
    m.train()
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in arms["adamw"][1].param_groups]
    fused_groups = []
    name_of = {id(p): n for n, p in arms["adamw"][0].named_parameters()}
    params_by_name = dict(m.named_parameters())
    for g in groups:
        fused_groups.append({"params": [params_by_name[name_of[id(p)]] for p in g["params"]],
                             "weight_decay": g["weight_decay"]})
    arms["adamw-fused"] = (m, torch.optim.AdamW(fused_groups, lr=0.0, betas=(0.9, 0.95), fused=True),
                           OptimizerSpec("adamw", 1e-3, label="adamw-fused"))

    # Gradient accumulation over 2 micro-batches (same tokens per step): AdamW, and Sophia refreshing its
    # GNB estimate from the first micro-batch's logits only (half the extra backward).
    micro = {}
    for name, spec in (("adamw-2micro", specs["adamw"]), ("sophia-2micro-1refresh", specs["sophia"])):
        m = copy.deepcopy(base)
        m.train()
        opt = arm_optimizer(spec, m)
        for g in opt.param_groups:
            g["lr"] = 0.0
        arms[name] = (m, opt, spec)
        micro[name] = 2

    step_times = {name: [[] for _ in range(args.k)] for name in arms}
    refresh_pos = {}
    windows_done = dict.fromkeys(arms, 0)  # window 0 warms up (the compiled Sophia step compiles there)

    def window(name: str) -> None:
        """One window of k steps of arm ``name``, each step timed on its own."""
        model, opt, spec = arms[name]
        w = windows_done[name]
        windows_done[name] += 1
        for i in range(args.k):
            b = token_batch(train, offsets[w * args.k + i], config.seq_len)
            if name in micro:
                step = partial(_train_step, model, opt, spec, b[:, :-1], b[:, 1:], config.grad_clip, micro[name])
            else:
                step = partial(_train_step, model, opt, spec, b[:, :-1], b[:, 1:], config.grad_clip)
            refreshed, dt = time_result(step)
            if refreshed:
                refresh_pos[name] = i
            if w > 0:
                step_times[name][i].append(dt)

    def progress(i: int, times) -> None:
        print(f"window {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in arms), flush=True)

    # interleaved window by window, the arm order rotating so that no arm always runs last; no cold-cache
    # buffer (whole training steps)
    window_times = time_rounds({name: partial(window, name) for name in arms}, reps=args.windows, warmup=1,
                               cold_cache=False, rotate=True, after_round=progress)

    # lr = 0 must have left every model where it started (otherwise the comparison is not controlled)
    for name, (model, _, _) in arms.items():
        for (pn, p), q in zip(model.named_parameters(), base.parameters()):
            if not torch.equal(p, q):
                raise RuntimeError(f"{name}: parameter {pn} changed although lr = 0")

    med_window = medians(window_times)
    med_step = medians({n: [t for pos in v for t in pos] for n, v in step_times.items()})
    pos = refresh_pos.get("sophia")
    sophia_refresh = statistics.median(step_times["sophia"][pos]) if pos is not None else None
    sophia_plain = statistics.median([t for i, v in enumerate(step_times["sophia"]) if i != pos for t in v])
    adamw_plain = statistics.median([t for v in step_times["adamw"] for t in v])
    res = {
        "machine": machine_info(),
        "config": {"windows": args.windows, "k": args.k, "threads": args.threads, "rho": args.rho,
                   "n_params": n_params, "batch": [config.batch_size, config.seq_len], "quick": args.quick},
        "data": {k: v for k, v in info.items() if isinstance(v, int | float | str)},
        "median_window_s": med_window,
        "median_step_s": med_step,
        "window_times_s": window_times,
        # paired: each Sophia window against the AdamW window run right next to it, so that the machine's
        # slow drifts (steal time on a shared VM) cancel; the median of those ratios
        "overhead_vs_adamw": paired(window_times, "sophia", "adamw"),
        "overhead_vs_adamw_fused": paired(window_times, "sophia", "adamw-fused"),
        "adamw_fused_vs_adamw": paired(window_times, "adamw-fused", "adamw"),
        "micro_overhead_vs_adamw_micro": paired(window_times, "sophia-2micro-1refresh", "adamw-2micro"),
        "sophia_refresh_step_extra_vs_adamw_step": (sophia_refresh / adamw_plain - 1) if sophia_refresh else None,
        "sophia_plain_step_extra_vs_adamw_step": sophia_plain / adamw_plain - 1,
    }
    write(res, args)
    return 0


def _train_step(model, opt, spec, inputs, targets, grad_clip: float, micro_batches: int = 1) -> bool:
    """The demo's training step (as ``micro_batches`` accumulated micro-batches); whether Sophia refreshed."""
    return train_step(model, opt, None, spec, inputs, targets, grad_clip, micro_batches)[1]


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Paired median of arm ``a``'s windows over arm ``b``'s of the same round, minus 1."""
    return paired_ratio(times, a, b) - 1


def where_it_comes_from(res: dict, k: int) -> str:
    extra = res["sophia_refresh_step_extra_vs_adamw_step"]
    plain = res["sophia_plain_step_extra_vs_adamw_step"]
    if extra is None:
        return "No refresh step was recorded."
    k_needed = math.ceil(extra / 0.05) if extra > 0 else 1
    return (
        f"Where it comes from: the refresh step takes {100 * extra:+.0f}% of an AdamW step (one extra backward "
        f"through the step's graph, from its logits), {100 * extra / k:+.1f}% per step at k = {k}; Sophia's other "
        f"steps take {100 * plain:+.1f}% (the optimizer step itself). With the refresh on the full batch, the "
        f"refresh alone stays under 5% per step only from k = {k_needed} on (or by refreshing on part of the batch)."
    )


def write(res: dict, args) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = "sophia_overhead" + ("_quick" if args.quick else "")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / f"{stem}.json")
    c = res["config"]
    w = res["median_window_s"]
    lines = [
        "# Sophia's per-step overhead over AdamW, optimizer work only (lr = 0)", "",
        f"Machine: {machine_line(res['machine'])}. Model: the `soulkit train` byte-level Llama "
        f"({c['n_params'] / 1e6:.2f} M parameters), batch {c['batch'][0]} x {c['batch'][1]} tokens, "
        f"{c['threads']} thread(s). Every arm trains a copy of the same model with lr = 0 (checked: no parameter "
        f"moved), so forward and backward cost the same and only the optimizers' own work differs. "
        f"{c['windows']} windows of k = {c['k']} steps per arm, interleaved window by window (the arm order "
        f"rotates), after one warm-up window; ratios are medians of each window over the other arm's window of the "
        f"same round (the machine's slow drifts cancel); Sophia (rho {c['rho']}, Hessian bias correction) refreshes its GNB estimate from the step's own "
        f"logits once per window. Command: `python benchmarks/sophia_overhead.py "
        f"--windows {c['windows']} --k {c['k']} --threads {c['threads']}{' --quick' if c['quick'] else ''}`.", "",
        "| arm | median window (k steps) | median step | window vs AdamW (paired) |",
        "|---|---:|---:|---:|",
    ]
    vs = {"adamw": 0.0, "adamw-fused": res["adamw_fused_vs_adamw"], "sophia": res["overhead_vs_adamw"]}
    for n in ("adamw", "adamw-fused", "sophia"):
        lines.append(f"| {n} | {w[n]:.3f} s | {res['median_step_s'][n] * 1e3:.1f} ms | {1 + vs[n]:.3f}x |")
    lines.append(f"| adamw-2micro | {w['adamw-2micro']:.3f} s | {res['median_step_s']['adamw-2micro'] * 1e3:.1f} ms "
                 "| (baseline of the next row) |")
    lines.append(f"| sophia-2micro-1refresh | {w['sophia-2micro-1refresh']:.3f} s | "
                 f"{res['median_step_s']['sophia-2micro-1refresh'] * 1e3:.1f} ms | "
                 f"{1 + res['micro_overhead_vs_adamw_micro']:.3f}x adamw-2micro |")
    lines += [
        "",
        f"**Sophia's overhead, refresh included (k = {c['k']}): {100 * res['overhead_vs_adamw']:+.1f}% over AdamW "
        f"(torch default), {100 * res['overhead_vs_adamw_fused']:+.1f}% over AdamW fused** (goal: <= 5%).",
        "",
        where_it_comes_from(res, c["k"]),
        "",
        f"With each step split into 2 accumulated micro-batches (same tokens) and Sophia's refresh taken from the "
        f"first micro-batch's logits only (an estimate over half the batch): "
        f"**{100 * res['micro_overhead_vs_adamw_micro']:+.1f}%** over AdamW run the same way.",
    ]
    tmp = out / f"{stem}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / f"{stem}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
