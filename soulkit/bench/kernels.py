"""Kernel microbenchmarks: ``soulkit bench kernels`` (and ``benchmarks/kernel_bench.py``, a thin caller).

For flat tensors and real parameter layouts (GPT-2 small: 148 tensors / 124M; a 1B Llama; one
Llama-7B decoder layer), each implementation's median time, its effective bandwidth (bytes that
must move / time) as a % of the copy bandwidth measured on the same device in the same rounds, and
ratios against baselines timed in the same rounds (:mod:`soulkit.bench.timing`: arms in turn, each
call from a cold cache, ratios as medians of per-round ratios with their IQR). Families, each in
its own rounds with its own copy and baselines:

* ``sophia``: ``paper-loop`` (the Sophia paper's per-tensor loop, re-implemented from the published
  update), ``sophia-reference`` (soulkit's per-tensor reference), ``sophia-foreach``, on the CPU
  ``sophia-compiled`` / ``sophia-compiled-1`` (one call per large tensor), on CUDA ``sophia-triton``;
  baselines ``adamw-fused`` / ``adamw-foreach`` (``torch.optim.AdamW``);
* ``adahessian``: ``adahessian-reference``, ``adahessian-foreach``, on CUDA ``adahessian-triton``;
  the same AdamW baselines;
* ``projection``: ``g @ R`` for ``g`` ``[32, d]`` and soulkit's seeded Rademacher ``R`` ``[d, 512]``:
  ``project`` (compiled on the CPU, Triton on CUDA) and ``project-reference``, against the torch
  baseline ``randn-matmul`` (drawing ``R`` with ``torch.randn`` and multiplying).

Bytes per element per step (fp32 parameters and state): Sophia 24 (p, g, m, h read; p, m
written), AdaHessian 32 (p, g, m, v, D read; p, m, v written), AdamW 28; bf16 parameters count 2
bytes for p and g. On a CPU a copy's stores also read their destination (write-allocate), which the
copy's 8 B/element leave out, so fused kernels can pass 100% of it: read that column as relative.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .._io import atomic_write_json, atomic_write_text
from ..kernels import project, project_reference
from ..kernels.adahessian import adahessian_step_foreach, adahessian_step_reference
from ..kernels.dispatch import triton_usable
from ..kernels.sophia import sophia_step_foreach, sophia_step_reference
from .machine import machine_info, machine_line
from .timing import medians, paired_iqr, paired_ratio, time_rounds

__all__ = ["DTYPES", "FAMILIES", "LAYOUTS", "build_parser", "main", "run"]

HP = dict(lr=6e-4, beta1=0.965, rho=0.05, weight_decay=0.1, eps=1e-15)
# AdaHessian's usual hyperparameters; weight decay on, so that every path does its full work
ADA_HP = dict(lr=0.15, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.1, hessian_power=1.0)
ADA_STEP = 10  # the step count passed for every tensor (bias corrections; any value >= 1 costs the same)
FAMILIES = {"sophia": "Sophia step", "adahessian": "AdaHessian step", "projection": "Random projection"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROJECTION_BATCH, PROJECTION_K = 32, 512
PROJECTION_REFERENCE_MAX = 1 << 20  # larger d: the eager reference arm is left out


def _bytes(family: str, dtype: torch.dtype) -> int:
    """Bytes per parameter a step must move: p and g in the parameter dtype, the state in fp32."""
    pg = 2 * torch.empty((), dtype=dtype).element_size()
    return {"sophia": pg + 16, "adahessian": pg + 24}[family]


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


def llama_7b_layer_layout() -> list[tuple[int, ...]]:
    """One decoder layer of Llama-2-7B (202M parameters)."""
    d, ff = 4096, 11008
    return [(d, d), (d, d), (d, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]


LAYOUTS = {"gpt2-small": gpt2_small_layout, "llama-1b": llama_1b_layout, "llama-7b-layer": llama_7b_layer_layout}


def paper_loop_step(params, grads, ms, hs, *, lr, beta1, rho, weight_decay, eps):
    """The per-tensor loop of the paper's code (bs folded into h): ~10 element-wise launches per tensor."""
    for p, g, m, h in zip(params, grads, ms, hs):
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)


