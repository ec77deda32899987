"""Microbenchmarks of the Sophia and AdaHessian steps: effective bandwidth and ratios against baselines.

For flat tensors and for real parameter layouts (GPT-2 small: 148 tensors / 124M; a 1B-class
Llama layout on GPU), each implementation's median step time, the effective bandwidth
(bytes that must move / time) as a % of the copy bandwidth measured on the same device in the
same run, and ratios against baselines timed in the same rounds. Two families, each timed in its
own rounds (with its own copy and AdamW arms):

* ``sophia``: ``paper-loop`` (the Sophia paper's per-tensor loop, about ten element-wise ops per
  tensor, re-implemented here from the published update), ``sophia-foreach``, on the CPU
  ``sophia-compiled`` / ``sophia-compiled-1`` (one kernel call per large tensor), on CUDA
  ``sophia-triton``;
* ``adahessian``: ``adahessian-foreach`` and, on CUDA, ``adahessian-triton``;
* both: ``adamw-fused`` / ``adamw-foreach``: ``torch.optim.AdamW`` (fused moves 28 bytes/param).

Bytes per element per step (fp32): Sophia 24 (p, g, m, h read; p, m written), AdaHessian 32
(p, g, m, v, D read; p, m, v written), AdamW 28. Timing: ``benchmarks/_timing.py`` (arms in
alternating rounds, each call from a cold cache, ratios as medians of per-round ratios).

    python benchmarks/kernels.py                 # CPU: sizes up to 64M + GPT-2 small layout, both families
    python benchmarks/kernels.py --families adahessian          # one family only
    python benchmarks/kernels.py --sizes 1,16 --layouts gpt2-small --reps 3
    python benchmarks/kernels.py --sizes 1 --layouts none --reps 2 --tag smoke   # smoke test
    python benchmarks/kernels.py --threads 1 --tag 1thread   # kernels_cpu_1thread.*
Outputs benchmarks/results/kernels{_cpu,_cuda}[_<tag>].{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, machine_line  # noqa: E402
from _timing import medians, paired_iqr, paired_ratio, time_rounds  # noqa: E402

from soulkit.kernels.adahessian import adahessian_step_foreach  # noqa: E402
from soulkit.kernels.dispatch import triton_usable  # noqa: E402
from soulkit.kernels.sophia import sophia_step_foreach  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HP = dict(lr=6e-4, beta1=0.965, rho=0.05, weight_decay=0.1, eps=1e-15)
# AdaHessian's usual hyperparameters; weight decay on, so that every path does its full work
ADA_HP = dict(lr=0.15, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.1, hessian_power=1.0)
ADA_STEP = 10  # the step count passed for every tensor (bias corrections; any value >= 1 costs the same)
FAMILIES = {"sophia": "Sophia step", "adahessian": "AdaHessian step"}
BYTES = {"sophia": 24, "adahessian": 32, "adamw": 28, "copy": 8}


def gpt2_small_layout() -> list[tuple[int, ...]]:
    d, v, ctx, ff = 768, 50257, 1024, 3072
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b_layout() -> list[tuple[int, ...]]:
    d, ff, v, layers, kv = 2048, 5632, 32000, 22, 256
    shapes: list[tuple[int, ...]] = [(v, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,), (v, d)]


LAYOUTS = {"gpt2-small": gpt2_small_layout, "llama-1b": llama_1b_layout}


def paper_loop_step(params, grads, ms, hs, *, lr, beta1, rho, weight_decay, eps):
    """The per-tensor loop of the paper's code (bs folded into h): ~10 element-wise launches per tensor."""
    for p, g, m, h in zip(params, grads, ms, hs):
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)


def make_tensors(shapes, device, family="sophia", seed=0):
    """Sophia: (p, g, m, h); AdaHessian: (p, g, m, v, D, steps)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ps = [torch.randn(s, device=device, generator=gen) for s in shapes]
    gs = [torch.randn(s, device=device, generator=gen) for s in shapes]
    ms = [torch.zeros(s, device=device) for s in shapes]
    if family == "adahessian":
        vs = [torch.zeros(s, device=device) for s in shapes]
        ds = [torch.randn(s, device=device, generator=gen) for s in shapes]
        return ps, gs, ms, vs, ds, [ADA_STEP] * len(shapes)
    hs = [torch.rand(s, device=device, generator=gen) for s in shapes]
    return ps, gs, ms, hs


def implementations(device: torch.device, family: str = "sophia") -> dict:
    """The family's own arms (the AdamW baselines and the copy are added by :func:`bench_case`)."""
    fused = triton_usable(device) and device.type == "cuda"
    if family == "adahessian":
        impls = {"adahessian-foreach": lambda t: adahessian_step_foreach(*t, **ADA_HP)}
        if fused:
            from soulkit.kernels.adahessian_triton import adahessian_step_triton

            impls["adahessian-triton"] = lambda t: adahessian_step_triton(*t, **ADA_HP)
        return impls
    impls = {"paper-loop": lambda t: paper_loop_step(*t, **HP),
             "sophia-foreach": lambda t: sophia_step_foreach(*t, **HP)}
    if device.type == "cpu":
        from soulkit.kernels.sophia_compiled import sophia_step_compiled

        impls["sophia-compiled"] = lambda t: sophia_step_compiled(*t, **HP)
        # the same kernel called once per large tensor (before large tensors were chunked)
        impls["sophia-compiled-1"] = lambda t: sophia_step_compiled(*t, chunk=1, **HP)
    if fused:
        from soulkit.kernels.sophia_triton import sophia_step_triton

        impls["sophia-triton"] = lambda t: sophia_step_triton(*t, **HP)
    return impls


