"""Influence throughput on a Llama LM: soulkit EK-FAC on 1 and 2 gloo processes vs kronfluence EK-FAC (issue 14).

**Question.** How many training sequences per second does each library fit EK-FAC factors on, and score
against a fixed set of queries, on the largest model this 2-core CPU allows for one run of about a quarter
of an hour -- and how much does a second process (gloo, one thread each) add to soulkit's?

**Model and data.** A transformers ``LlamaForCausalLM`` from :func:`soulkit._causal_lm.build_model`, random
initialisation (seed 0: what fitting and scoring cost does not depend on what the weights learnt), tied
embeddings, SDPA attention, ``--layers`` (4) layers of hidden size ``--hidden`` (384; 6 heads of 64, MLP 1,024),
``--vocab`` (8,192) tokens, ``--seq-len`` (128) positions: 10.2M parameters, 7.1M of them in the 28 tracked
modules (soulkit's default: every ``nn.Linear`` except the tied LM head; the same names are given to
kronfluence). Data: ``--sequences`` (128) training sequences and ``--queries`` (8) query sequences of
uniformly random tokens (seeded), no padding; the per-sequence loss is the summed next-token cross-entropy
(``benchmarks/influence_lm_lds.py``'s ``LM_LOSS`` and kronfluence ``LMTask``, imported from there).

**Size choice (fixed before the run, from smoke timings on this machine, CPU seconds on one thread).** The
budget is one default run of at most 15 minutes of wall time on 2 idle cores. At 6 layers x 512 (23.1M
parameters) soulkit's EK-FAC took 43 s of CPU to fit and 14 s to score 32 sequences: ~1 s per sequence to fit
(two passes with statistics, and EK-FAC's eigenvalue refit, whose per-sequence rotation into the
eigenbases costs ``out^2 in + out in^2`` per module, more than the forward + backward at this width) and
~0.4 s to score, i.e. about 3.7 s of wall time per sequence per round for the three timed arms: only ~40
sequences would fit the budget. At 4 layers x 384 (10.2M), 64 sequences took soulkit 35 s of CPU to fit and
14 s to score (1 process), its 2 ranks 63 s of CPU together (each rank repeats the eigendecompositions and
the store's fingerprints), kronfluence 38 s: about 0.75 s and 0.6 s per sequence, so a round of 128
sequences (4 batches, 2 per rank) is ~4 minutes (1 process each ~100 s and ~75 s, soulkit's 2 processes
~65 s) and the whole default run (3 rounds, the warm-up ~1 min, damping and start-up ~0.5 min) ~13
minutes; 5 or 6 layers, or 192 sequences, would not fit. The GPT-2-small-shaped run of
``benchmarks/influence_scale.py`` (124M, ~15 min per phase for 256 sequences) is far outside the budget.

**Arms** (same model, data, tracked modules, batches of 32, damping; the true Fisher with one sampled label
per token, label seed 0):

* ``soulkit ekfac, 1 process``: what ``soulkit influence`` does (``soulkit/influence/lm_command.py``):
  ``InfluenceAnalyzer(model, LM_LOSS, solver="ekfac", l2=0, damping=lambda, fisher="true",
  fisher_samples=1, batch_size=32, seed=0)`` with an :class:`~soulkit.influence.InfluenceStore` in a fresh
  temporary directory (``--chunk-batches`` (1) training batch per score chunk, default checkpointing):
  fit = the store's fingerprints + covariances + eigendecompositions + EK-FAC's eigenvalue refit; scores =
  the query gradients + one pass over the training set, chunks written to the store and joined.
* ``soulkit ekfac, 2 processes``: the same calls in 2 ranks (``torch.multiprocessing`` spawn, gloo on the
  loopback interface, 1 torch thread each) sharing one store, i.e. the library's own distributed path
  (``Sharding``: rank ``r`` takes the training batches and score chunks ``k % 2 == r``, the factor sums are
  all-reduced, rank 0 joins the scores). The ranks are started once, before the rounds, and wait on a pipe
  between calls, so process start and imports are not timed; each call is timed on rank 0 between barriers.
* ``kronfluence ekfac, 1 process``: ``benchmarks/influence_lm_lds.py``'s ``kron_scores`` (``prepare_model`` on
  a copy, ``Analyzer(cpu=True)``, ``fit_all_factors`` with ``FactorArguments(strategy="ekfac",
  use_empirical_fisher=False)``, ``compute_pairwise_scores`` with ``damping_factor=lambda``, its default
  dtypes, factors and scores written to a temporary directory and read back), fit = ``fit_all_factors``,
  scores = ``compute_pairwise_scores`` + load; its setup is reported beside.
* ``kronfluence ekfac, 2 processes``: kronfluence enables distribution only through
  ``kronfluence.utils.state.State``, which does so when ``LOCAL_RANK`` is set, ``cpu=False`` and CUDA is
  available (initialising nccl); otherwise it reports one process and every rank would compute everything.
  The 2 ranks above build kronfluence's ``State`` the way ``torchrun`` would have them (``LOCAL_RANK``,
  ``RANK``, ``WORLD_SIZE`` set, gloo already initialised, ``cpu=True`` and ``cpu=False``) and the table
  records what it reports instead of a number when it is not 2.

**Damping (as ``influence_lm_lds.py``).** ``lambda = 0.1 x`` the mean eigenvalue of the empirical Fisher of
the tracked parameters, ``0.1 * mean_j ||grad loss_j||^2 / p``, here over the first ``min(32, n)`` training
sequences (plain autograd, one at a time, before anything is timed), one number for both libraries.

**Metric.** Training sequences per second = ``n / seconds`` for fitting and for scoring separately (and for
both), median over ``--rounds`` (3) rounds of ``benchmarks/_timing.py``'s ``time_rounds`` (every arm once
per round, in turn, the order rotated each round, no cold-cache buffer); before the rounds every arm runs
once, untimed, on the first 64 sequences and 2 queries cut to their first 16 tokens (lazy imports and
initialisation, the allocator; every code path runs, at a fraction of a round's cost). Ratios are
paired: the median over rounds of the per-round ratio (soulkit / kronfluence throughput at 1 process;
soulkit 2 processes / 1 process). The CPU seconds of each phase (both ranks summed) are given beside, so
that a loaded machine (wall >> CPU) shows. Check: the 2-process scores of the last round against the
1-process ones (max absolute difference, and relative to the largest score), and rank 0 against rank 1
(bitwise); soulkit vs kronfluence scores are correlated only as a sanity check (other label draws).

**Cost.** The default run takes about 13 minutes of wall time on 2 idle cores (see the size choice);
``--quick`` (a smoke test: 2 layers, hidden 64, vocabulary 512, 32 positions, 64 sequences) well under a
minute after start-up.

    .venv-peers/bin/python benchmarks/influence_throughput.py [--quick] [--rounds 3] [--sequences 128]
        [--layers 4] [--hidden 384] [--tag _x]

Run from ``.venv-peers`` so that kronfluence is importable (without it its rows record the import error).
Writes ``benchmarks/results/influence_throughput{tag}.{json,md}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _timing import paired_ratio, time_rounds  # noqa: E402
from influence_lm_lds import (  # noqa: E402
    BATCH,
    DAMPING_SCALE,
    KRON_ERROR,
    LM_LOSS,
    Sequences,
    _version,
    empirical_fisher_mean_eigenvalue,
    kron_scores,
)

from soulkit._causal_lm import ModelConfig, build_model  # noqa: E402
from soulkit._io import atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.bench.machine import loopback_interface  # noqa: E402
from soulkit.influence import InfluenceAnalyzer  # noqa: E402
from soulkit.influence.modules import tracked_modules  # noqa: E402
from soulkit.influence.store import InfluenceStore, model_fingerprint  # noqa: E402

RESULTS = HERE / "results"
WORLD = 2
WARMUP_SEQUENCES = 64
WARMUP_QUERIES = 2
WARMUP_TOKENS = 16  # the warm-up calls see the first 16 positions only: cheap, but every code path runs
DAMPING_SEQUENCES = 32
RANK_TIMEOUT_S = 3600.0  # a guard against a hung collective
S1, S2, K1, K2 = ("soulkit ekfac, 1 process", "soulkit ekfac, 2 processes", "kronfluence ekfac, 1 process",
                  "kronfluence ekfac, 2 processes")
PHASES = ("fit", "scores")


# ------------------------------------------------------------------------------------ model and data


def model_config(cfg: dict) -> ModelConfig:
    return ModelConfig(arch="llama", hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_heads=cfg["heads"],
                       max_positions=cfg["seq_len"])  # fmt: skip


def make_model(cfg: dict):
    with torch.random.fork_rng():
        return build_model(model_config(cfg), vocab_size=cfg["vocab"], seed=cfg["seed"]).eval()


def make_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, T]`` training and ``[m, T]`` query sequences of uniformly random tokens (seeded)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    xtr = torch.randint(0, cfg["vocab"], (cfg["sequences"], cfg["seq_len"]), generator=g)
    xq = torch.randint(0, cfg["vocab"], (cfg["queries"], cfg["seq_len"]), generator=g)
    return xtr, xq


# ------------------------------------------------------------------------------------------- the arms


def soulkit_call(model, xtr, xq, damping: float, store_dir: Path, chunk_batches: int) -> dict:
    """One fit + scores of soulkit EK-FAC through a fresh store (as ``soulkit influence`` does); under an
    initialised process group the ranks split the work. Wall and CPU seconds of each phase, and the scores.
    Under torch.distributed the phases are timed between barriers, so that they hold the slowest rank."""
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()

    def sync():
        if dist_on:
            dist.barrier()

    train, queries = Sequences(xtr), Sequences(xq)
    sync()
    w0, c0 = time.perf_counter(), time.process_time()
    an = InfluenceAnalyzer(model, LM_LOSS, solver="ekfac", l2=0.0, damping=damping, fisher="true", fisher_samples=1,
                           seed=0, batch_size=BATCH, progress=False)  # fmt: skip
    store = InfluenceStore(store_dir, chunk_batches=chunk_batches)
    w1, c1 = time.perf_counter(), time.process_time()
    an.fit(train, store=store)
    sync()
    w2, c2 = time.perf_counter(), time.process_time()
    s = an.scores(train, queries, store=store)
    sync()
    w3, c3 = time.perf_counter(), time.process_time()
    return {"wall": {"setup": w1 - w0, "fit": w2 - w1, "scores": w3 - w2},
            "cpu": {"setup": c1 - c0, "fit": c2 - c1, "scores": c3 - c2}, "cpu_total": c3 - c0,
            "fit_phases": dict(an.factored.fit_seconds), "scores_tensor": s.detach().double().cpu()}  # fmt: skip


def kron_call(model, xtr, xq, damping: float, names: list[str]) -> dict:
    """One ``kron_scores`` (prepare_model on a copy, fit_all_factors, pairwise scores), timed by phase."""
    phases: dict = {}
    c0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = kron_scores(model, Sequences(xtr), Sequences(xq), "ekfac", damping, 0, names, phases)
    cpu = time.process_time() - c0
    setup, fit, scores = phases.values()  # kron_scores fills them in this order (wall clock only)
    return {"wall": {"setup": setup, "fit": fit, "scores": scores}, "cpu_total": cpu,
            "scores_tensor": torch.from_numpy(s)}


# ------------------------------------------------------------------------------------- the 2-rank pool


def kronfluence_state_probe(rank: int, world: int) -> dict:
    """What kronfluence's process state reports inside an initialised gloo group, with the environment
    ``torchrun`` sets, for ``cpu=True`` and ``cpu=False``."""
    if KRON_ERROR:
        return {"error": KRON_ERROR}
    from kronfluence.utils.state import State

    env = {"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out: dict = {"cuda_available": torch.cuda.is_available()}
    try:
        for cpu in (True, False):
            State._reset_state()
            try:
                st = State(cpu=cpu)
                out[f"cpu={cpu}"] = {"num_processes": st.num_processes, "process_index": st.process_index,
                                     "device": str(st.device)}  # fmt: skip
            except Exception as err:  # noqa: BLE001 - recorded
                out[f"cpu={cpu}"] = {"error": f"{type(err).__name__}: {err}"}
        State._reset_state()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def rank_main(rank: int, world: int, cfg: dict, rendezvous: str, conn) -> None:
    """One rank: join the gloo group, build the model and data, then run the commands read from ``conn``
    (``("soulkit", n, m, store_dir)``, ``("probe",)``; ``None`` ends) and send back each result (or the
    error's traceback). Leaves with ``os._exit`` after the group is destroyed (gloo's teardown can abort a
    finished process; see ``tests/_dist.py``)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := loopback_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        model = make_model(cfg)
        xtr, xq = make_data(cfg)
        conn.send(("ready", {"model": model_fingerprint(model), "threads": torch.get_num_threads()}))
    except Exception:  # noqa: BLE001 - sent to the coordinator
        conn.send(("error", traceback.format_exc()))
        os._exit(1)
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        try:
            if cmd[0] == "soulkit":
                _, n, m, t, store_dir = cmd
                r = soulkit_call(model, xtr[:n, :t], xq[:m, :t], cfg["damping"], Path(store_dir), cfg["chunk_batches"])
                r["rank"] = rank
                conn.send(("ok", r))
            elif cmd[0] == "probe":
                conn.send(("ok", kronfluence_state_probe(rank, world)))
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception:  # noqa: BLE001 - sent to the coordinator
            conn.send(("error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Ranks:
    """``WORLD`` spawned ranks that wait for commands; :meth:`call` sends one to every rank and returns the
    replies in rank order (a rank's error raises ``RuntimeError`` with its traceback)."""

    def __init__(self, cfg: dict, workdir: Path):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        rendezvous = str(workdir / "rendezvous")
        for r in range(WORLD):
            here, there = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(r, WORLD, cfg, rendezvous, there), daemon=True)
            p.start()
            self.conns.append(here)
            self.procs.append(p)
        self.ready = self._replies()

    def _replies(self) -> list:
        out = []
        for r, (c, p) in enumerate(zip(self.conns, self.procs)):
            deadline = time.monotonic() + RANK_TIMEOUT_S
            while not c.poll(1.0):
                if not p.is_alive():
                    raise RuntimeError(f"rank {r} exited (code {p.exitcode}) without replying")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {r} did not reply within {RANK_TIMEOUT_S:.0f} s")
            status, value = c.recv()
            if status == "error":
                raise RuntimeError(f"rank {r}: {value}")
            out.append(value)
        return out

    def call(self, cmd: tuple) -> list:
        for c in self.conns:
            c.send(cmd)
        return self._replies()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:  # only the ranks started above
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------------------------------ reporting


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    c, m = report["config"], report["model"]
    rows = report["rows"]
    lines = [
        "# Influence throughput: soulkit EK-FAC (1 and 2 gloo processes) vs kronfluence EK-FAC on a Llama LM",
        "",
        f"Machine: {machine_line(report['machine'])}. Load average at start "
        f"{report['machine'].get('load_avg_1_5_15')}, at end {report.get('load_avg_end')}. "
        f"Total run time {report['seconds'] / 60:.1f} min wall.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Versions: soulkit {report['versions']['soulkit']}, kronfluence {report['versions']['kronfluence']}, "
        f"transformers {report['versions']['transformers']}, torch {report['versions']['torch']}.",
        "",
        f"Model: `LlamaForCausalLM` (random init, seed {c['seed']}), {c['layers']} layers, hidden {c['hidden']}, "
        f"{c['heads']} heads, MLP {m['intermediate_size']}, vocabulary {c['vocab']}, tied embeddings, SDPA: "
        f"**{m['parameters']:,} parameters**; tracked: {m['tracked_modules']} `nn.Linear` modules "
        f"({m['tracked_parameters']:,} parameters). Data: {c['sequences']} training and {c['queries']} query "
        f"sequences of {c['seq_len']} uniformly random tokens; batches of {c['batch']}; soulkit's store: "
        f"score chunks of {c['chunk_batches']} batch(es). Damping lambda = {DAMPING_SCALE} x mean eigenvalue of "
        f"the empirical Fisher over the first {report['damping_sequences']} sequences = {report['damping']:.4g} "
        "for both libraries; true Fisher, one sampled label per token.",
        "",
        f"Protocol: each arm once untimed on {WARMUP_SEQUENCES} sequences of {WARMUP_TOKENS} tokens, then {c['rounds']} rounds of "
        "`_timing.time_rounds` (arms in turn, order rotated); sequences/s = n / median seconds of the phase; "
        "ratios = median over rounds of the per-round ratio. CPU / wall per call: medians of the whole call's CPU seconds "
        "(both ranks summed) and wall seconds (setup + fit + scores): CPU well below wall x processes means "
        "the machine was busy with something else.",
        "",
        "| arm | fit seq/s | scores seq/s | fit + scores seq/s | fit s (rounds) | scores s (rounds) | setup s | CPU s / wall s per call |",
        "|---|---:|---:|---:|---|---|---|---:|",
    ]  # fmt: skip
    for name in (S1, S2, K1, K2):
        r = rows[name]
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['fit']['sequences_per_s']:.2f} | {r['scores']['sequences_per_s']:.2f} | "
            f"{r['total']['sequences_per_s']:.2f} | {', '.join(f'{x:.1f}' for x in r['fit']['seconds'])} | "
            f"{', '.join(f'{x:.1f}' for x in r['scores']['seconds'])} | "
            f"{r['setup_median']:.2f} | {statistics.median(r['call_cpu_seconds']):.1f} / "
            f"{statistics.median(r['call_wall_seconds']):.1f} |"
        )  # fmt: skip
    lines += ["", "| ratio (paired median over rounds) | fit | scores | fit + scores |", "|---|---:|---:|---:|"]
    for label, rr in report["ratios"].items():
        lines.append(f"| {label} | {_fmt(rr.get('fit'), '.2f')} | {_fmt(rr.get('scores'), '.2f')} | "
                     f"{_fmt(rr.get('total'), '.2f')} |")  # fmt: skip
    lines.append("")
    chk = report.get("score_check") or {}
    if chk:
        lines.append(
            f"- 2-process vs 1-process soulkit scores (last round): max |diff| {chk['max_abs_diff']:.3g} "
            f"({chk['max_abs_diff_relative']:.3g} of the largest |score| {chk['max_abs_score']:.3g}); rank 0 and "
            f"rank 1 return {'identical' if chk['ranks_identical'] else 'DIFFERENT'} tensors."
        )  # fmt: skip
    if "pearson_soulkit_vs_kronfluence" in report:
        lines.append(f"- soulkit vs kronfluence EK-FAC scores (1 process, last round): Pearson "
                     f"{report['pearson_soulkit_vs_kronfluence']:.3f} (sanity check only: other label draws).")
    for name in (S1, S2):
        fp = rows[name].get("fit_phases_median")
        if fp:
            lines.append(f"- {name}, fit by phase (median s): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in fp.items()) + ".")
    probe = report.get("kronfluence_state_probe")
    if probe:
        lines.append(f"- kronfluence's `State` inside the 2 gloo ranks (torchrun's environment set): {probe}.")
    return "\n".join(lines) + "\n"


def _phase_summary(n: int, wall: list[float]) -> dict:
    med = statistics.median(wall)
    return {"seconds": wall, "median_s": med, "sequences_per_s": n / med, "sequences_per_s_rounds": [n / w for w in wall]}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, 64 sequences")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--sequences", type=int, default=None, help="training sequences (default 128; --quick 64)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="default 4 (--quick 2)")
    ap.add_argument("--hidden", type=int, default=None, help="default 384 (--quick 64)")
    ap.add_argument("--heads", type=int, default=None, help="default hidden / 64 (--quick 2)")
    ap.add_argument("--vocab", type=int, default=None, help="default 8192 (--quick 512)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 128 (--quick 32)")
    ap.add_argument("--chunk-batches", type=int, default=1, help="soulkit's store: training batches per score chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. _smoke)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    q = args.quick
    hidden = args.hidden or (64 if q else 384)
    cfg = {"layers": args.layers or (2 if q else 4), "hidden": hidden,
           "heads": args.heads or (2 if q else max(1, hidden // 64)), "vocab": args.vocab or (512 if q else 8192),
           "seq_len": args.seq_len or (32 if q else 128), "sequences": args.sequences or (64 if q else 128),
           "queries": args.queries, "batch": BATCH, "chunk_batches": args.chunk_batches, "rounds": args.rounds,
           "seed": args.seed, "quick": q}  # fmt: skip
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    report: dict = {
        "machine": machine_info(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "versions": {"soulkit": _version("soulkit"), "kronfluence": _version("kronfluence"),
                     "transformers": _version("transformers"), "torch": torch.__version__},  # fmt: skip
        "kronfluence_error": KRON_ERROR,
        "config": cfg,
    }
    model = make_model(cfg)
    xtr, xq = make_data(cfg)
    n, names = cfg["sequences"], [t.name for t in tracked_modules(model)]
    mods = dict(model.named_modules())
    report["model"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "intermediate_size": model.config.intermediate_size,
        "tracked_modules": len(names),
        "tracked_parameters": sum(p.numel() for nm in names for p in mods[nm].parameters(recurse=False)),
        "tracked": names,
    }
    print(f"model: {report['model']['parameters']:,} parameters, {len(names)} tracked modules "
          f"({report['model']['tracked_parameters']:,}); data {n} x {cfg['seq_len']}", flush=True)
    k = min(DAMPING_SEQUENCES, n)
    t0 = time.perf_counter()
    mean_eig, _ = empirical_fisher_mean_eigenvalue(model, xtr[:k], names)
    damping = DAMPING_SCALE * mean_eig
    cfg["damping"] = damping
    report.update(damping=damping, fisher_mean_eigenvalue=mean_eig, damping_sequences=k,
                  damping_seconds=time.perf_counter() - t0)  # fmt: skip
    print(f"damping = {DAMPING_SCALE} x {mean_eig:.4g} = {damping:.4g} ({time.perf_counter() - t0:.0f} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="influence_throughput_"))
    errors: dict[str, str] = {}
    if KRON_ERROR:
        errors[K1] = errors[K2] = KRON_ERROR
    results: dict[str, list[dict]] = {a: [] for a in (S1, S2, K1)}
    ranks = None
    try:
        t0 = time.perf_counter()
        try:
            ranks = Ranks(cfg, work)
            fps = {r["model"] for r in ranks.ready}
            if fps != {model_fingerprint(model)}:
                raise RuntimeError("the ranks built other weights than the coordinator")
            print(f"{WORLD} ranks ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as err:  # noqa: BLE001 - recorded
            errors[S2] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
            traceback.print_exc()
        if ranks is not None and not KRON_ERROR:
            try:
                probe = ranks.call(("probe",))
            except RuntimeError as err:
                probe = [{"error": str(err).strip().splitlines()[-1][:300]}]
            report["kronfluence_state_probe"] = probe[0]
            st = probe[0].get("cpu=False", {})
            if st.get("num_processes") != WORLD:
                errors[K2] = ("not supported on the CPU: in 2 gloo ranks with torchrun's environment, kronfluence's "
                              f"State reports num_processes={st.get('num_processes')} for cpu=False and "
                              f"{probe[0].get('cpu=True', {}).get('num_processes')} for cpu=True (it distributes "
                              "only with CUDA and nccl), so each rank would compute everything"
                              if "error" not in probe[0] else f"the State probe failed: {probe[0]['error']}")  # fmt: skip
            else:
                errors[K2] = (f"not run: kronfluence's State reports {WORLD} processes on {st.get('device')} (CUDA and "
                              "nccl present); this benchmark times the CPU only")  # fmt: skip
            print(f"kronfluence State probe: {probe}", flush=True)
        calls = {"n": 0}

        def store_dir() -> Path:
            calls["n"] += 1
            return work / f"store-{calls['n']}"

        def run_arm(arm: str, n_: int, m_: int, t_: int, keep: bool) -> None:
            if arm in errors:
                return
            try:
                if arm == S1:
                    d = store_dir()
                    r = soulkit_call(model, xtr[:n_, :t_], xq[:m_, :t_], damping, d, cfg["chunk_batches"])
                    shutil.rmtree(d, ignore_errors=True)
                elif arm == S2:
                    d = store_dir()
                    both = ranks.call(("soulkit", n_, m_, t_, str(d)))
                    shutil.rmtree(d, ignore_errors=True)
                    r = dict(both[0])
                    r["cpu"] = {ph: sum(b["cpu"][ph] for b in both) for ph in both[0]["cpu"]}
                    r["cpu_total"] = sum(b["cpu_total"] for b in both)
                    r["ranks_identical"] = bool(torch.equal(both[0]["scores_tensor"], both[1]["scores_tensor"]))
                else:
                    r = kron_call(model, xtr[:n_, :t_], xq[:m_, :t_], damping, names)
                torch.set_num_threads(1)
                if keep:
                    results[arm].append(r)
                print(f"  {arm}: " + ", ".join(f"{ph} {r['wall'][ph]:.1f}s" for ph in ("setup", *PHASES)), flush=True)
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors[arm] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                traceback.print_exc()

        arms = (S1, S2, K1)
        wn, wm, wt = min(WARMUP_SEQUENCES, n), min(WARMUP_QUERIES, cfg["queries"]), min(WARMUP_TOKENS, cfg["seq_len"])
        print(f"warm-up: each arm once on {wn} sequences of {wt} tokens ...", flush=True)
        for a in arms:
            run_arm(a, wn, wm, wt, keep=False)
        print(f"{args.rounds} timed rounds of {', '.join(arms)} ...", flush=True)
        time_rounds({a: (lambda a=a: run_arm(a, n, cfg["queries"], cfg["seq_len"], keep=True)) for a in arms}, reps=args.rounds,
                    warmup=0, cold_cache=False, rotate=True,
                    after_round=lambda i, t: print(f"round {i + 1} done ({(time.perf_counter() - t_start) / 60:.1f} min)",
                                                   flush=True))  # fmt: skip
    finally:
        if ranks is not None:
            ranks.close()
        shutil.rmtree(work, ignore_errors=True)

    rows: dict[str, dict] = {}
    for arm in (S1, S2, K1, K2):
        rs = results.get(arm) or []
        if arm in errors or len(rs) < args.rounds:
            rows[arm] = {"error": errors.get(arm, "not run")}
            continue
        row = {ph: _phase_summary(n, [r["wall"][ph] for r in rs]) for ph in PHASES}
        row["total"] = _phase_summary(n, [r["wall"]["fit"] + r["wall"]["scores"] for r in rs])
        row["call_cpu_seconds"] = [r["cpu_total"] for r in rs]
        row["call_wall_seconds"] = [sum(r["wall"].values()) for r in rs]
        row["setup_seconds"] = [r["wall"]["setup"] for r in rs]
        row["setup_median"] = statistics.median(row["setup_seconds"])
        if "fit_phases" in rs[0]:
            row["fit_phases_median"] = {k_: statistics.median(r["fit_phases"][k_] for r in rs) for k_ in rs[0]["fit_phases"]}
        rows[arm] = row
    report["rows"] = rows

    def ratio(num: str, den: str) -> dict:
        """Throughput of ``num`` over ``den`` (= den's seconds over num's), paired by round."""
        if "error" in rows[num] or "error" in rows[den]:
            return {}
        out = {}
        for ph in (*PHASES, "total"):
            times = {num: rows[num][ph]["seconds"], den: rows[den][ph]["seconds"]}
            out[ph] = paired_ratio(times, den, num)
        return out

    report["ratios"] = {
        "soulkit / kronfluence throughput, 1 process each": ratio(S1, K1),
        "soulkit 2 processes / kronfluence 1 process": ratio(S2, K1),
        "soulkit 2 processes / 1 process (speedup)": ratio(S2, S1),
    }
    if results[S1] and results[S2]:
        a, b = results[S1][-1]["scores_tensor"], results[S2][-1]["scores_tensor"]
        diff = float((a - b).abs().max())
        top = float(a.abs().max())
        report["score_check"] = {"max_abs_diff": diff, "max_abs_score": top, "max_abs_diff_relative": diff / top,
                                 "ranks_identical": all(r["ranks_identical"] for r in results[S2])}  # fmt: skip
    if results[S1] and results[K1]:
        a, b = results[S1][-1]["scores_tensor"].flatten().numpy(), results[K1][-1]["scores_tensor"].flatten().numpy()
        report["pearson_soulkit_vs_kronfluence"] = float(np.corrcoef(a, b)[0, 1])
    for rs in results.values():
        for r in rs:
            r.pop("scores_tensor", None)
    report["calls"] = results
    report["errors"] = errors
    report["seconds"] = time.perf_counter() - t_start
    try:
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"influence_throughput{args.tag}.json", report)
    atomic_write_text(out / f"influence_throughput{args.tag}.md", markdown(report))
    print(markdown(report), flush=True)
    print(f"wrote {out / f'influence_throughput{args.tag}.md'} ({report['seconds'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
