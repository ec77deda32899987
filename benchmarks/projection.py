"""Random projection of gradient blocks: soulkit's seeded projection vs materialising the matrix.

Projects ``g`` of shape ``[batch, d]`` to ``[batch, k]`` (``g @ R``) with

* ``soulkit-compiled``: :func:`soulkit.kernels.project` on the CPU (``R`` generated in
  ``4096 x k`` row chunks by an inductor-compiled hash, then ``addmm``);
* ``soulkit-triton``: the same call on CUDA (``R`` generated tile by tile in registers);
* ``soulkit-eager``: the plain-torch reference (``implementation="torch"``), for scale;
* ``dense-per-call``: what a projector without a seeded generator does on each call --
  ``torch.randn(d, k)`` from a seeded generator, scaled, then one matmul (memory ``d x k``);
* ``dense-reused``: the same matrix materialised once beforehand and reused: the matmul alone,
  the lower bound when ``d x k`` fits in memory (its memory is the whole matrix, kept).

Each (case, implementation) runs in its own subprocess, so the reported peak memory is the peak
resident-set growth over the process's state after building ``g`` (CPU) or the CUDA allocator's
peak (GPU). Dense rows are skipped (and say so) when ``d x k`` would exceed ``--max-dense-gib``.

    python benchmarks/projection.py                      # CPU, writes results/projection_cpu.{md,json}
    python benchmarks/projection.py --device cuda        # from benchmarks/gpu_check.sh
    python benchmarks/projection.py --quick --out /tmp    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(32, 1 << 18, 512), (32, 1 << 20, 512), (32, 1 << 18, 2048), (32, 1 << 22, 512)]
QUICK_CASES = [(4, 1 << 12, 64)]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl: str, b: int, d: int, k: int, reps: int, device: str, threads: int) -> dict:
    import torch
    from _timing import medians, time_rounds

    from soulkit.kernels import project

    torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.randn(b, d, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if impl == "dense-reused":
        gen = torch.Generator(device=dev).manual_seed(1)
        r = torch.randn(d, k, device=dev, generator=gen).div_(math.sqrt(k))
        fn = lambda: g @ r  # noqa: E731
    elif impl == "dense-per-call":
        def fn():
            gen = torch.Generator(device=dev).manual_seed(1)
            r = torch.randn(d, k, device=dev, generator=gen).div_(math.sqrt(k))
            return g @ r
    else:
        which = {"soulkit-compiled": "compiled", "soulkit-triton": "triton", "soulkit-eager": "torch"}[impl]
        fn = lambda: project(g, k, seed=1, implementation=which)  # noqa: E731
    # Compile / warm up on a small slice first (same k, so the compiled code is reused), so that the
    # peak measured below is the full-size call's own working memory, not the compiler's.
    g_full, g = g, g[:, : min(d, 4096)].contiguous()
    if impl != "dense-reused":
        d_full, d = d, g.shape[1]
        fn()
        d = d_full
    g = g_full
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_mib()
    # one arm per process (the peak memory is its own), so no rounds to pair; no cold-cache buffer either,
    # which would land in the measured peak
    median_s = medians(time_rounds({impl: fn}, reps=reps, warmup=0, device=dev, cold_cache=False))[impl]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else _rss_mib() - rss0
    if impl == "dense-reused":
        peak += d * k * 4 / 2**20  # the kept matrix, allocated before the measurement started
    return {"impl": impl, "batch": b, "d": d, "k": k, "median_s": median_s, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-dense-gib", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, b, d, k = args.worker
        print(json.dumps(worker(impl, int(b), int(d), int(k), args.reps, args.device, args.threads)))
        return 0
    from _machine import machine_info, machine_line

    from soulkit._io import atomic_write_text, to_json

    info = machine_info()
    impls = (["soulkit-triton"] if args.device == "cuda" else ["soulkit-compiled", "soulkit-eager"])
    impls += ["dense-per-call", "dense-reused"]
    rows = []
    for b, d, k in QUICK_CASES if args.quick else CASES:
        for impl in impls:
            dense_gib = d * k * 4 / 2**30
            if impl.startswith("dense") and dense_gib > args.max_dense_gib:
                rows.append({"impl": impl, "batch": b, "d": d, "k": k, "skipped":
                             f"d x k = {dense_gib:.0f} GiB > --max-dense-gib {args.max_dense_gib:g}"})
                continue
            if impl == "soulkit-eager" and d * k > (1 << 28):
                rows.append({"impl": impl, "batch": b, "d": d, "k": k, "skipped": "too slow to time (eager hash)"})
                continue
            cmd = [sys.executable, __file__, "--worker", impl, str(b), str(d), str(k), f"--reps={args.reps}",
                   f"--device={args.device}", f"--threads={args.threads}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                rows.append({"impl": impl, "batch": b, "d": d, "k": k, "skipped": f"failed: {out.stderr[-300:]}"})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    ref_name = "soulkit-triton" if args.device == "cuda" else "soulkit-compiled"
    for r in rows:
        ref = next((x for x in rows if x["impl"] == ref_name and (x["d"], x["k"]) == (r["d"], r["k"])), None)
        if "median_s" in r and ref is not None and "median_s" in ref:
            r["time_vs_soulkit"] = r["median_s"] / ref["median_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"projection_{args.device}"
    payload = {"benchmark": "projection", "machine": info, "device": args.device, "threads": args.threads,
               "reps": args.reps, "command": "python benchmarks/projection.py " + " ".join(argv or sys.argv[1:]),
               "rows": rows}
    atomic_write_text(stem.with_suffix(".json"), to_json(payload))
    lines = [
        f"# Seeded random projection vs a materialised matrix ({args.device})", "",
        f"Machine: {machine_line(info)}; {args.threads} threads; median of {args.reps} calls after one warm-up, "
        "each row in its own process. Peak memory: growth of the peak RSS (CPU) or the CUDA allocator's peak "
        "over the process's state with `g` built; for `dense-reused` the kept matrix is added. "
        f"`x {ref_name}` = time relative to soulkit's default path on this device.", "",
        f"| batch | d | k | implementation | median | x {ref_name} | peak memory |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['d']:,} | {r['k']} | {r['impl']} | skipped: {r['skipped']} | - | - |")
            continue
        rel = f"{r['time_vs_soulkit']:.2f}x" if "time_vs_soulkit" in r else "-"
        lines.append(f"| {r['batch']} | {r['d']:,} | {r['k']} | {r['impl']} | {r['median_s'] * 1e3:.1f} ms | {rel} | "
                     f"{r['peak_mib']:.0f} MiB |")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
