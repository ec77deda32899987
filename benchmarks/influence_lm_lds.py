"""LDS on a causal LM trained here: soulkit K-FAC / EK-FAC / gradient dot products vs kronfluence, one run.

**Task.** A Llama-architecture byte-level LM (transformers ``LlamaForCausalLM`` from
:func:`soulkit._causal_lm.build_model`: 2 layers, hidden 64, 4 heads, MLP 176, SDPA attention, tied
embeddings, ~117K parameters, vocabulary = the 256 byte values) is trained from scratch on
``--n-train`` (1,024) sequences of ``--seq-len`` (64) bytes of the CPython standard library's ``.py``
sources (:func:`soulkit.demos.lm.corpus.load_text_bytes`: deterministic, no network): windows drawn
without overlap from the training split (seeded). The ``--queries`` (64) query sequences are windows
spread evenly over the *validation* split (other files). The training objective is the mean over
sequences of the per-sequence loss (the sum of the token cross-entropies), Adam (lr 3e-3, 5%
warm-up then cosine to 0, gradient clip 1, batch 32) for ``--epochs`` (10) epochs, fixed
initialisation (seed 0) and data order (seed 0).

**LDS** (Park et al. 2023; :func:`soulkit.influence.lds`): ``--subsets`` (50) random half-size subsets
of the training set, each retrained with the same recipe from the same initialisation and the same
data-order seed; the actual output is each query's loss (summed token cross-entropy) under the
retrained model; the prediction for a subset is the sum of the scores of the removed sequences
(equivalently, minus the sum over the kept ones); LDS = Spearman across subsets, averaged over queries.

**Methods** (same trained model, same tracked modules -- soulkit's default: every ``nn.Linear`` except
the tied LM head, 14 modules, 100K parameters --, same damping, same batches of 32):

* soulkit ``kfac`` / ``ekfac``: ``InfluenceAnalyzer(model, OutputLoss(logits_fn, loss_on_logits),
  solver=..., l2=0, damping=lambda, fisher="true", fisher_samples=1, batch_size=32, seed=0)``;
* soulkit ``identity``: the factored gradient dot product (``solver="identity", modules=[...]``);
* kronfluence ``kfac`` / ``ekfac``: its ``Task`` with ``compute_train_loss`` = the summed token
  cross-entropy per batch (labels sampled from the model's softmax when ``sample=True``: the true
  Fisher, one label per token), ``compute_measurement`` = the query's summed token cross-entropy,
  the same tracked modules, ``damping_factor = lambda``, its default dtypes, seed 0 (``torch.manual_seed``).
  Converted to soulkit's units as ``benchmarks/influence_peers.py`` documents: ``kronfluence / n``.

**Damping (rule fixed before the run).** ``lambda = 0.1 x`` the mean eigenvalue of the empirical
Fisher of the tracked parameters of the trained model, ``0.1 * mean_j ||grad loss_j||^2 / p`` (plain
autograd, one sequence at a time, before any method runs) -- the scale of kronfluence's default
heuristic (0.1 x mean eigenvalue), as one number shared by every method. For reference only (not the
goal), the EK-FAC rows are repeated with each library's own default damping (0.1 x the mean EK-FAC
eigenvalue of each module; the same heuristic in both libraries), untimed.

**Selection rule (fixed before the run).** Everything above is fixed; nothing is tuned on LDS. The
goal rows are the seed-0 runs; because the true Fisher samples labels, K-FAC / EK-FAC of both
libraries are rerun with label-sampling seeds 1..``--spread-seeds - 1`` (untimed) and LDS is also
given as mean +- sd over seeds 0..``--spread-seeds - 1``. Goals (issue 13): soulkit EK-FAC LDS >=
kronfluence EK-FAC's (judged on the seed mean, seed 0 shown too); time to fit + score <= 0.67x
kronfluence EK-FAC's (paired median ratio over rounds); peak memory no higher.

**Time and memory.** Time = fit + scores of one method, from nothing fitted to the ``[64, 1024]``
matrix in memory (kronfluence's includes ``prepare_model`` on a copy of the model and its
safetensors writes and reads to a temporary directory, which is how it works), timed in-process by
``benchmarks/_timing.py``'s ``time_rounds`` (all methods in alternating rounds, rotated, one warm-up
round, ``--reps`` (5) timed rounds, no cold-cache buffer), 1 torch thread, with a reference arm (one
forward + backward pass over the training set) to express each method's time in passes; then one more
call of each K-FAC / EK-FAC method split into phases (fit, scores). Peak memory = the RSS high-water mark
(``VmHWM``) of a fresh subprocess per method that imports torch, transformers, soulkit and kronfluence
and loads the model and data, runs one forward + backward of a training batch (its RSS then,
``VmRSS``, is the baseline), resets the high-water mark
(``echo 5 > /proc/self/clear_refs``, so that the imports' transient peak does not mask the method's),
runs the method once and reads ``VmHWM`` (``--mem-reps`` 3 such processes per method, in turn;
medians) (``resource.getrusage``'s ``ru_maxrss`` where the reset is
not possible: then the imports' peak is a floor); the table gives that peak and the peak above the
baseline.

**CPU budget.** The default run takes about 15 minutes of CPU on 1 thread of this 2-core machine
(the committed run: 14.1 min of CPU, 21 min wall; an earlier run of the same configuration under a
load average of ~6 from other jobs took 38 min wall), well inside the ~75 min allowed: training
~0.5 min, 50 subset retrains ~9 min, the timed rounds, phases and memory subprocesses ~4 min, the
seed spread and reference rows ~1 min. ``--quick`` (a smoke test: 256 sequences, 8 subsets) takes a
few minutes.

    .venv-peers/bin/python benchmarks/influence_lm_lds.py [--quick] [--subsets 50] [--reps 3]

Run from ``.venv-peers`` (``make bench-influence-peers``) so that kronfluence is importable; without
it the kronfluence rows are recorded as not importable. Writes
``benchmarks/results/influence_lm_lds.{md,json,png}`` (``--quick``: ``runs/influence_lm_lds_quick/``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import machine_info, machine_line  # noqa: E402
from _timing import medians, paired_iqr, paired_ratio, time_result, time_rounds  # noqa: E402

from soulkit._causal_lm import ModelConfig, build_model  # noqa: E402
from soulkit._io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.demos.lm.config import TrainConfig  # noqa: E402
from soulkit.demos.lm.corpus import load_text_bytes  # noqa: E402
from soulkit.influence import InfluenceAnalyzer, OutputLoss, lds  # noqa: E402
from soulkit.influence.modules import tracked_modules  # noqa: E402

try:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KronTask

    KRON_ERROR: str | None = None
except Exception as err:  # noqa: BLE001 - recorded in the kronfluence rows
    KRON_ERROR = f"not importable: {type(err).__name__}: {err}"
    KronTask = object

RESULTS = HERE / "results"
VOCAB = 256
BATCH = 32
CORPUS_BYTES = 2_000_000
DAMPING_SCALE = 0.1  # lambda = 0.1 x mean eigenvalue of the empirical Fisher (rule fixed before the run)
GOAL_TIME_RATIO = 0.67
PASS_ARM = "reference: one forward + backward pass over the training set"
METHODS = ("soulkit ekfac", "soulkit kfac", "soulkit identity", "kronfluence ekfac", "kronfluence kfac")
SPREAD_METHODS = ("soulkit ekfac", "soulkit kfac", "kronfluence ekfac", "kronfluence kfac")
DEFAULT_DAMPING_METHODS = ("soulkit ekfac, default damping", "kronfluence ekfac, default damping")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ data


def corpus(n_train: int, n_queries: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``[n_train, T]`` training windows (non-overlapping, drawn from the training split with ``seed``)
    and ``[n_queries, T]`` query windows spread evenly over the validation split (other files)."""
    # 2 MB of sources (~130 files), so that the windows come from all over the library
    cfg = TrainConfig(max_bytes=max(CORPUS_BYTES, int(n_train * seq_len * 2 / 0.9)), seq_len=seq_len, progress=False)
    train, val, info = load_text_bytes(cfg)
    slots = train.numel() // seq_len
    if slots < n_train:
        raise ValueError(f"the training split holds {slots} windows of {seq_len} bytes, fewer than {n_train}")
    pick = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:n_train].sort().values
    xtr = torch.stack([train[i * seq_len : (i + 1) * seq_len] for i in pick.tolist()]).long()
    starts = torch.linspace(0, val.numel() - seq_len, n_queries).round().long()
    xq = torch.stack([val[s : s + seq_len] for s in starts.tolist()]).long()
    info.update(max_bytes=cfg.max_bytes, train_windows_available=int(slots))
    return xtr, xq, info