def make_tensors(shapes, device, family="sophia", seed=0, dtype=torch.float32):
    """Sophia: (p, g, m, h); AdaHessian: (p, g, m, v, D, steps). Parameters and gradients in ``dtype``,
    state in float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ps = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
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
        impls = {"adahessian-reference": lambda t: adahessian_step_reference(*t, **ADA_HP),
                 "adahessian-foreach": lambda t: adahessian_step_foreach(*t, **ADA_HP)}
        if fused:
            from soulkit.kernels.adahessian_triton import adahessian_step_triton

            impls["adahessian-triton"] = lambda t: adahessian_step_triton(*t, **ADA_HP)
        return impls
    impls = {"paper-loop": lambda t: paper_loop_step(*t, **HP),
             "sophia-reference": lambda t: sophia_step_reference(*t, **HP),
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
    if family == "projection":
        return ["project", "project-reference", "randn-matmul"]
    return [*implementations(device, family), "adamw-foreach", "adamw-fused"]


def bench_case(name, shapes, device, reps, warmup, only=None, family="sophia", dtype=torch.float32):
    """One family's rows for one case; ``[]`` when ``only`` leaves none of its arms."""
    if only and not only.intersection(arm_names(device, family)):
        return []
    if family == "projection":
        return _projection_case(name, shapes, device, reps, warmup, only, dtype)
    hp = ADA_HP if family == "adahessian" else HP
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    tensors = make_tensors(shapes, device, family, dtype=dtype)
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
    copy_bw = 8 * n / results.pop("copy")
    src = dst = None

    elem = torch.empty((), dtype=dtype).element_size()
    for impl, t in results.items():
        # AdamW keeps its state in the parameters' dtype: p, g, m, v read and p, m, v written
        b = (7 * elem if impl.startswith("adamw") else _bytes(family, dtype)) * n
        rows.append({
            "case": name, "family": family, "dtype": str(dtype).replace("torch.", ""), "n_tensors": len(shapes),
            "numel": n, "impl": impl, "median_s": t,
            "bandwidth_gbs": b / t / 1e9, "pct_of_copy": 100 * (b / t) / copy_bw,
            "vs_paper_loop": paired_ratio(times, "paper-loop", impl) if "paper-loop" in results else None,
            "vs_adamw_fused": paired_ratio(times, impl, "adamw-fused") if "adamw-fused" in results else None,
            "vs_adamw_fused_iqr": paired_iqr(times, impl, "adamw-fused") if "adamw-fused" in results else None,
            "copy_bandwidth_gbs": copy_bw / 1e9,
        })
    del opts, fns
    tensors = None  # free before the next case
    return rows


