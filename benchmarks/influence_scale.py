"""Factored influence at GPT-2-small shapes on this machine: time per phase and peak memory.

An unmodified transformers ``GPT2LMHeadModel`` with GPT-2 small's configuration (124M parameters,
12 layers, 768 wide, vocabulary 50,257; random weights: the cost does not depend on training),
random token sequences. ``InfluenceAnalyzer(..., solver="ekfac")`` tracks its 48 ``Conv1D``
modules (85M parameters; embeddings and the tied LM head are left out, as by default). Phases:

* ``covariances``: the K-FAC pass over the training sequences (forward, one backward to the
  modules' outputs with sampled labels, input/output-gradient covariances);
* ``eigendecompositions``: 96 symmetric eigendecompositions in float64;
* ``ekfac-eigenvalues``: the second pass refitting the eigenvalues;
* ``query-gradients``: the queries' gradients, preconditioned per module;
* ``train-scores``: the pass over the training sequences contracting their gradients with the queries,
  run with all queries and again with one, so its cost splits into a per-batch part and a part
  proportional to the number of queries.

Peak memory is the process's maximum resident set (``ru_maxrss``) after each phase (after the whole
fit for the fit's three phases, which the analyzer times itself: ``fit_seconds``). The projection
to larger runs scales each phase linearly in what it iterates over (sequences, queries); the
eigendecompositions do not grow. With exact query gradients the preconditioned queries take
``queries x 85M x 4 B``; ``--query-rank r`` keeps each as a rank-r product instead.

    python benchmarks/influence_scale.py                     # 256 sequences x 128 tokens, 16 queries
    python benchmarks/influence_scale.py --sequences 32 --queries 4 --tag smoke
    python benchmarks/influence_scale.py --factors /tmp/gpt2-factors   # fit once; reruns load the factors
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, machine_line  # noqa: E402

from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.influence import InfluenceAnalyzer, OutputLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits[:, :-1]


def _loss(logits, batch):
    return F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none").sum(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--query-rank", type=int, default=None)
    ap.add_argument("--project-sequences", type=int, default=10_000)
    ap.add_argument("--project-queries", type=int, default=100)
    ap.add_argument("--factors", default=None,
                    help="save the fitted factors here, or load them from here when present (reruns skip the fit)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--report-from", default=None,
                    help="rewrite the Markdown (and projection) from a saved results JSON instead of running")
    args = ap.parse_args(argv)
    if args.report_from:
        payload = json.loads(Path(args.report_from).read_text())
        payload.pop("projection", None)
        write_report(payload)
        return
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    info = machine_info()
    print(machine_line(info), flush=True)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.sequences + args.queries, args.seq_len), generator=g)
    train = [{"input_ids": ids[i]} for i in range(args.sequences)]
    queries = [{"input_ids": ids[args.sequences + i]} for i in range(args.queries)]
    an = InfluenceAnalyzer(model, OutputLoss(_logits, _loss), solver="ekfac", l2=0.0, damping=0.0,
                           batch_size=args.batch_size, query_rank=args.query_rank, progress=True)
    fi = an.factored
    tracked = sum(t.numel for t in fi.tracked)
    phases: dict[str, dict[str, float]] = {}
    base_rss = _rss_gib()

    def phase(name, fn):
        t0 = time.perf_counter()
        out = fn()
        phases[name] = {"seconds": time.perf_counter() - t0, "peak_rss_gib": _rss_gib()}
        print(f"{name}: {phases[name]['seconds']:.1f} s, peak RSS {phases[name]['peak_rss_gib']:.2f} GiB", flush=True)
        return out

    t0 = time.perf_counter()
    factors_dir = Path(args.factors) if args.factors else None
    if factors_dir is not None and (factors_dir / "factors.json").is_file():
        an.load_factors(factors_dir, train)  # a fit of this configuration saved by an earlier run
        fit_seconds, rss = fi.factors.meta["fit_seconds"], fi.factors.meta.get("fit_peak_rss_gib", float("nan"))
        print(f"factors loaded from {factors_dir} (fitted by an earlier run)", flush=True)
    else:
        an.fit(train)
        fit_seconds, rss = fi.fit_seconds, _rss_gib()
        if factors_dir is not None:
            fi.factors.meta["fit_peak_rss_gib"] = rss
            an.save_factors(factors_dir)
        print(f"fit: {time.perf_counter() - t0:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    for k, sec in fit_seconds.items():  # the fit's phases, timed by the analyzer itself
        phases[k] = {"seconds": sec, "peak_rss_gib": rss}
        print(f"{k}: {sec:.1f} s", flush=True)
    Q = phase("query-gradients", lambda: fi.query_gradients(queries))
    q_bytes = sum((q[0].numel() + q[1].numel()) * 4 if isinstance(q, tuple) else q.numel() * 4 for q in Q.values())
    del Q
    scores = phase("train-scores", lambda: an.scores(train, queries))
    phases["train-scores"]["seconds"] -= phases["query-gradients"]["seconds"]  # scores() recomputes the queries
    one = phase("train-scores-1query", lambda: an.scores(train, queries[:1]))
    phases["train-scores-1query"]["seconds"] -= phases["query-gradients"]["seconds"] / args.queries
    assert torch.isfinite(scores).all() and torch.allclose(one[0], scores[0], rtol=1e-3, atol=1e-6 * scores.abs().max())

    payload = {
        "machine": info, "config": vars(args), "parameters": n_params, "tracked_parameters": tracked,
        "tracked_modules": len(fi.tracked), "phases": phases, "base_rss_gib": base_rss,
        "preconditioned_queries_gib": q_bytes / 2**30,
    }
    write_report(payload)


def _projection(payload: dict) -> dict:
    """Each phase scaled linearly in what it iterates over; the scoring pass as a per-batch part plus a
    per-query part, split by its runs with all queries and with one. When the one-query run was not
    faster (machine load), the split is unmeasured and the scoring projection is a range: all of the
    pass per batch (low) to all of it per query (high)."""
    cfg, ph = payload["config"], payload["phases"]
    S, M = cfg["project_sequences"] / cfg["sequences"], cfg["project_queries"] / cfg["queries"]
    full, one = ph["train-scores"]["seconds"], ph["train-scores-1query"]["seconds"]
    fixed = {
        "covariances": ph["covariances"]["seconds"] * S,
        "eigendecompositions": ph["eigendecompositions"]["seconds"],
        "ekfac-eigenvalues": ph["ekfac-eigenvalues"]["seconds"] * S,
        "query-gradients": ph["query-gradients"]["seconds"] * M,
    }
    if one < full and cfg["queries"] > 1:
        per_query = (full - one) / (cfg["queries"] - 1)
        low = high = (full - per_query * cfg["queries"] + per_query * cfg["project_queries"]) * S
        split = True
    else:
        low, high, split = full * S, full * M * S, False
    base = sum(fixed.values())
    return {"sequences": cfg["project_sequences"], "queries": cfg["project_queries"], "seconds": fixed,
            "train_scores_seconds": [low, high], "per_query_split_measured": split,
            "total_hours": [(base + low) / 3600, (base + high) / 3600],
            "exact_query_gradients_gib": cfg["project_queries"] * payload["tracked_parameters"] * 4 / 2**30}


def write_report(payload: dict) -> None:
    """``influence_scale[_tag].{json,md}`` from a run's measurements (also from a saved JSON: --report-from)."""
    cfg, info, phases = payload["config"], payload["machine"], payload["phases"]
    proj = payload["projection"] = _projection(payload)
    stem = RESULTS / ("influence_scale" + (f"_{cfg['tag']}" if cfg["tag"] else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem.with_suffix(".json"), payload)
    lines = [
        "# Factored influence (EK-FAC) at GPT-2-small shapes", "",
        f"Machine: {machine_line(info)}. `GPT2LMHeadModel` with GPT-2 small's configuration "
        f"({payload['parameters'] / 1e6:.1f}M parameters, {cfg['layers']} layers, random weights), {cfg['sequences']} "
        f"training and {cfg['queries']} query sequences of {cfg['seq_len']} random tokens, batch {cfg['batch_size']}; "
        f"{payload['tracked_modules']} tracked Conv1D modules ({payload['tracked_parameters'] / 1e6:.1f}M parameters); "
        f"query rank: {cfg['query_rank'] or 'exact'}. Times are wall clock on a shared 2-core VM (indicative); "
        "peak RSS is the process maximum after the phase.", "",
        "| phase | seconds | peak RSS (GiB) |", "|---|---:|---:|",
    ]
    for k, v in phases.items():
        lines.append(f"| {k} | {v['seconds']:.1f} | {v['peak_rss_gib']:.2f} |")
    low, high = proj["train_scores_seconds"]
    lines += [
        "", f"Preconditioned query gradients held: {payload['preconditioned_queries_gib']:.2f} GiB for "
        f"{cfg['queries']} queries.", "",
        f"**Projection to {proj['sequences']:,} sequences x {proj['queries']} queries** (each phase linear in what "
        "it iterates over):", "",
        "| phase | projected seconds |", "|---|---:|",
    ]
    for k, v in proj["seconds"].items():
        lines.append(f"| {k} | {v:,.0f} |")
    if proj["per_query_split_measured"]:
        lines.append(f"| train-scores | {low:,.0f} |")
        total = f"Total {proj['total_hours'][0]:.1f} h on this machine."
    else:
        lines.append(f"| train-scores | {low:,.0f} - {high:,.0f} |")
        total = (f"Total {proj['total_hours'][0]:.1f} - {proj['total_hours'][1]:.1f} h on this machine. The one-query "
                 "scoring run was not faster than the all-query one (other jobs loaded the machine), so the split of "
                 "the scoring pass into per-batch and per-query parts is unmeasured: its projection is the range from "
                 "all per batch to all per query.")
    lines += ["", total + f" Exact preconditioned query gradients for {proj['queries']} queries would take "
              f"{proj['exact_query_gradients_gib']:.1f} GiB; `query_rank` keeps each query as a rank-r product per "
              "module instead."]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