class Sequences(Dataset):
    """Dict examples ``{"input_ids": [T]}`` (both libraries batch them with the default collate)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def _logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits[:, :-1]


def _sequence_loss(z, batch):
    """Per-sequence loss ``[B]``: the sum of the next-byte cross-entropies (T - 1 terms)."""
    return F.cross_entropy(z.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none").sum(1)


LM_LOSS = OutputLoss(_logits, _sequence_loss)


# --------------------------------------------------------------------------------------------- training


def model_config(args) -> ModelConfig:
    return ModelConfig(arch="llama", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       max_positions=args.seq_len)  # fmt: skip


def new_model(args):
    with torch.random.fork_rng():
        return build_model(model_config(args), vocab_size=VOCAB, seed=args.seed)


def train_lm(ids: torch.Tensor, args):
    """The recipe every model (full and subsets) is trained with: same initialisation, same data-order seed."""
    model = new_model(args).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    per_epoch = math.ceil(len(ids) / BATCH)
    total = args.epochs * per_epoch
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for b in torch.randperm(len(ids), generator=gen).split(BATCH):
            loss = _sequence_loss(_logits(model, {"input_ids": ids[b]}), {"input_ids": ids[b]}).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def losses_of(model, ids: torch.Tensor) -> np.ndarray:
    out = [_sequence_loss(_logits(model, {"input_ids": b}), {"input_ids": b}) for b in ids.split(64)]
    return torch.cat(out).double().numpy()


def subset_masks(n: int, subsets: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        masks[s, rng.choice(n, n // 2, replace=False)] = True
    return masks


def empirical_fisher_mean_eigenvalue(model, ids: torch.Tensor, names: list[str]) -> tuple[float, int]:
    """``mean_j ||grad_tracked loss_j||^2 / p``: the mean eigenvalue of the empirical Fisher (plain autograd)."""
    mods = dict(model.named_modules())
    params = [p for n in names for p in mods[n].parameters(recurse=False) if p.requires_grad]
    p = sum(q.numel() for q in params)
    total = 0.0
    for i in range(len(ids)):
        b = {"input_ids": ids[i : i + 1]}
        grads = torch.autograd.grad(_sequence_loss(_logits(model, b), b).sum(), params)
        total += float(sum(g.double().square().sum() for g in grads))
    return total / len(ids) / p, p


# ---------------------------------------------------------------------------------------------- methods


class LMTask(KronTask):
    """kronfluence's task: summed token cross-entropy (sampled labels for the true Fisher)."""

    def __init__(self, tracked: list[str]):
        self.tracked = tracked

    def compute_train_loss(self, batch, model, sample=False):
        ids = batch["input_ids"]
        z = model(input_ids=ids).logits[:, :-1].float()
        if sample:
            with torch.no_grad():
                labels = torch.distributions.Categorical(logits=z.detach()).sample()
        else:
            labels = ids[:, 1:]
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum")

    def compute_measurement(self, batch, model):
        ids = batch["input_ids"]
        z = model(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")

    def get_influence_tracked_modules(self):
        return self.tracked

    def get_attention_mask(self, batch):
        return None


def soulkit_scores(model, train, queries, method: str, damping: float | None, seed: int, names: list[str],
                   phases: dict | None = None):
    """``[m, n]`` scores of soulkit's factored route (``damping=None``: its default, 0.1 x mean eigenvalue).
    ``phases``: filled with the seconds of ``fit`` and ``scores`` (one call each)."""
    kw = dict(modules=names) if method == "identity" else dict(fisher="true", fisher_samples=1, seed=seed)
    an = InfluenceAnalyzer(model, LM_LOSS, solver=method, l2=0.0, damping=damping or 0.0, batch_size=BATCH,
                           progress=False, **kw)  # fmt: skip
    _, t_fit = time_result(lambda: an.fit(train))
    s, t_scores = time_result(lambda: an.scores(train, queries))
    if phases is not None:
        phases.update({"fit (covariances; EK-FAC: + eigenvalue pass)": t_fit,
                       "scores (query gradients + one pass over train)": t_scores})  # fmt: skip
    return s.double().numpy()


def kron_scores(model, train, queries, strategy: str, damping: float | None, seed: int, names: list[str],
                phases: dict | None = None):
    """``[m, n]`` kronfluence scores converted to soulkit's units (``/ n``); ``damping=None``: its default.
    ``phases``: filled with the seconds of its setup, ``fit_all_factors`` and the pairwise scores."""
    if KRON_ERROR:
        raise RuntimeError(KRON_ERROR)
    task = LMTask(names)
    t0 = time.perf_counter()
    kmodel = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory(prefix="kronfluence_lm_") as d:
        an = Analyzer(analysis_name="lm", model=kmodel, task=task, cpu=True, disable_tqdm=True, output_dir=d)
        t_setup = time.perf_counter() - t0
        torch.manual_seed(seed)  # the sampled labels of the true Fisher
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=False)
        _, t_fit = time_result(lambda: an.fit_all_factors(
            factors_name="f", dataset=train, per_device_batch_size=BATCH, factor_args=fargs,
            overwrite_output_dir=True))  # fmt: skip

        def pairwise():
            an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=queries, train_dataset=train,
                                       per_device_query_batch_size=len(queries), per_device_train_batch_size=BATCH,
                                       score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)  # fmt: skip
            return an.load_pairwise_scores("s")["all_modules"].double().numpy()

        raw, t_scores = time_result(pairwise)
    if phases is not None:
        phases.update({"setup (prepare_model on a copy, Analyzer)": t_setup,
                       "fit_all_factors (covariances, eigendecomposition; EK-FAC: + lambda pass)": t_fit,
                       "compute_pairwise_scores + load": t_scores})  # fmt: skip
    torch.set_num_threads(1)  # accelerate may reset it
    return raw / len(train)