def _projection_case(name, shapes, device, reps, warmup, only, dtype):
    """``g [32, d] @ R [d, 512]`` for ``d`` = the case's element count (a layout counts as one long gradient)."""
    d = sum(int(torch.Size(s).numel()) for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(PROJECTION_BATCH, d, generator=gen, device=device).to(dtype)
    k = PROJECTION_K
    arms = {
        "project": lambda: project(g, k, seed=1),
        "randn-matmul": lambda: g.float() @ (torch.randn(d, k, device=device) / math.sqrt(k)),
    }
    if d <= PROJECTION_REFERENCE_MAX:  # the eager hash takes seconds per million rows
        arms["project-reference"] = lambda: project_reference(g, k, seed=1)
    if only:
        arms = {a: f for a, f in arms.items() if a in only or a == "randn-matmul"}
    times = time_rounds(arms, reps=reps, warmup=warmup, device=device)
    med = medians(times)
    return [{
        "case": name, "family": "projection", "dtype": str(dtype).replace("torch.", ""), "n_tensors": len(shapes),
        "numel": d, "impl": impl, "median_s": t, "k": k, "batch": PROJECTION_BATCH,
        "vs_randn_matmul": paired_ratio(times, impl, "randn-matmul"),
        "vs_randn_matmul_iqr": paired_iqr(times, impl, "randn-matmul"),
    } for impl, t in med.items()]


def write_outputs(rows, info, device, args, out_dir: Path) -> Path:
    """``kernels_<device>[_<tag>].{json,md,png}`` in ``out_dir``; returns the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"kernels_{device.type}" + (f"_{args.tag}" if args.tag else ""))
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    payload = {"machine": info, "device": device.type, "reps": args.reps, "families": families,
               "hyperparameters": HP, "adahessian_hyperparameters": {**ADA_HP, "step": ADA_STEP},
               "projection": {"batch": PROJECTION_BATCH, "k": PROJECTION_K}, "rows": rows}
    atomic_write_json(stem.with_suffix(".json"), payload)
    lines = [
        f"# {' and '.join(FAMILIES[f] for f in families) or 'Kernel'} microbenchmarks ({device.type})", "",
        f"Machine: {machine_line(info)}. Median of {args.reps} runs after {args.warmup} warm-up; implementations "
        "timed in turn, one call each per round, each call after a 256 MiB buffer is rewritten (cold cache); ratios "
        "are medians of per-round ratios, `IQR` their 25th-75th percentiles. Bandwidth = bytes that must move / time "
        "(Sophia 24, AdaHessian 32, AdamW 28 B per fp32 parameter); % of copy = that over a flat `copy_` of as many "
        "elements timed in the same rounds (relative: a CPU copy also pays write-allocate). `x paper` = speed-up "
        "over the paper's per-tensor loop; `/ adamw-fused` = time relative to `torch.optim.AdamW(fused=True)`.",
    ]
    notes = {
        "sophia": "",
        "adahessian": "AdaHessian reads p, g, m, v, D and writes p, m, v (32 B/param); "
                      f"lr {ADA_HP['lr']:g}, betas ({ADA_HP['beta1']:g}, {ADA_HP['beta2']:g}), eps {ADA_HP['eps']:g}, "
                      f"weight decay {ADA_HP['weight_decay']:g}, Hessian power {ADA_HP['hessian_power']:g}, step "
                      f"{ADA_STEP}. There is no paper-loop arm here, so `x paper` is `-`.",
        "projection": f"`g @ R`, `g` [{PROJECTION_BATCH}, d] (d = the case's elements), `R` [d, {PROJECTION_K}]; "
                      "`/ randn-matmul` = time relative to drawing `R` with `torch.randn` and multiplying (the torch "
                      f"baseline); the eager reference runs only up to d = {PROJECTION_REFERENCE_MAX:,}.",
    }
    for family in families:
        lines += ["", f"## {FAMILIES[family]}", ""]
        if notes[family]:
            lines += [notes[family], ""]
        fam_rows = [r for r in rows if r["family"] == family]
        if family == "projection":
            lines += ["| case | d | dtype | impl | median | / randn-matmul | IQR |", "|---|---:|---|---|---:|---:|---|"]
            for r in fam_rows:
                iqr = r.get("vs_randn_matmul_iqr")
                lines.append(f"| {r['case']} | {r['numel']:,} | {r['dtype']} | {r['impl']} | {r['median_s'] * 1e3:.2f} ms"
                             f" | {r['vs_randn_matmul']:.2f} | {f'{iqr[0]:.2f}-{iqr[1]:.2f}' if iqr else '-'} |")
            continue
        lines += [
            "| case | dtype | tensors | params | impl | median | GB/s | % of copy | x paper | / adamw-fused | IQR |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in fam_rows:
            vs = f"{r['vs_adamw_fused']:.2f}" if r["vs_adamw_fused"] is not None else "-"
            paper = f"{r['vs_paper_loop']:.1f}" if r["vs_paper_loop"] is not None else "-"
            iqr = r.get("vs_adamw_fused_iqr")
            spread = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
            lines.append(
                f"| {r['case']} | {r['dtype']} | {r['n_tensors']} | {r['numel'] / 1e6:.1f}M | {r['impl']} | "
                f"{r['median_s'] * 1e3:.2f} ms | {r['bandwidth_gbs']:.1f} | {r['pct_of_copy']:.0f}% | "
                f"{paper} | {vs} | {spread} |"
            )
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    _plot(rows, families, info, device, stem)
    print("\n".join(lines))
    return stem


def _plot(rows, families, info, device, stem: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; the table and JSON are the record
        return
    steps = [f for f in families if f != "projection"]
    if not steps:
        return
    fig, axes = plt.subplots(1, len(steps), figsize=(7 * len(steps), 4), squeeze=False)
    for ax, family in zip(axes[0], steps):
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
    plt.close(fig)


def _names(value: str | None) -> list[str] | None:
    """A comma-separated option: ``None`` when not given, ``[]`` for ``none``."""
    if value is None:
        return None
    return [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",")]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``soulkit bench kernels`` (also ``benchmarks/kernel_bench.py``'s)."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--sizes", default=None, help="flat sizes in M elements, comma-separated ('none': no flat case)")
    ap.add_argument("--layouts", default=None, help=f"comma-separated: {', '.join(LAYOUTS)} ('none': no layout)")
    ap.add_argument("--families", "--kernels", dest="families", default="sophia,adahessian",
                    help=f"kernel families, comma-separated: {', '.join(FAMILIES)} (default: sophia,adahessian)")
    ap.add_argument("--dtypes", default="fp32", help=f"parameter dtypes, comma-separated: {', '.join(DTYPES)}")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--impls", default=None,
                    help="only these implementations, comma-separated (e.g. sophia-compiled,adamw-fused)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: ./bench-results)")
    ap.add_argument("--tag", default="", help="write kernels_<device>_<tag>.* (keeps the default run's results)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return ap


def run(args: argparse.Namespace, default_out: Path | None = None) -> Path:
    """Run the benchmark the options describe; every bad option is a ``ValueError`` naming it, raised
    before anything is timed. Returns the stem of the written files."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no usable CUDA device (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    cuda = device.type == "cuda"
    families = _names(args.families) or []
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"--kernels: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    dtype_names = _names(args.dtypes) or []
    bad = [d for d in dtype_names if d not in DTYPES]
    if bad or not dtype_names:
        raise ValueError(f"--dtypes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(DTYPES)}")
    known = {name for f in families for name in arm_names(device, f)}
    only = set(_names(args.impls) or []) or None
    if only and only - known:
        raise ValueError(f"--impls: unknown on {device.type} for {', '.join(families)}: "
                         f"{', '.join(sorted(only - known))} (known: {', '.join(sorted(known))})")
    sizes = _names(args.sizes)
    try:
        sizes = [float(s) for s in sizes] if sizes is not None else ([1, 4, 16, 64, 256] if cuda else [1, 4, 16, 64])
    except ValueError:
        raise ValueError(f"--sizes: numbers of M elements, comma-separated, got {args.sizes!r}") from None
    layouts = _names(args.layouts)
    layouts = layouts if layouts is not None else (["gpt2-small", "llama-1b"] if cuda else ["gpt2-small"])
    if set(layouts) - set(LAYOUTS):
        raise ValueError(f"--layouts: unknown {', '.join(sorted(set(layouts) - set(LAYOUTS)))}; choose from "
                         f"{', '.join(LAYOUTS)} or none")
    if args.reps is not None and args.reps < 1:
        raise ValueError("--reps must be >= 1")
    args.reps = args.reps or (20 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info))
    cases = [(f"flat {s:g}M", [(int(s * 2**20),)]) for s in sizes] + [(name, LAYOUTS[name]()) for name in layouts]
    rows = []
    for name, shapes in cases:
        for family in families:
            for dname in dtype_names:
                print(f"{name}, {family}, {dname} ...", flush=True)
                rows += bench_case(name, shapes, device, args.reps, args.warmup, only, family, DTYPES[dname])
    out = args.out or default_out or Path("bench-results")
    return write_outputs(rows, info, device, args, Path(out))


def main(argv=None, default_out: Path | None = None) -> int:
    """Command-line entry (``benchmarks/kernel_bench.py``); bad options end in one line and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        run(args, default_out)
    except ValueError as e:
        print(f"kernels: error: {e}", file=sys.stderr)
        return 1
    return 0