def arm_names(device: torch.device, family: str) -> list[str]:
    return [*implementations(device, family), "adamw-foreach", "adamw-fused"]


def bench_case(name, shapes, device, reps, warmup, only=None, family="sophia"):
    """One family's rows for one case; ``[]`` when ``only`` leaves none of its arms."""
    if only and not only.intersection(arm_names(device, family)):
        return []
    hp = ADA_HP if family == "adahessian" else HP
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    tensors = make_tensors(shapes, device, family)
    rows = []
    # copy bandwidth on the same device: one flat read + write of n fp32, timed in the same rounds as
    # the implementations (a single earlier measurement met a different load on a shared VM)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fns = {"copy": lambda: dst.copy_(src)}
    fns.update({impl: (lambda fn=fn: fn(tensors)) for impl, fn in implementations(device, family).items()})
    opts = []
    if only:
        fns = {k: v for k, v in fns.items() if k == "copy" or k in only}
    for kind in ("foreach", "fused"):
        if only and f"adamw-{kind}" not in only:
            continue
        ps = [torch.nn.Parameter(p.clone()) for p in tensors[0]]
        for p, g in zip(ps, tensors[1]):
            p.grad = g
        try:
            opt = torch.optim.AdamW(ps, lr=hp["lr"], weight_decay=hp["weight_decay"], **{kind: True})
            opt.step()  # fails here if unsupported on this device/dtype
        except (RuntimeError, ValueError) as exc:
            print(f"  adamw-{kind} skipped: {exc}")
            continue
        fns[f"adamw-{kind}"] = opt.step
        opts.append(opt)
    # benchmarks/_timing.py: every implementation once per round, in turn, so that a slow spell of a
    # shared machine (steal time on a VM) hits all of them alike; each timed call starts from a cold
    # last-level cache (otherwise an implementation that follows another one on the same tensors finds
    # them cached: a 1M-element case's 16 MB fit the Xeon's 35.8 MiB L3, and the order of the
    # implementations decides the ratios). Medians per implementation; ratios are medians of the
    # per-round ratios.
    times = time_rounds(fns, reps=reps, warmup=warmup, device=device)
    results = medians(times)
    copy_bw = BYTES["copy"] * n / results.pop("copy")
    src = dst = None

    for impl, t in results.items():
        b = BYTES["adamw" if impl.startswith("adamw") else family] * n
        rows.append({
            "case": name, "family": family, "n_tensors": len(shapes), "numel": n, "impl": impl, "median_s": t,
            "bandwidth_gbs": b / t / 1e9, "pct_of_copy": 100 * (b / t) / copy_bw,
            "vs_paper_loop": paired_ratio(times, "paper-loop", impl) if "paper-loop" in results else None,
            "vs_adamw_fused": paired_ratio(times, impl, "adamw-fused") if "adamw-fused" in results else None,
            "vs_adamw_fused_iqr": paired_iqr(times, impl, "adamw-fused") if "adamw-fused" in results else None,
            "copy_bandwidth_gbs": copy_bw / 1e9,
        })
    del opts, fns
    tensors = None  # free before the next case
    return rows