def run_method(name: str, model, train, queries, damping: float, seed: int, names: list[str],
               phases: dict | None = None) -> np.ndarray:
    lib, method = name.split(", ")[0].split(" ")
    lam = None if name.endswith("default damping") else damping
    fn = soulkit_scores if lib == "soulkit" else kron_scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(model, train, queries, method, lam, seed, names, phases)


def one_pass(model, ids: torch.Tensor) -> None:
    """The reference unit of work: one forward + backward of the summed loss over ``ids`` in batches."""
    for b in ids.split(BATCH):
        batch = {"input_ids": b}
        _sequence_loss(_logits(model, batch), batch).sum().backward()
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- memory (workers)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the memory subprocesses)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024.0
    except (OSError, StopIteration, ValueError):
        return None


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), so that
    ``VmHWM`` afterwards is the peak of what runs next, not of the imports before it. (``ru_maxrss`` is not
    reset: it also keeps the high-water marks recorded when threads exited, e.g. during the imports.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, state: Path) -> None:
    """One method in a fresh process: the RSS high-water mark before and after it (``--worker``)."""
    torch.set_num_threads(1)
    cfg = json.loads((state / "config.json").read_text())
    args = argparse.Namespace(**cfg["args"])
    model = new_model(args)
    model.load_state_dict(torch.load(state / "model.pt", weights_only=True))
    model.eval()
    xtr, xq = torch.load(state / "data.pt", weights_only=True)
    train, queries = Sequences(xtr), Sequences(xq)
    # one forward + backward of a training batch first, so that the baseline holds what any method needs
    # (the allocator's and kernels' first-use memory), not only the imports
    b = {"input_ids": xtr[:BATCH]}
    _sequence_loss(_logits(model, b), b).sum().backward()
    model.zero_grad(set_to_none=True)
    import_peak = maxrss_mb()
    base = rss_mb()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    s = run_method(method, model, train, queries, cfg["damping"], 0, cfg["tracked"])
    secs = time.perf_counter() - t0
    peak = _status_mb("VmHWM") if reset else None
    print(json.dumps({"method": method, "baseline_rss_mb": base, "peak_rss_mb": peak if peak is not None else maxrss_mb(),
                      "peak_source": "VmHWM after clear_refs" if peak is not None else "ru_maxrss (not reset)",
                      "peak_before_method_mb": import_peak, "seconds": secs, "shape": list(s.shape)}))  # fmt: skip


