"""Cost of curvature relative to one gradient on a tiny Llama: time and peak memory.

Measured, each in a fresh subprocess (so peak RSS is its own):

* ``gradient``: forward + backward of the LM loss (the unit);
* ``hvp (double backward)`` / ``hvp (forward-over-reverse)``: :func:`soulkit.optim.hvp`, which
  includes its own forward and gradient;
* ``hvp (plain torch)``: the same double backward written directly on the module
  (``autograd.grad(create_graph=True)``, a dot with ``v``, a second ``autograd.grad``): what
  soulkit's ``hvp`` adds on top of torch (argument checks, ``functional_call``) is the difference;
* ``GNB refresh``: the *extra* cost a Sophia refresh adds to a training step, i.e. a step with
  :meth:`Sophia.accumulate_gnb` on the step's own logits minus a step without it;
* ``Hutchinson refresh``: the same for :meth:`Sophia.accumulate_hutchinson` on the step's loss.
* ``gradient (math attention)``: a gradient through the differentiable (math) attention path that
  second-order code must use (SDPA's fused kernels have no double backward): the part of the HVP's
  cost that comes from the attention path rather than from the second derivative;
* ``Rademacher sampling``: drawing the Hutchinson probe vectors for every parameter, as the refresh
  does (the candidate for a fused sampling kernel: it is worth one only if this is a visible share).
* ``label sampling``: drawing the GNB refresh's labels from the step's softmax, with
  ``torch.multinomial`` and with soulkit's inverse-CDF sampler (the refresh uses the latter).

Time ratios are medians of per-repetition ratios (each repetition times a gradient, then the mode,
in the same process: ``benchmarks/_timing.py``); memory is the peak resident-set growth over the
state after building the model and batch, divided by that of a gradient.

    python benchmarks/hvp.py [--layers 2 --hidden 128 --seq 128 --batch 8 --reps 7]
    python benchmarks/hvp.py --layers 4 --hidden 256 --seq 256 --tag larger
Outputs benchmarks/results/hvp[_<tag>].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ["gradient", "gradient-math-attention", "hvp-double-backward", "hvp-plain-torch", "hvp-forward-over-reverse",
         "gnb-refresh", "hutchinson-refresh", "rademacher-sampling", "label-sampling-multinomial",
         "label-sampling-inverse-cdf"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, args) -> dict:
    import torch
    import torch.nn.functional as F
    from _timing import medians, paired_ratio, time_rounds
    from transformers import LlamaConfig, LlamaForCausalLM

    from soulkit.optim import Sophia, differentiable_attention, hvp, module_loss_fn

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (args.batch, args.seq))
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def lm_loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def grad_step(with_refresh=None):
        opt.zero_grad(set_to_none=True)
        if with_refresh == "hutchinson":  # SDPA's fused kernels have no double backward
            with differentiable_attention(model):
                logits = model(ids).logits
        else:
            logits = model(ids).logits
        loss = lm_loss(logits)
        if with_refresh == "gnb":
            opt.accumulate_gnb(logits[:, :-1])
        elif with_refresh == "hutchinson":
            opt.accumulate_hutchinson(loss)
        loss.backward()
        # discard pending estimates so every repetition measures the same work
        opt._take_pending()

    opt = Sophia(model.parameters(), lr=1e-4)
    loss_fn = module_loss_fn(model, lambda call: lm_loss(call(ids).logits))
    if mode == "gradient":
        fn = grad_step
    elif mode.startswith("hvp"):
        m = "double_backward" if "double" in mode else "forward_over_reverse"
        fn = lambda: hvp(loss_fn, params, v, mode=m)  # noqa: E731
    elif mode == "hvp-plain-torch":
        plist, vlist = list(params.values()), list(v.values())

        def fn():  # the textbook double backward on the module itself: soulkit's hvp should add nothing to it
            with differentiable_attention(model):
                loss = lm_loss(model(ids).logits)
                grads = torch.autograd.grad(loss, plist, create_graph=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vlist))
                return torch.autograd.grad(dot, plist)
    elif mode == "gnb-refresh":
        fn = lambda: grad_step("gnb")  # noqa: E731
    elif mode == "gradient-math-attention":
        def fn():
            with differentiable_attention(model):
                grad_step()
    elif mode == "rademacher-sampling":
        gen = torch.Generator().manual_seed(0)
        plist = list(model.parameters())

        def fn():  # what accumulate_hutchinson draws per refresh
            return [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype).mul_(2).sub_(1) for p in plist]
    elif mode.startswith("label-sampling"):
        from soulkit.optim.estimators import sample_from_logits

        with torch.no_grad():
            flat_logits = model(ids).logits[:, :-1].reshape(-1, cfg.vocab_size)
        gen = torch.Generator().manual_seed(0)
        if mode.endswith("multinomial"):  # what the GNB refresh used before: torch.multinomial on the softmax
            fn = lambda: torch.multinomial(torch.softmax(flat_logits, -1), 1, generator=gen)  # noqa: E731
        else:  # soulkit's sampler (one uniform per row, searchsorted on the cumulative softmax)
            fn = lambda: sample_from_logits(flat_logits, generator=gen)  # noqa: E731
    else:
        fn = lambda: grad_step("hutchinson")  # noqa: E731
    base = grad_step  # every mode is timed against a plain gradient in the same process
    with torch.no_grad():
        model(ids)  # one-time lazy initialisation, outside the measured peak
    rss0 = _rss_mib()
    fn()
    peak = _rss_mib() - rss0
    # a gradient and the mode alternate, one call each per repetition (no warm-up round: fn ran above);
    # no cold-cache buffer (whole training steps, not a memory-bound kernel)
    times = time_rounds({"gradient": base, "mode": fn}, reps=args.reps, warmup=0, cold_cache=False)
    med = medians(times)
    return {
        "mode": mode,
        "median_s": med["mode"],
        "gradient_median_s": med["gradient"],
        "time_vs_gradient": paired_ratio(times, "mode", "gradient"),
        "peak_rss_growth_mib": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="write hvp_<tag>.{md,json} instead of hvp.*")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    from _machine import machine_info, machine_line

    info = machine_info()
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode] + [
            f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "seq", "batch", "reps", "threads")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            raise SystemExit(f"worker {mode} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    grad_mem = next(r for r in rows if r["mode"] == "gradient")["peak_rss_growth_mib"]
    for r in rows:  # time_vs_gradient: the worker's paired median
        if r["mode"].endswith("refresh"):
            r["extra_time_vs_gradient"] = r["time_vs_gradient"] - 1.0
        r["memory_vs_gradient"] = r["peak_rss_growth_mib"] / grad_mem if grad_mem > 0 else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "config": {k: getattr(args, k) for k in ("layers", "hidden", "seq", "batch", "reps", "threads")},
               "rows": rows}
    stem = "hvp" + (f"_{args.tag}" if args.tag else "")
    tmp = RESULTS / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, RESULTS / f"{stem}.json")
    lines = [
        "# Curvature cost relative to one gradient (tiny Llama)", "",
        f"Machine: {machine_line(info)}. Model: Llama, {args.layers} layers, hidden {args.hidden}, "
        f"{rows[0]['params'] / 1e6:.2f}M params; batch {args.batch} x {args.seq} tokens; {args.threads} threads; "
        f"{args.reps} repetitions, each mode in its own process, timed alternately with a gradient; time = median "
        "of the per-repetition ratios. "
        "Refresh rows give the *extra* time a refresh adds to a training step (logits reused). "
        "Memory: peak RSS growth over the built model and batch, relative to a gradient's.", "",
        "| what | time vs gradient | extra time (refresh) | peak memory vs gradient |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        extra = f"{r['extra_time_vs_gradient']:.2f}x" if "extra_time_vs_gradient" in r else "-"
        mem = f"{r['memory_vs_gradient']:.2f}x" if r["memory_vs_gradient"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['time_vs_gradient']:.2f}x | {extra} | {mem} |")
    by = {r["mode"]: r for r in rows}
    if "gradient-math-attention" in by:
        math_grad = by["gradient-math-attention"]["time_vs_gradient"]
        lines += ["", "Against a gradient through the same (math) attention path, i.e. the second derivative's own cost: "
                  + ", ".join(f"{m} {by[m]['time_vs_gradient'] / math_grad:.2f}x"
                              for m in ("hvp-double-backward", "hvp-forward-over-reverse") if m in by) + "."]
    tmp = RESULTS / f"{stem}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS / f"{stem}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