def write_outputs(rows, info, device, args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (f"kernels_{device.type}" + (f"_{args.tag}" if args.tag else ""))
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    payload = {"machine": info, "device": device.type, "reps": args.reps, "families": families,
               "hyperparameters": HP, "adahessian_hyperparameters": {**ADA_HP, "step": ADA_STEP}, "rows": rows}
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, stem.with_suffix(".json"))
    lines = [
        f"# {' and '.join(FAMILIES[f] for f in families) or 'Optimizer step'} microbenchmarks ({device.type})", "",
        f"Machine: {machine_line(info)}. Median of {args.reps} runs after {args.warmup} warm-up. "
        "Bandwidth = bytes that must move (Sophia 24 B/param, AdaHessian 32 B/param, AdamW 28 B/param, fp32) / time; "
        "% of copy = that bandwidth over a flat `copy_` of the same number of elements (8 B/element), timed in the "
        "same rounds. On a CPU a copy's stores also read their destination lines (write-allocate), which the "
        "8 B leave out, and torch's copy is not the fastest loop, so fused kernels can pass 100%: read the "
        "column as relative, not as a fraction of the hardware's limit. "
        "`x paper` = speed-up over the paper's per-tensor loop; `/ adamw-fused` = time relative to "
        "`torch.optim.AdamW(fused=True)` (< 1 is faster); implementations are timed in turn, one call each per "
        "round, each call after a 256 MiB buffer is rewritten (cold cache), and both ratios are medians of per-round ratios; `IQR` = the 25th-75th percentiles of the "
        "per-round `/ adamw-fused` ratios (on a shared VM whole runs also move: repeat before trusting a few %). "
        "Each family is timed in its own rounds, with its own copy and AdamW arms.",
    ]
    notes = {
        "sophia": "",
        "adahessian": "AdaHessian reads p, g, m, v, D and writes p, m, v (32 B/param); "
                      f"lr {ADA_HP['lr']:g}, betas ({ADA_HP['beta1']:g}, {ADA_HP['beta2']:g}), eps {ADA_HP['eps']:g}, "
                      f"weight decay {ADA_HP['weight_decay']:g}, Hessian power {ADA_HP['hessian_power']:g}, step "
                      f"{ADA_STEP}. There is no paper-loop arm here, so `x paper` is `-`.",
    }
    for family in families:
        lines += ["", f"## {FAMILIES[family]}", ""]
        if notes[family]:
            lines += [notes[family], ""]
        lines += [
            "| case | tensors | params | impl | median | GB/s | % of copy | x paper | / adamw-fused | IQR |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            if r["family"] != family:
                continue
            vs = f"{r['vs_adamw_fused']:.2f}" if r["vs_adamw_fused"] is not None else "-"
            paper = f"{r['vs_paper_loop']:.1f}" if r["vs_paper_loop"] is not None else "-"
            iqr = r.get("vs_adamw_fused_iqr")
            spread = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
            lines.append(
                f"| {r['case']} | {r['n_tensors']} | {r['numel'] / 1e6:.1f}M | {r['impl']} | "
                f"{r['median_s'] * 1e3:.2f} ms | {r['bandwidth_gbs']:.1f} | {r['pct_of_copy']:.0f}% | "
                f"{paper} | {vs} | {spread} |"
            )
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, stem.with_suffix(".md"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, max(len(families), 1), figsize=(7 * max(len(families), 1), 4), squeeze=False)
        for ax, family in zip(axes[0], families):
            flat = [r for r in rows if r["case"].startswith("flat") and r["family"] == family]
            for impl in dict.fromkeys(r["impl"] for r in flat):
                pts = [(r["numel"], r["pct_of_copy"]) for r in flat if r["impl"] == impl]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_xlabel("elements")
            ax.set_ylabel("% of measured copy bandwidth")
            ax.set_title(f"{FAMILIES[family]}, {device.type}: {machine_line(info)}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except Exception as exc:  # plotting is a convenience; the table and JSON are the record
        print(f"plot skipped: {exc}")
    print("\n".join(lines))


def _names(value: str | None) -> list[str] | None:
    """A comma-separated option: ``None`` when not given, ``[]`` for ``none``."""
    if value is None:
        return None
    return [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help="flat sizes in M elements, comma-separated ('none': no flat case)")
    ap.add_argument("--layouts", default=None, help="comma-separated: gpt2-small, llama-1b ('none': no layout)")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"kernel families to time, comma-separated: {', '.join(FAMILIES)} (default: both)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--impls", default=None,
                    help="only these implementations, comma-separated (e.g. sophia-compiled,adamw-fused)")
    ap.add_argument("--tag", default="", help="write kernels_<device>_<tag>.* (keeps the default run's results)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    families = _names(args.families) or []
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        ap.error(f"--families: choose from {', '.join(FAMILIES)} (got {args.families!r})")
    known = {name for f in families for name in arm_names(device, f)}
    only = set(_names(args.impls) or []) or None
    if only and only - known:
        ap.error(f"--impls: unknown on {device.type} for {', '.join(families)}: {', '.join(sorted(only - known))} "
                 f"(known: {', '.join(sorted(known))})")
    sizes = _names(args.sizes)
    sizes = [float(s) for s in sizes] if sizes is not None else ([1, 4, 16, 64, 256] if cuda else [1, 4, 16, 64])
    layouts = _names(args.layouts)
    layouts = layouts if layouts is not None else (["gpt2-small", "llama-1b"] if cuda else ["gpt2-small"])
    if set(layouts) - set(LAYOUTS):
        ap.error(f"--layouts: choose from {', '.join(LAYOUTS)} or none (got {args.layouts!r})")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    args.reps = args.reps or (20 if cuda else 5)
    info = machine_info()
    print(machine_line(info))
    cases = [(f"flat {s:g}M", [(int(s * 2**20),)]) for s in sizes] + [(name, LAYOUTS[name]()) for name in layouts]
    rows = []
    for name, shapes in cases:
        for family in families:
            print(f"{name}, {family} ...", flush=True)
            rows += bench_case(name, shapes, device, args.reps, args.warmup, only, family)
    write_outputs(rows, info, device, args)


if __name__ == "__main__":
    main()