def measure_memory(method: str, state: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--state", str(state)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- report


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def ls_slope(y: np.ndarray, x: np.ndarray) -> float:
    x, y = x.reshape(-1) - x.mean(), y.reshape(-1) - y.mean()
    return float((x @ y) / (x @ x))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "lds" in r]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = ["tab:blue" if n.startswith("soulkit") else "tab:orange" for n in names]
    err = [r.get("lds_seed_sd") or 0.0 for r in rows]
    axes[0].barh(names, [r["lds"] for r in rows], xerr=err, color=colors)
    axes[0].set_xlabel("LDS (seed 0; bar: sd over label-sampling seeds)")
    axes[0].invert_yaxis()
    timed = [r for r in rows if r.get("seconds")]
    axes[1].barh([r["method"] for r in timed], [r["seconds"] for r in timed],
                 color=["tab:blue" if r["method"].startswith("soulkit") else "tab:orange" for r in timed])  # fmt: skip
    axes[1].set_xlabel("fit + scores, s (median over rounds, 1 thread)")
    axes[1].invert_yaxis()
    cfg = report["config"]
    fig.suptitle(f"LDS on a byte-level Llama ({report['model_parameters'] / 1e3:.0f}K params, {cfg['n_train']} x "
                 f"{cfg['seq_len']} B train, {cfg['queries']} queries, {cfg['subsets']} subsets)")  # fmt: skip
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def goals(report: dict) -> list[dict]:
    rows = {r["method"]: r for r in report["rows"]}
    sk, kr = rows.get("soulkit ekfac", {}), rows.get("kronfluence ekfac", {})
    out = []
    if "lds" in sk and "lds" in kr:
        a, b = sk.get("lds_seed_mean", sk["lds"]), kr.get("lds_seed_mean", kr["lds"])
        se = math.hypot(sk.get("lds_seed_se") or 0.0, kr.get("lds_seed_se") or 0.0)
        out.append({"goal": "soulkit EK-FAC LDS >= kronfluence EK-FAC LDS", "soulkit": a, "kronfluence": b,
                    "seed0": [sk["lds"], kr["lds"]], "se_of_difference": se,
                    "met": bool(a >= b), "tie": bool(abs(a - b) <= 2 * se),
                    "note": ("the difference is within 2 standard errors of the seed means" if abs(a - b) <= 2 * se
                             else "the difference exceeds 2 standard errors of the seed means")})  # fmt: skip
    else:
        out.append({"goal": "soulkit EK-FAC LDS >= kronfluence EK-FAC LDS", "met": None, "note": "not measured"})
    t = report.get("time_ratio_soulkit_ekfac_vs_kronfluence_ekfac")
    out.append({"goal": f"time to fit + score <= {GOAL_TIME_RATIO}x kronfluence EK-FAC's", "ratio": t,
                "met": None if t is None else bool(t <= GOAL_TIME_RATIO)})  # fmt: skip
    ms, mk = sk.get("peak_rss_mb"), kr.get("peak_rss_mb")
    ds, dk = sk.get("rss_above_baseline_mb"), kr.get("rss_above_baseline_mb")
    note = ""
    if sk.get("peak_rss_values") and kr.get("peak_rss_values"):
        a, b = sk["peak_rss_values"], kr["peak_rss_values"]
        note = (f"peak RSS over the processes: soulkit {min(a):.0f}-{max(a):.0f}, kronfluence {min(b):.0f}-{max(b):.0f} MB"
                + ("; the ranges overlap" if min(a) <= max(b) and min(b) <= max(a) else ""))  # fmt: skip
    out.append({"goal": "peak memory no higher than kronfluence EK-FAC's", "soulkit_peak_mb": ms,
                "kronfluence_peak_mb": mk, "soulkit_above_baseline_mb": ds, "kronfluence_above_baseline_mb": dk,
                "met": None if ms is None or mk is None else bool(ms <= mk), "note": note})  # fmt: skip
    return out


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "influence_lm_lds.json", report)
    cfg, v = report["config"], report["versions"]
    md = ["# LDS on a causal LM trained here: soulkit vs kronfluence (K-FAC / EK-FAC / gradient dot products)", ""]
    cpu = report.get("cpu_seconds")
    cpu_txt = (f"{cpu / 60:.1f} min of CPU" if cpu else
               "CPU time not recorded in this run (at most the wall time: one thread, subprocesses in turn)")  # fmt: skip
    md.append(f"Machine: {machine_line(report['machine'])}. 1 torch thread. Total run time "
              f"{report['seconds'] / 60:.1f} min wall, {cpu_txt} (budget of the default run: within ~75 min of "
              "CPU on 1 thread; the wall time grows with the machine's load).")  # fmt: skip
    md += ["", f"Command: `{report['command']}`", "",
           f"Versions: soulkit {v['soulkit']}, kronfluence {v['kronfluence']}, transformers {v['transformers']}, "
           f"torch {v['torch']}." + (f" kronfluence: {KRON_ERROR}" if KRON_ERROR else ""), ""]  # fmt: skip
    d = report["data"]
    md += [f"Model: `LlamaForCausalLM` from `soulkit._causal_lm.build_model` ({cfg['layers']} layers, hidden "
           f"{cfg['hidden']}, {cfg['heads']} heads, SDPA attention, tied embeddings, byte vocabulary), "
           f"{report['model_parameters']:,} parameters; tracked by every method: the {len(report['tracked'])} "
           f"`nn.Linear` modules outside the tied LM head ({report['tracked_parameters']:,} parameters). Data: "
           f"{cfg['n_train']} training sequences of {cfg['seq_len']} bytes (non-overlapping windows of the "
           f"{d['train_bytes']:,}-byte training split of {d['source']}, {d['train_files']} files) and "
           f"{cfg['queries']} query sequences spread over the validation split ({d['val_files']} other files). "
           f"Training: mean over sequences of the summed token cross-entropy, Adam lr {cfg['lr']:g} (5% warm-up, "
           f"cosine), clip 1, batch {BATCH}, {cfg['epochs']} epochs, init and data order seed {cfg['seed']}: mean "
           f"per-token loss train {report['full_model']['train_loss_per_token']:.3f}, queries "
           f"{report['full_model']['query_loss_per_token']:.3f} nats ({report['full_model']['seconds']:.0f} s). "
           f"LDS: {cfg['subsets']} half-size subsets, each retrained with the same recipe, initialisation and "
           f"data-order seed ({report['retrain_seconds'] / 60:.1f} min; subset models' mean query loss "
           f"{report['subset_query_loss_per_token']:.3f} nats/token).", ""]  # fmt: skip
    md += [f"Damping (rule fixed before the run): lambda = {DAMPING_SCALE} x mean eigenvalue of the empirical "
           f"Fisher of the tracked parameters = {DAMPING_SCALE} x mean_j ||grad loss_j||^2 / p = "
           f"**{report['damping']:.4g}** (mean eigenvalue {report['fisher_mean_eigenvalue']:.4g}); soulkit gets "
           "`l2=0, damping=lambda`, kronfluence `damping_factor=lambda`. True Fisher, one sampled label per "
           "token, label-sampling seed 0 in the table rows.", ""]  # fmt: skip
    md += ["Selection rule (fixed before the run): the configuration above, nothing tuned on LDS; goal rows are "
           f"the seed-0 runs, with the mean +- sd of LDS over label-sampling seeds 0..{cfg['spread_seeds'] - 1} "
           "beside them; the LDS goal is judged on the seed mean. Time: fit + scores per method in "
           f"`_timing.time_rounds` (methods alternating, rotated, 1 warm-up round, {cfg['reps']} timed rounds, with a "
           "reference arm: one forward + backward pass over the training set); "
           "ratio = median over rounds of the per-round ratio to kronfluence EK-FAC [IQR where >= 4 rounds]. "
           "Memory: a fresh subprocess per method (imports torch, transformers, soulkit and kronfluence, loads "
           "model and data, one forward + backward of a training batch: its `VmRSS` then is the baseline; the high-water mark is reset through "
           "`/proc/self/clear_refs`, the method runs once, and `VmHWM` is its peak RSS); median over "
           f"{cfg['mem_reps']} such processes per method (all values in the JSON).", ""]  # fmt: skip
    md += ["| library | method | damping | LDS (seed 0) | LDS median over queries | LDS mean +- sd over seeds "
           "| fit + scores s | vs kronfluence EK-FAC | peak RSS MB | above baseline MB | r vs soulkit EK-FAC "
           "| scale vs soulkit EK-FAC |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        lib, _, meth = r["method"].partition(" ")
        if "error" in r:
            md.append(f"| {lib} | {meth} | | FAILED: {r['error']} |||||||||")
            continue
        spread = (f"{r['lds_seed_mean']:.3f} +- {r['lds_seed_sd']:.3f} (n={r['lds_seed_n']})"
                  if r.get("lds_seed_n", 0) > 1 else "-")  # fmt: skip
        ratio = "-"
        if r.get("time_ratio_vs_kronfluence_ekfac") is not None:
            ratio = f"{r['time_ratio_vs_kronfluence_ekfac']:.2f}x"
            if r.get("time_ratio_iqr"):
                ratio += f" [{r['time_ratio_iqr'][0]:.2f}, {r['time_ratio_iqr'][1]:.2f}]"
        md.append(
            f"| {lib} | {meth} | {r['damping']} | {r['lds']:.3f} | {r['lds_per_query_median']:.3f} | {spread} "
            f"| {_f(r.get('seconds'), '.1f')} | {ratio} | {_f(r.get('peak_rss_mb'), '.0f')} "
            f"| {_f(r.get('rss_above_baseline_mb'), '.0f')} | {_f(r.get('pearson_vs_soulkit_ekfac'), '.3f')} "
            f"| {_f(r.get('scale_vs_soulkit_ekfac'), '.3g')} |"
        )
    md += ["", "## Where the time goes", "",
           f"One forward + backward pass of the summed loss over the {cfg['n_train']} training sequences (batch "
           f"{BATCH}) takes {report['pass_seconds']:.2f} s (median over the same rounds). In such passes: "
           + ", ".join(f"{r['method']} {r['passes_equivalent']:.1f}" for r in report["rows"] if r.get("passes_equivalent"))
           + ". Both libraries' EK-FAC make three passes over the training set (covariances with sampled labels, "
           "eigenvalues with sampled labels, training gradients for the scores) and K-FAC two; the rest is each "
           "library's own work. Phases of one more call each (seconds):", ""]  # fmt: skip
    for m, ph in report.get("phases", {}).items():
        md.append(f"- {m}: " + "; ".join(f"{k} {v:.2f}" for k, v in ph.items()) + f" (total {sum(ph.values()):.2f})")
    md += ["", "## Goals (issue 13)", ""]
    for g in report["goals"]:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[g["met"]]
        if g.get("tie"):
            verdict += " (a tie: equal within the label-sampling noise)"
        if "ratio" in g:
            md.append(f"- {g['goal']}: {_f(g['ratio'], '.2f')}x -> {verdict}")
        elif "soulkit_peak_mb" in g:
            md.append(f"- {g['goal']}: peak RSS {_f(g['soulkit_peak_mb'], '.0f')} vs {_f(g['kronfluence_peak_mb'], '.0f')} "
                      f"MB (above the baseline {_f(g['soulkit_above_baseline_mb'], '.0f')} vs "
                      f"{_f(g['kronfluence_above_baseline_mb'], '.0f')} MB; medians; {g['note']}) -> {verdict}")  # fmt: skip
        elif "soulkit" in g:
            md.append(f"- {g['goal']}: seed mean {g['soulkit']:.4f} vs {g['kronfluence']:.4f} (seed 0: "
                      f"{g['seed0'][0]:.4f} vs {g['seed0'][1]:.4f}; SE of the difference {g['se_of_difference']:.4f}: "
                      f"{g['note']}) -> {verdict}")  # fmt: skip
        else:
            md.append(f"- {g['goal']}: {verdict}")
    md += ["", "## Reading", ""] + report["reading"] + ["", "![LDS and time](influence_lm_lds.png)", ""]
    atomic_write_text(out_dir / "influence_lm_lds.md", "\n".join(md))


def reading(report: dict) -> list[str]:
    rows = {r["method"]: r for r in report["rows"] if "error" not in r}
    lines = []
    sk, kk = rows.get("soulkit kfac"), rows.get("kronfluence kfac")
    uc = report.get("kfac_units_check")
    if sk and kk and uc:
        T = uc["tokens_per_sequence"]
        lines.append(
            f"- K-FAC units: kronfluence divides its output-gradient covariance by the number of tokens, soulkit by "
            f"the number of sequences (the Fisher of a per-sequence loss), so kronfluence's K-FAC curvature is {T}x "
            f"smaller (T = {T} positions) and the same absolute damping weighs {T}x more in it. Checked in this run: "
            f"kronfluence K-FAC(lambda) against soulkit K-FAC({T} lambda) correlates "
            f"{uc['pearson_kronfluence_kfac_vs_soulkit_kfac_T_lambda']:.4f} with slope "
            f"{uc['slope_kronfluence_kfac_on_soulkit_kfac_T_lambda']:.1f} (expected {T}); soulkit K-FAC with {T} lambda "
            f"has LDS {uc['lds_soulkit_kfac_T_lambda']:.3f} (kronfluence K-FAC {kk['lds']:.3f}, soulkit K-FAC at lambda "
            f"{sk['lds']:.3f}). EK-FAC refits the eigenvalues per sequence in both libraries, so there the units agree."
        )  # fmt: skip
    se, ke = rows.get("soulkit ekfac"), rows.get("kronfluence ekfac")
    if se and ke:
        lines.append(
            f"- EK-FAC: soulkit's and kronfluence's scores correlate {ke['pearson_vs_soulkit_ekfac']:.3f} (least-squares "
            f"scale {ke['scale_vs_soulkit_ekfac']:.3g}); the differences are the sampled labels (other random draws) "
            "and float precision."
        )  # fmt: skip
    ph, ps = report.get("phases", {}), report.get("pass_seconds")
    if se and ke and ps and "soulkit ekfac" in ph:
        fit, sc = ph["soulkit ekfac"].values()
        goal_s = GOAL_TIME_RATIO * ke["seconds"]
        lines.append(
            f"- Time: soulkit EK-FAC takes {se['seconds']:.1f} s = {se['passes_equivalent']:.1f} forward + backward "
            f"passes over the training set, kronfluence's {ke['seconds']:.1f} s = {ke['passes_equivalent']:.1f}; both do "
            f"three passes of model work, so {3 * ps / ke['seconds']:.2f}x kronfluence is the floor of an EK-FAC that does "
            f"nothing but the passes. soulkit's fit took {fit:.1f} s ({fit / ps:.1f} passes for 2 passes of model work: "
            f"label sampling, covariances, eigendecompositions and the eigenvalue refit are the rest) and its scores "
            f"{sc:.1f} s ({sc / ps:.1f} passes for 1 pass plus the {report['config']['queries']} query gradients and "
            f"the contractions). The goal ({GOAL_TIME_RATIO}x = {goal_s:.1f} s) would need "
            f"{se['seconds'] - goal_s:.1f} s less of soulkit's own work per call at this size."
        )  # fmt: skip
    si = rows.get("soulkit identity")
    if si and se:
        lines.append(f"- Gradient dot products (no curvature): LDS {si['lds']:.3f} vs soulkit EK-FAC {se['lds']:.3f}.")
    dd = [rows.get(m) for m in DEFAULT_DAMPING_METHODS]
    if all(dd):
        lines.append(
            f"- Each library's default damping (0.1 x mean EK-FAC eigenvalue per module; untimed reference rows): "
            f"soulkit EK-FAC LDS {dd[0]['lds']:.3f}, kronfluence EK-FAC {dd[1]['lds']:.3f}."
        )  # fmt: skip
    lines.append(
        f"- The seed-to-seed spread of LDS from the label sampling (sd over {report['config']['spread_seeds']} seeds) is "
        "the scale against which differences between the libraries' K-FAC / EK-FAC rows should be read."
    )  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 sequences, 16 queries, 8 subsets")
    ap.add_argument("--n-train", type=int, default=None, help="training sequences (default 1024)")
    ap.add_argument("--queries", type=int, default=None, help="query sequences (default 64)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--subsets", type=int, default=None, help="half-size subsets retrained (default 50)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5)")
    ap.add_argument("--spread-seeds", type=int, default=None, help="label-sampling seeds 0..k-1 (default 4)")
    ap.add_argument("--mem-reps", type=int, default=None, help="memory subprocesses per method (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.state)
        return
    q = args.quick
    args.n_train = args.n_train or (256 if q else 1024)
    args.queries = args.queries or (16 if q else 64)
    args.epochs = args.epochs or (3 if q else 10)
    args.subsets = args.subsets or (8 if q else 50)
    args.reps = args.reps or (1 if q else 5)
    args.spread_seeds = args.spread_seeds or (2 if q else 4)
    args.mem_reps = args.mem_reps or (1 if q else 3)
    out_dir = args.out_dir or (HERE.parent / "runs" / "influence_lm_lds_quick" if q else RESULTS)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cfg = {k: getattr(args, k) for k in ("n_train", "queries", "seq_len", "hidden", "layers", "heads", "epochs", "lr",
                                         "subsets", "reps", "spread_seeds", "mem_reps", "seed")}  # fmt: skip
    report: dict = {
        "machine": machine_info(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "versions": {"soulkit": _version("soulkit"), "kronfluence": _version("kronfluence"),
                     "transformers": _version("transformers"), "torch": torch.__version__},  # fmt: skip
        "kronfluence_error": KRON_ERROR,
        "config": cfg,
    }
    xtr, xq, info = corpus(args.n_train, args.queries, args.seq_len, args.seed)
    report["data"] = info
    train, queries = Sequences(xtr), Sequences(xq)
    print(f"data: {len(xtr)} x {args.seq_len} B train, {len(xq)} queries ({info['train_files']} train files)", flush=True)

    t0 = time.perf_counter()
    model = train_lm(xtr, args)
    t_full = time.perf_counter() - t0
    tok = args.seq_len - 1
    report["full_model"] = {"seconds": t_full, "train_loss_per_token": float(losses_of(model, xtr).mean() / tok),
                            "query_loss_per_token": float(losses_of(model, xq).mean() / tok)}  # fmt: skip
    report["model_parameters"] = sum(p.numel() for p in model.parameters())
    names = [t.name for t in tracked_modules(model)]
    report["tracked"] = names
    print(f"full model trained in {t_full:.0f}s: {report['full_model']}", flush=True)

    mean_eig, p_tracked = empirical_fisher_mean_eigenvalue(model, xtr, names)
    damping = DAMPING_SCALE * mean_eig
    report.update(fisher_mean_eigenvalue=mean_eig, damping=damping, tracked_parameters=p_tracked)
    print(f"damping = {DAMPING_SCALE} x {mean_eig:.4g} = {damping:.4g} ({p_tracked} tracked parameters)", flush=True)

    # subset retraining (the actual outputs)
    masks = subset_masks(args.n_train, args.subsets, args.seed)
    actual = np.zeros((args.subsets, args.queries))
    t0 = time.perf_counter()
    for s, mask in enumerate(masks):
        actual[s] = losses_of(train_lm(xtr[torch.from_numpy(mask)], args), xq)
        if (s + 1) % 5 == 0 or s + 1 == args.subsets:
            print(f"retrained {s + 1}/{args.subsets} subsets ({time.perf_counter() - t0:.0f}s)", flush=True)
    report["retrain_seconds"] = time.perf_counter() - t0
    report["subset_query_loss_per_token"] = float(actual.mean() / tok)

    # timed methods, alternating rounds; the scores of each method's last call are kept
    kept: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}

    def arm(name):
        def call():
            if name in errors:
                return
            try:
                kept[name] = run_method(name, model, train, queries, damping, 0, names)
            except Exception as err:  # noqa: BLE001 - recorded in the table
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                traceback.print_exc()
        return call

    methods = [m for m in METHODS if not (m.startswith("kronfluence") and KRON_ERROR)]
    print(f"timing {methods}: 1 warm-up round + {args.reps} rounds ...", flush=True)
    arms = {m: arm(m) for m in methods}
    arms[PASS_ARM] = lambda: one_pass(model, xtr)
    times = time_rounds(arms, reps=args.reps, warmup=1, cold_cache=False, rotate=True,
                        after_round=lambda i, t: print(f"  round {i + 1}: " + ", ".join(
                            f"{k.split(':')[0]} {v[-1]:.1f}s" for k, v in t.items()), flush=True))  # fmt: skip
    med = medians(times)
    report["pass_seconds"] = med[PASS_ARM]
    report["pass_seconds_all"] = times[PASS_ARM]
    phases: dict[str, dict] = {}
    for m in ("soulkit ekfac", "kronfluence ekfac", "soulkit kfac", "kronfluence kfac"):
        if m in methods and m not in errors:
            phases[m] = {}
            run_method(m, model, train, queries, damping, 0, names, phases[m])
            print(f"phases {m}: {phases[m]}", flush=True)
    report["phases"] = phases

    # memory: one fresh subprocess per method
    mem: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lm_lds_state_") as st:
        state = Path(st)
        torch.save(model.state_dict(), state / "model.pt")
        torch.save((xtr, xq), state / "data.pt")
        (state / "config.json").write_text(json.dumps({"args": vars(args) | {"out_dir": None, "state": None},
                                                       "damping": damping, "tracked": names}))  # fmt: skip
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for k in range(args.mem_reps):  # methods in turn, args.mem_reps fresh processes each
            for m in methods:
                r = measure_memory(m, state)
                runs[m].append(r)
                print(f"memory {m} (run {k + 1}): {r}", flush=True)
        for m, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                mem[m] = {"error": rs[-1]["error"]}
                continue
            peaks = [r["peak_rss_mb"] for r in ok]
            above = [r["peak_rss_mb"] - r["baseline_rss_mb"] for r in ok]
            mem[m] = {"peak_rss_mb": float(np.median(peaks)), "rss_above_baseline_mb": float(np.median(above)),
                      "baseline_rss_mb": float(np.median([r["baseline_rss_mb"] for r in ok])),
                      "peak_values": peaks, "above_values": above, "source": ok[0]["peak_source"],
                      "seconds": float(np.median([r["seconds"] for r in ok]))}  # fmt: skip

    # label-sampling spread (untimed) and each library's default damping (untimed)
    spread: dict[str, list[float]] = {m: [] for m in SPREAD_METHODS}
    for m in SPREAD_METHODS:
        if m not in kept:
            continue
        spread[m].append(lds(kept[m], masks, actual).lds)
        for seed in range(1, args.spread_seeds):
            try:
                s = run_method(m, model, train, queries, damping, seed, names)
                spread[m].append(lds(s, masks, actual).lds)
            except Exception as err:  # noqa: BLE001
                print(f"spread {m} seed {seed} failed: {err}", flush=True)
        print(f"spread {m}: {np.round(spread[m], 4).tolist()}", flush=True)
    # units check: kronfluence's K-FAC output-gradient covariance is per token, soulkit's per sequence, so
    # kronfluence kfac(lambda) should equal T x soulkit kfac(T lambda) up to the label sampling
    if "kronfluence kfac" in kept:
        T = args.seq_len
        alt = soulkit_scores(model, train, queries, "kfac", T * damping, 0, names)
        report["kfac_units_check"] = {
            "tokens_per_sequence": T, "pearson_kronfluence_kfac_vs_soulkit_kfac_T_lambda": pearson(kept["kronfluence kfac"], alt),
            "slope_kronfluence_kfac_on_soulkit_kfac_T_lambda": ls_slope(kept["kronfluence kfac"], alt),
            "lds_soulkit_kfac_T_lambda": lds(alt, masks, actual).lds}  # fmt: skip
        print(f"kfac units check: {report['kfac_units_check']}", flush=True)
    for m in DEFAULT_DAMPING_METHODS:
        if m.startswith("kronfluence") and KRON_ERROR:
            continue
        try:
            kept[m] = run_method(m, model, train, queries, damping, 0, names)
        except Exception as err:  # noqa: BLE001
            errors[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"

    ref = kept.get("soulkit ekfac")
    rows = []
    for m in [*METHODS, *DEFAULT_DAMPING_METHODS]:
        row: dict = {"method": m, "damping": "default (0.1 x mean eig.)" if "default" in m
                     else ("none" if m.endswith("identity") else f"{damping:.3g}")}  # fmt: skip
        if m.startswith("kronfluence") and KRON_ERROR:
            row["error"] = KRON_ERROR
        elif m in errors:
            row["error"] = errors[m]
        elif m in kept:
            res = lds(kept[m], masks, actual)
            row.update(lds=res.lds, lds_per_query_median=float(np.median(res.per_query)),
                       lds_per_query=res.per_query.tolist())  # fmt: skip
            if ref is not None:
                row.update(pearson_vs_soulkit_ekfac=pearson(kept[m], ref), scale_vs_soulkit_ekfac=ls_slope(kept[m], ref))
            if m in times:
                row["seconds"] = med[m]
                row["seconds_all"] = times[m]
                row["passes_equivalent"] = med[m] / med[PASS_ARM]
                if "kronfluence ekfac" in times and "kronfluence ekfac" not in errors:
                    row["time_ratio_vs_kronfluence_ekfac"] = paired_ratio(times, m, "kronfluence ekfac")
                    row["time_ratio_iqr"] = paired_iqr(times, m, "kronfluence ekfac")
            if m in mem and "error" not in mem[m]:
                row.update(peak_rss_mb=mem[m]["peak_rss_mb"], baseline_rss_mb=mem[m]["baseline_rss_mb"],
                           rss_above_baseline_mb=mem[m]["rss_above_baseline_mb"], peak_rss_values=mem[m]["peak_values"],
                           above_baseline_values=mem[m]["above_values"], memory_source=mem[m]["source"],
                           subprocess_seconds=mem[m]["seconds"])  # fmt: skip
            elif m in mem:
                row["memory_error"] = mem[m]["error"]
            vals = spread.get(m) or []
            if vals:
                a = np.asarray(vals)
                row.update(lds_seed_values=vals, lds_seed_n=len(vals), lds_seed_mean=float(a.mean()),
                           lds_seed_sd=float(a.std(ddof=1)) if len(a) > 1 else None,
                           lds_seed_se=float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)  # fmt: skip
        else:
            row["error"] = "not run"
        rows.append(row)
    report["rows"] = rows
    rs = {r["method"]: r for r in rows}
    report["time_ratio_soulkit_ekfac_vs_kronfluence_ekfac"] = rs["soulkit ekfac"].get("time_ratio_vs_kronfluence_ekfac")
    report["seconds"] = time.perf_counter() - t_start
    report["cpu_seconds"] = cpu_seconds()
    report["goals"] = goals(report)
    report["reading"] = reading(report)
    write(report, out_dir)
    try:
        plot(report, out_dir / "influence_lm_lds.png")
    except Exception as err:  # noqa: BLE001 - the tables stand without the figure
        print(f"plot failed: {err}", flush=True)
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['met']}", flush=True)
    print(f"wrote {out_dir / 'influence_lm_lds.md'} ({report['seconds'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
