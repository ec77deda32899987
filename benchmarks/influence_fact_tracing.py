"""Influence on the fictitious-author benchmark: fact tracing (ground truth by construction) and agreement with
the exact retrains, for soulkit's factored solvers and two lexical baselines (issue 14).

**Model and data.** ``UnlearningSuite.from_scale("small")``: 40 fictitious authors x 20 QA (800 training QA),
the cached 1.05M-parameter Llama finetuned on all of them (with the world-knowledge records replayed, as
:class:`~soulkit.unlearn.models.ModelZoo` trains it) and the cached exact retrains without forget01 / forget05
/ forget10 (data-order seeds 1 and 2). Nothing is retrained here except, once, the optimizer-state copy below.
Every QA pair is tokenised exactly as the fine-tune saw it (:class:`soulkit.unlearn.qa.QADataset`:
``<bos>Question: {q}\\nAnswer: {a}<eos>``, max length 128) and its loss is the next-token cross-entropy
*summed* over the answer tokens (prompt labels -100): :func:`soulkit.influence.lm_command.lm_loss` on
:func:`~soulkit.influence.lm_command.pad_collate` batches of 32, checked against the model's own training
loss on the first batch. The analyzer is fitted on the 800 training QA (the 217 replayed world-knowledge
records are not candidates and are left out of the fit), tracked modules = soulkit's default (every
``nn.Linear`` except the tied LM head: 28 modules, 790K parameters).

**Solvers** (``InfluenceAnalyzer``, factored route, ``l2=0``, batch 32; sign: ``scores[i, j] ~
loss_i(theta without j) - loss_i(theta)``, so a larger score = training pair ``j`` helps query ``i`` more):

* ``ekfac`` / ``kfac``: true Fisher, one label draw per sequence, seed 0, damping ``lambda`` below;
* ``identity``: gradient dot products of the tracked modules (no curvature, no damping);
* ``identity (unit)``: the same dot products divided by both gradient norms (cosine; the norms are the
  diagonal of the identity scores of the training set with itself, and of the phrasings with themselves);
* ``optimizer_state``: the training optimizer's diagonal (AdamW, ``rule="auto"`` = ``"adam"``:
  ``sqrt(v_hat) + eps``, TrackStar's preconditioner). The cached finetuned model saved no optimizer state, so
  the fine-tune is run again once with the same recipe (:func:`soulkit.unlearn.models.train_qa` from the
  cached base model on the same records, same data-order seed 0, for the epochs the cached fine-tune ran,
  35), its checkpoint -- weights, AdamW state -- kept under ``~/.cache/soulkit/influence_fact_tracing/``;
  this row scores *that* model with *its* optimizer state (the md records how far its weights are from the
  cached model's). Damping 0: Adam's denominator is in gradient units, not Hessian units, so the Hessian-scale
  ``lambda`` does not apply; Adam's own ``eps`` is its damping.

**Damping (rule fixed before the run; the rule of ``benchmarks/influence_lm_lds.py``).** ``lambda = 0.1 x``
the mean eigenvalue of the empirical Fisher of the tracked parameters of the finetuned model,
``0.1 * mean_j ||grad loss_j||^2 / p`` over the 800 training QA (plain autograd, one sequence at a time,
before any method runs), one number shared by ``kfac`` and ``ekfac``. Nothing is tuned on the results.

**Lexical baselines** (scikit-learn; text = question + " " + answer for both queries and training pairs):
``tfidf``: ``TfidfVectorizer()`` fitted on the 800 training texts, cosine similarity; ``bm25``: Okapi BM25
(``k1 = 1.5``, ``b = 0.75``, idf ``log(1 + (N - df + 0.5) / (df + 0.5))``, query terms counted with
multiplicity) on ``CountVectorizer()`` counts of the training texts.

**Fact tracing.** Queries: (a) ``trained``: forget10's 80 QA exactly as trained (each is also a candidate);
(b) ``phrasings``: their held-out phrasings (:func:`soulkit.unlearn.probes.phrasing_probes`, kinds
``unused`` + ``novel``: the question rephrased, the answer as trained; 274 probes), each with
``extra["source"]`` = the trained question it rephrases. Candidates: all 800 training QA, ranked by score
(descending). Relevant set: ``source pair`` (the trained pair itself / the pair the phrasing rephrases) and
``same author`` (any of the author's 20 pairs; the rank of the first one, nothing excluded); also reported,
``same author, source excluded`` (the rank of the first *other* pair of the author). Rank of a relevant set
``S`` = ``1 + #{j not in S : s_j >= max_S s}`` (ties counted against the method). Recall@1, recall@10, MRR
(mean of ``1/rank``). Sanity check of sign and indexing: the fraction of all 800 training QA whose own pair
ranks first among the 800 when used as the query.

**Agreement with exact retrains.** For each split in forget01, forget05, forget10: questions = the split's
forget QA + 200 of its retain QA (``numpy.random.default_rng(0).choice``, without replacement);
predicted = the sum of the scores of the split's forget QA on the question's loss (the first-order
prediction of ``loss(retrain) - loss(finetuned)``); actual = ``loss(retrain seed s) - loss(finetuned)``
(summed answer cross-entropy) for s = 1, 2 and their mean. Pearson and Spearman (``scipy.stats``) over all
questions, the forget ones and the retain ones, per solver (the unit identity's sums are not in loss units;
its correlations are shown for completeness). Ceiling: the same correlations between the two retrain seeds'
actual changes (seed 2 predicting seed 1): the retrains' own data-order noise, which no method predicting
one retrain can be expected to beat. The retrains start from the base model with other data-order seeds,
so "actual" mixes the removal's effect with that noise.

**Budget.** The committed run: 14.8 min wall on 1 thread of a 2-core CPU shared with other jobs (each solver
one fit and the scores of 1,074 queries x 800 candidates, 2-4 min), after the optimizer-state fine-tune had
been run once by ``--quick`` (15 min wall under the same load; cached since). ``--quick``: 8 forget10 QA and
their phrasings, forget01 agreement with 20 retain QA. ``--report-only`` rewrites the md and png from the
JSON (no computation).

    .venv/bin/python benchmarks/influence_fact_tracing.py [--quick] [--threads 1] [--report-only]

Writes ``benchmarks/results/influence_fact_tracing.{md,json,png}`` (``--quick``:
``runs/influence_fact_tracing_quick/``); scores per solver are kept in ``runs/influence_fact_tracing_cache/``
(a rerun with the same options reuses them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import machine_info, machine_line  # noqa: E402

from soulkit._io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from soulkit.influence import InfluenceAnalyzer  # noqa: E402
from soulkit.influence.lm_command import lm_loss, pad_collate  # noqa: E402
from soulkit.influence.modules import tracked_modules  # noqa: E402
from soulkit.unlearn.checkpoint import load_checkpoint  # noqa: E402
from soulkit.unlearn.models import default_cache_dir, load_model, model_meta, train_qa  # noqa: E402
from soulkit.unlearn.probes import phrasing_probes  # noqa: E402
from soulkit.unlearn.qa import QADataset, pad_token_id  # noqa: E402
from soulkit.unlearn.suite import UnlearningSuite  # noqa: E402

RESULTS = HERE / "results"
STEM = "influence_fact_tracing"
BATCH = 32
QUERY_CHUNK = 256  # queries per scores() call: [256, 790K] float32 preconditioned gradients ~ 0.8 GB
DAMPING_SCALE = 0.1
OPT_IDENTITY = "identity (optimizer-state model)"
SOLVERS = ("ekfac", "kfac", "optimizer_state", OPT_IDENTITY, "identity", "identity (unit)")
ON_OPT_MODEL = ("optimizer_state", OPT_IDENTITY)
LEXICAL = ("tfidf", "bm25", "bm25 (question only)")
SPLITS = ("forget01", "forget05", "forget10")
SEEDS = (1, 2)
N_RETAIN = 200
BM25_K1, BM25_B = 1.5, 0.75
TARGETS = ("source pair", "same author", "same author, source excluded")


# ------------------------------------------------------------------------------------------------ data


class Examples(Dataset):
    """Tokenised QA pairs as ``{input_ids, labels}`` tensors (what :func:`pad_collate` batches)."""

    def __init__(self, records, tokenizer, max_length: int):
        ds = QADataset(records, tokenizer, max_length=max_length)  # the fine-tune's own encoding
        self.items = [{"input_ids": torch.tensor(it["input_ids"]), "labels": torch.tensor(it["labels"])}
                      for it in ds.items]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def loader(ds: Dataset, pad: int) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=False, collate_fn=pad_collate(pad))


class Subset(Dataset):
    def __init__(self, ds: Dataset, idx):
        self.ds, self.idx = ds, list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.ds[self.idx[i]]


@torch.no_grad()
def sequence_losses(model, ds: Dataset, pad: int) -> np.ndarray:
    """Summed answer cross-entropy per QA pair (``lm_loss``), float64."""
    loss = lm_loss()
    return torch.cat([loss(model, b) for b in loader(ds, pad)]).double().numpy()


@torch.no_grad()
def check_loss(model, ds: Dataset, pad: int) -> dict:
    """``lm_loss`` summed over the first batch / its answer tokens == the model's own (training) loss."""
    batch = next(iter(loader(ds, pad)))
    ours = float(lm_loss()(model, batch).double().sum())
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    hf = float(model(**batch).loss)
    rel = abs(ours / tokens - hf) / hf
    if rel > 1e-4:
        raise AssertionError(f"lm_loss does not match the training loss: {ours / tokens} vs {hf}")
    return {"lm_loss_per_token": ours / tokens, "model_loss": hf, "relative_difference": rel}


def gradient_sq_norms(model, ds: Dataset, pad: int, names: list[str]) -> tuple[np.ndarray, int]:
    """``||grad_tracked loss_j||^2`` per sequence (plain autograd, one sequence at a time) and ``p``."""
    mods = dict(model.named_modules())
    params = [p for n in names for p in mods[n].parameters(recurse=False) if p.requires_grad]
    p = sum(q.numel() for q in params)
    loss, collate, out = lm_loss(), pad_collate(pad), []
    for i in range(len(ds)):
        grads = torch.autograd.grad(loss(model, collate([ds[i]])).sum(), params)
        out.append(float(sum(g.double().square().sum() for g in grads)))
    return np.asarray(out), p


# ------------------------------------------------------------------------------------ optimizer state


def optimizer_state_model(suite: UnlearningSuite, cache_root: Path):
    """The fine-tune run again with the same recipe, keeping its AdamW state (cached as a training checkpoint
    of :func:`train_qa`, which resumes or returns at once when complete). Returns ``(model, state, info)``."""
    zoo = suite.zoo
    ft_meta = model_meta(suite.finetuned_dir())
    epochs = int(ft_meta["train"]["epochs"])
    ckpt = cache_root / zoo.key / "finetuned-with-optimizer-state"
    model, tok = load_model(zoo.base())
    bench = suite.benchmark
    data = list(bench.qa) + (bench.pretrain_records() if zoo.recipe.replay_world_knowledge else [])
    t0 = time.perf_counter()
    log = train_qa(model, tok, data, epochs=epochs, recipe=zoo.recipe, seed=zoo.recipe.seed, checkpoint_dir=ckpt,
                   progress=False, desc="finetune (optimizer state)")  # fmt: skip
    seconds = time.perf_counter() - t0
    states, info = load_checkpoint(ckpt, model)
    model.eval()
    ref, _ = load_model(suite.finetuned_dir())
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    with torch.no_grad():
        diff = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
        scale = max(float(theirs[k].abs().max()) for k in theirs)
        rel = float(torch.sqrt(sum((ours[k] - theirs[k]).double().square().sum() for k in theirs)
                               / sum(theirs[k].double().square().sum() for k in theirs)))  # fmt: skip
    return model, states["optimizer"], {
        "checkpoint": str(ckpt), "epochs": log["epochs"], "epochs_cached_finetune": epochs,
        "seconds_this_call": seconds, "final_epoch_loss": log["losses"][-1] if log["losses"] else None,
        "cached_finetune_final_epoch_loss": ft_meta["train"]["losses"][-1],
        "max_abs_weight_difference_vs_cached": diff, "max_abs_weight_cached": scale,
        "relative_l2_weight_difference_vs_cached": rel, "identical_to_cached": diff == 0.0,
        "epoch_loss_abs_diff": [abs(x - y) for x, y in zip(log["losses"], ft_meta["train"]["losses"], strict=False)]}


# ---------------------------------------------------------------------------------------------- scores


def influence_scores(model, method: str, train: Dataset, queries: Dataset, pad: int, names: list[str],
                     damping: float, opt_state=None) -> tuple[np.ndarray, dict]:
    """``[m, n]`` scores of one solver (queries in chunks of ``QUERY_CHUNK``) and the seconds of fit and scores."""
    kw: dict = dict(l2=0.0, batch_size=BATCH, progress=False)
    if method in ("kfac", "ekfac"):
        kw.update(solver=method, damping=damping, fisher="true", fisher_samples=1, seed=0)
    elif method == "identity":
        kw.update(solver="identity", modules=names)
    elif method == "optimizer_state":
        kw.update(solver="optimizer_state", modules=names, optimizer_state=opt_state, damping=0.0)
    else:
        raise ValueError(method)
    an = InfluenceAnalyzer(model, lm_loss(), **kw)
    tl = loader(train, pad)
    t0 = time.perf_counter()
    an.fit(tl)
    t_fit = time.perf_counter() - t0
    out = []
    for s in range(0, len(queries), QUERY_CHUNK):
        q = Subset(queries, range(s, min(s + QUERY_CHUNK, len(queries))))
        out.append(an.scores(tl, loader(q, pad)).double().numpy())
    return np.concatenate(out), {"fit_seconds": t_fit, "score_seconds": time.perf_counter() - t0 - t_fit}


def lexical_scores(query_texts: list[str], doc_texts: list[str]) -> dict[str, np.ndarray]:
    """TF-IDF cosine and BM25 (k1 = 1.5, b = 0.75) of each query against each document."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    tf = TfidfVectorizer().fit(doc_texts)
    tfidf = (tf.transform(query_texts) @ tf.transform(doc_texts).T).toarray()  # rows are unit norm: cosine
    cv = CountVectorizer().fit(doc_texts)
    D = cv.transform(doc_texts).toarray().astype(np.float64)  # [n, V]
    Q = cv.transform(query_texts).toarray().astype(np.float64)  # [m, V], query-term counts
    N = D.shape[0]
    df = (D > 0).sum(0)
    idf = np.log1p((N - df + 0.5) / (df + 0.5))
    dl = D.sum(1, keepdims=True)
    tfw = D * (BM25_K1 + 1) / (D + BM25_K1 * (1 - BM25_B + BM25_B * dl / dl.mean()))
    bm25 = Q @ (tfw * idf).T
    return {"tfidf": tfidf, "bm25": bm25}


# --------------------------------------------------------------------------------------------- metrics


def set_rank(row: np.ndarray, relevant: np.ndarray) -> int:
    """``1 + #{j not in S: s_j >= max_S s}`` (ties counted against the method)."""
    best = row[relevant].max()
    return 1 + int((row[~relevant] >= best).sum())


def tracing(S: np.ndarray, source: list[int], author_mask: list[np.ndarray]) -> dict:
    """Recall@1/10 and MRR of each target over the rows of ``S`` ([m, n])."""
    n = S.shape[1]
    out = {}
    for target in TARGETS:
        ranks = []
        for i, row in enumerate(S):
            rel = np.zeros(n, dtype=bool)
            if target == "source pair":
                rel[source[i]] = True
            else:
                rel |= author_mask[i]
                if target == "same author, source excluded":
                    rel[source[i]] = False
                    row = np.delete(row, source[i])
                    rel = np.delete(rel, source[i])
            ranks.append(set_rank(row, rel))
        r = np.asarray(ranks)
        out[target] = {"recall@1": float((r <= 1).mean()), "recall@10": float((r <= 10).mean()),
                       "mrr": float((1.0 / r).mean()), "median_rank": float(np.median(r))}  # fmt: skip
    return out


def correlations(pred: np.ndarray, actual: np.ndarray) -> dict:
    from scipy import stats

    if len(pred) < 3 or np.std(pred) == 0 or np.std(actual) == 0:
        return {"pearson": None, "spearman": None, "n": len(pred)}
    return {"pearson": float(stats.pearsonr(pred, actual)[0]), "spearman": float(stats.spearmanr(pred, actual)[0]),
            "n": len(pred)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 forget10 QA, forget01 agreement only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None, help="model cache root (default ~/.cache/soulkit)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the md and png from the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or (HERE.parent / "runs" / f"{STEM}_quick" if args.quick else RESULTS)
    if args.report_only:
        report = json.loads((out_dir / f"{STEM}.json").read_text())
        report["report_only"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        write(report, out_dir)
        plot(report, out_dir / f"{STEM}.png")
        print(f"rewrote {out_dir / (STEM + '.md')} from the JSON", flush=True)
        return
    score_cache = HERE.parent / "runs" / f"{STEM}_cache"
    solvers = [s for s in args.solvers.split(",") if s]
    t_start = time.perf_counter()
    report: dict = {"machine": machine_info(), "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}

    suite = UnlearningSuite.from_scale("small", cache_dir=args.cache_dir, progress=False)
    bench = suite.benchmark
    model, tok = load_model(suite.finetuned_dir())
    pad = pad_token_id(tok)
    max_len = suite.zoo.recipe.max_length
    qa = list(bench.qa)
    n = len(qa)
    index = {(r.author, r.question): j for j, r in enumerate(qa)}
    forget10, _ = bench.split("forget10")
    trained_q = [index[(r.author, r.question)] for r in forget10]
    if args.quick:
        trained_q = trained_q[:8]
    probes = phrasing_probes(bench, [qa[j] for j in trained_q])
    probe_src = [index[(p.author, p.extra["source"])] for p in probes]
    print(f"{n} training QA; {len(trained_q)} trained queries, {len(probes)} phrasings", flush=True)

    # agreement questions: each split's forget QA + a seeded sample of its retain QA
    splits = ("forget01",) if args.quick else SPLITS
    k_retain = 20 if args.quick else N_RETAIN
    questions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sp in splits:
        forget, retain = bench.split(sp)
        f_idx = np.asarray([index[(r.author, r.question)] for r in forget])
        r_all = np.asarray([index[(r.author, r.question)] for r in retain])
        questions[sp] = (f_idx, np.sort(np.random.default_rng(0).choice(r_all, k_retain, replace=False)))
    # query rows: training QA (every one in the full run: the trained queries, the agreement questions and the
    # sign check are rows of it), then the phrasings
    if args.quick:
        q_train = sorted(set(trained_q).union(*[set(np.concatenate(v).tolist()) for v in questions.values()]))
    else:
        q_train = list(range(n))
    row = {j: i for i, j in enumerate(q_train)}
    train_ds = Examples(qa, tok, max_len)
    probe_ds = Examples(probes, tok, max_len)
    queries = _Concat(Subset(train_ds, q_train), probe_ds)
    report["loss_check"] = check_loss(model, train_ds, pad)
    names = [t.name for t in tracked_modules(model)]

    t0 = time.perf_counter()
    sq_train, p_tracked = gradient_sq_norms(model, train_ds, pad, names)
    mean_eig = float(sq_train.mean() / p_tracked)
    damping = DAMPING_SCALE * mean_eig
    report.update(fisher_mean_eigenvalue=mean_eig, damping=damping, tracked_modules=len(names),
                  tracked_parameters=p_tracked, model_parameters=sum(p.numel() for p in model.parameters()),
                  damping_seconds=time.perf_counter() - t0)  # fmt: skip
    print(f"damping = {DAMPING_SCALE} x {mean_eig:.4g} = {damping:.4g} ({p_tracked} tracked parameters, "
          f"{report['damping_seconds']:.0f}s)", flush=True)  # fmt: skip

    key = hashlib.sha256(json.dumps({"zoo": suite.zoo.key, "q_train": q_train, "n_probes": len(probes),
                                     "damping": damping, "batch": BATCH}).encode()).hexdigest()[:12]  # fmt: skip
    scores: dict[str, np.ndarray] = {}
    timing: dict[str, dict] = {}
    errors: dict[str, str] = {}
    opt_model = opt_state = None
    for method in solvers:
        if method == "identity (unit)":
            continue
        path = score_cache / f"{key}-{method}.npy"
        if method in ON_OPT_MODEL and "optimizer_state_model" not in report:  # cached after the first call
            t0 = time.perf_counter()
            try:
                opt_model, opt_state, info = optimizer_state_model(suite, args.cache_dir or default_cache_dir() / STEM)
            except Exception as err:  # noqa: BLE001 - recorded in the report
                errors[method] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                print(f"{method} failed: {errors[method]}", flush=True)
                continue
            info["seconds"] = time.perf_counter() - t0
            report["optimizer_state_model"] = info
            print(f"optimizer-state model: {info}", flush=True)
        if path.is_file():
            scores[method] = np.load(path)
            timing[method] = json.loads(path.with_suffix(".json").read_text())
            print(f"{method}: scores from {path}", flush=True)
            continue
        try:
            m = opt_model if method in ON_OPT_MODEL else model
            st = opt_state if method == "optimizer_state" else None
            base = "identity" if method == OPT_IDENTITY else method
            s, t = influence_scores(m, base, train_ds, queries, pad, names, damping, st)
        except Exception as err:  # noqa: BLE001 - recorded in the report
            errors[method] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(f"{method} failed: {errors[method]}", flush=True)
            continue
        scores[method], timing[method] = s, t
        score_cache.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, s)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_json(path.with_suffix(".json"), t)
        print(f"{method}: fit {t['fit_seconds']:.0f}s, scores {t['score_seconds']:.0f}s", flush=True)

    if "identity (unit)" in solvers and "identity" in scores:
        # cosine: identity scores are (1/n) <g_i, g_j>; the norms by plain autograd (the damping pass's for the
        # training QA, the same function for the phrasings)
        t0 = time.perf_counter()
        S = scores["identity"]
        sq_probe, _ = gradient_sq_norms(model, probe_ds, pad, names)
        qn = np.sqrt(np.concatenate([sq_train[q_train], sq_probe]))
        scores["identity (unit)"] = S * n / qn[:, None] / np.sqrt(sq_train)[None, :]
        own = np.asarray([S[row[j], j] * n for j in q_train])
        report["identity_norm_check"] = {
            "max_relative_difference_factored_vs_autograd": float(np.max(np.abs(own - sq_train[q_train])
                                                                         / sq_train[q_train]))}  # fmt: skip
        timing["identity (unit)"] = {"fit_seconds": 0.0, "score_seconds": time.perf_counter() - t0,
                                     "note": "the identity scores divided by the norms"}  # fmt: skip

    texts = [f"{r.question} {r.answer}" for r in qa]
    lex = lexical_scores([texts[j] for j in q_train] + [f"{p.question} {p.answer}" for p in probes], texts)
    lex["bm25 (question only)"] = lexical_scores([qa[j].question for j in q_train] + [p.question for p in probes],
                                                 texts)["bm25"]
    methods = [m for m in SOLVERS if m in scores] + list(LEXICAL)
    scores.update(lex)

    # ---- sign / indexing check: each training QA (query row) should rank its own pair first
    authors = np.asarray([r.author for r in qa])
    report["self_rank1"] = {}
    for m in methods:
        S = scores[m][: len(q_train)]
        own = S[np.arange(len(q_train)), q_train]
        rank = (S >= own[:, None]).sum(1)  # 1 + the others scoring >= own (ties against the method)
        report["self_rank1"][m] = {"fraction": float((rank == 1).mean()), "mrr": float((1.0 / rank).mean()),
                                   "mean_own_score": float(own.mean()), "n": len(q_train),
                                   "fraction_own_score_positive": float((own > 0).mean())}  # fmt: skip

    # ---- fact tracing
    sets = {"trained": ([row[j] for j in trained_q], trained_q),
            "phrasings": ([len(q_train) + k for k in range(len(probes))], probe_src)}
    trace: dict = {}
    for qs, (rows, src) in sets.items():
        masks = [authors == qa[j].author for j in src]
        trace[qs] = {m: tracing(scores[m][rows], list(src), masks) for m in methods}
        trace[qs]["n_queries"] = len(rows)
    report["tracing"] = trace
    for qs in sets:
        for m in methods:
            r = trace[qs][m]
            print(f"{qs:9s} {m:16s} " + "  ".join(f"{t}: R@1 {r[t]['recall@1']:.2f} R@10 {r[t]['recall@10']:.2f} "
                                                  f"MRR {r[t]['mrr']:.3f}" for t in TARGETS[:2]), flush=True)

    # ---- agreement with exact retrains
    t0 = time.perf_counter()
    ft_loss = sequence_losses(model, train_ds, pad)
    own_loss = sequence_losses(opt_model, train_ds, pad) if "optimizer_state_model" in report else None
    actual: dict[str, dict[int, np.ndarray]] = {}
    actual_own: dict[str, dict[int, np.ndarray]] = {}
    for sp in splits:
        actual[sp] = {}
        for seed in SEEDS:
            rm, _ = load_model(suite.retrained_dir(sp, seed))
            rl = sequence_losses(rm, train_ds, pad)
            actual[sp][seed] = rl - ft_loss
            if own_loss is not None:
                actual_own.setdefault(sp, {})[seed] = rl - own_loss
    report["retrain_loss_seconds"] = time.perf_counter() - t0
    agree: dict = {}
    scatter: dict = {}
    for sp in splits:
        f_idx, r_idx = questions[sp]
        qidx = np.concatenate([f_idx, r_idx])
        qrows = np.asarray([row[j] for j in qidx])
        is_f = np.r_[np.ones(len(f_idx), bool), np.zeros(len(r_idx), bool)]
        a = {1: actual[sp][1][qidx], 2: actual[sp][2][qidx]}
        a["mean"] = 0.5 * (a[1] + a[2])
        entry: dict = {"n_forget": len(f_idx), "n_retain": len(r_idx),
                       "actual_mean_forget": {str(s): float(a[s][is_f].mean()) for s in a},
                       "actual_mean_retain": {str(s): float(a[s][~is_f].mean()) for s in a}}  # fmt: skip
        groups = {"all": np.ones(len(qidx), bool), "forget": is_f, "retain": ~is_f}
        entry["ceiling (seed 2 vs seed 1)"] = {g: correlations(a[2][msk], a[1][msk]) for g, msk in groups.items()}
        for m in [m for m in SOLVERS if m in scores]:
            pred = scores[m][qrows][:, f_idx].sum(1)
            entry[m] = {"predicted_mean_forget": float(pred[is_f].mean()),
                        "predicted_mean_retain": float(pred[~is_f].mean())}  # fmt: skip
            for s in a:
                entry[m][f"seed {s}"] = {g: correlations(pred[msk], a[s][msk]) for g, msk in groups.items()}
            if m in ON_OPT_MODEL and sp in actual_own:  # the change from the optimizer-state model's own losses
                own = 0.5 * (actual_own[sp][1][qidx] + actual_own[sp][2][qidx])
                entry[m]["own model, seed mean"] = {g: correlations(pred[msk], own[msk]) for g, msk in groups.items()}
            scatter.setdefault(sp, {})[m] = {"predicted": pred.tolist(), "actual_mean": a["mean"].tolist(),
                                             "is_forget": is_f.tolist()}  # fmt: skip
        agree[sp] = entry
    report["agreement"] = agree
    report["scatter"] = scatter
    for sp in splits:
        e = agree[sp]
        print(f"{sp}: ceiling all " + _fmt(e["ceiling (seed 2 vs seed 1)"]["all"]), flush=True)
        for m in [m for m in SOLVERS if m in scores]:
            print(f"  {m:16s} vs mean of seeds, all " + _fmt(e[m]["seed mean"]["all"]) + "; forget "
                  + _fmt(e[m]["seed mean"]["forget"]) + "; retain " + _fmt(e[m]["seed mean"]["retain"]), flush=True)

    report.update(config={"quick": args.quick, "threads": args.threads, "batch": BATCH, "damping_scale": DAMPING_SCALE,
                          "n_train": n, "n_trained_queries": len(trained_q), "n_phrasings": len(probes),
                          "phrasing_kinds": {k: sum(p.extra["probe"] == k for p in probes) for k in ("unused", "novel")},
                          "splits": list(splits), "n_retain_questions": k_retain, "n_train_query_rows": len(q_train),
                          "bm25": {"k1": BM25_K1, "b": BM25_B}, "zoo_key": suite.zoo.key,
                          "finetuned_dir": str(suite.finetuned_dir())},
                  methods=methods, timing=timing, errors=errors)  # fmt: skip
    report["seconds"] = time.perf_counter() - t_start
    write(report, out_dir)
    try:
        plot(report, out_dir / f"{STEM}.png")
    except Exception as err:  # noqa: BLE001 - the tables stand without the figure
        print(f"plot failed: {err}", flush=True)
    print(f"wrote {out_dir / (STEM + '.md')} ({report['seconds'] / 60:.1f} min)", flush=True)


class _Concat(Dataset):
    def __init__(self, *parts: Dataset):
        self.items = [x for p in parts for x in (p[i] for i in range(len(p)))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _fmt(c: dict) -> str:
    if c["pearson"] is None:
        return "n/a"
    return f"r {c['pearson']:.3f} rho {c['spearman']:.3f}"


def _num(x, f: str = ".3f") -> str:
    return "n/a" if x is None else format(x, f)


# ----------------------------------------------------------------------------------------------- output


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{STEM}.json", report)
    atomic_write_text(out_dir / f"{STEM}.md", "\n".join(markdown(report)) + "\n")


def markdown(r: dict) -> list[str]:
    cfg = r["config"]
    L = ["# Influence on the fictitious-author benchmark: fact tracing and agreement with exact retrains", "",
         f"Machine: {machine_line(r['machine'])}. Command: `{r['command']}`; whole run {r['seconds'] / 60:.1f} min"
         + (f" (md and png rewritten from the JSON by `{r['report_only']}`)." if r.get("report_only") else "."), ""]
    if cfg["quick"]:
        L += ["**Smoke test (`--quick`): few queries; not the benchmark's numbers.**", ""]
    L += [f"Model: the `small` scale's finetuned Llama ({r['model_parameters']:,} parameters; zoo key "
          f"`{cfg['zoo_key']}`), scored on its {cfg['n_train']} training QA (answer tokens' summed cross-entropy, the "
          f"fine-tune's own tokenisation; `lm_loss` matches the model's training loss to "
          f"{r['loss_check']['relative_difference']:.1e}). Tracked: {r['tracked_modules']} linear modules, "
          f"{r['tracked_parameters']:,} parameters. Damping (fixed rule, `influence_lm_lds.py`'s): "
          f"{cfg['damping_scale']} x mean empirical-Fisher eigenvalue {r['fisher_mean_eigenvalue']:.4g} = "
          f"**{r['damping']:.4g}** for kfac/ekfac; identity none; optimizer_state Adam's own `sqrt(v_hat) + eps` "
          f"(no extra damping). Protocol: the script's docstring.", ""]
    if r.get("errors"):
        L += ["**Failed**: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()), ""]
    om = r.get("optimizer_state_model")
    if om:
        same = ("bitwise identical to the cached finetuned model" if om["identical_to_cached"] else
                f"not identical to the cached finetuned model: max |diff| {om['max_abs_weight_difference_vs_cached']:.3g} "
                f"(max |weight| {om['max_abs_weight_cached']:.3g}), relative L2 difference "
                f"{om['relative_l2_weight_difference_vs_cached']:.3g}; final epoch loss {om['final_epoch_loss']:.4f} vs "
                f"{om['cached_finetune_final_epoch_loss']:.4f}")
        L += [f"`optimizer_state`: the cached finetuned model saved no optimizer state, so the fine-tune was run again "
              f"with the same recipe ({om['epochs']} epochs, seed 0; checkpoint with its AdamW state in "
              f"`{om['checkpoint']}`). Its weights are {same} (per-epoch training losses: first epoch differs by "
              f"{om['epoch_loss_abs_diff'][0]:.1e}, epoch 5 by {om['epoch_loss_abs_diff'][4]:.1e}, the last by "
              f"{om['epoch_loss_abs_diff'][-1]:.1e}: the same run up to floating-point differences that training "
              "amplifies). The `optimizer_state` row and the `identity (optimizer-state model)` row (plain gradient "
              "dot products on that same model, to compare like with like) score that model; their agreement "
              "rows are given against the cached finetuned model's losses (as for every row) and against that "
              "model's own losses.", ""]

    L += ["## Reading", "", *reading(r), ""]
    L += ["## Fact tracing", "",
          f"Queries: forget10's QA as trained ({r['tracing']['trained']['n_queries']}) and their held-out phrasings "
          f"({r['tracing']['phrasings']['n_queries']}: {cfg['phrasing_kinds']['unused']} `unused` templates, "
          f"{cfg['phrasing_kinds']['novel']} `novel`). Candidates: all {cfg['n_train']} training QA. "
          "R@k = recall@k; MRR = mean reciprocal rank (ties counted against the method). `same author`: the first "
          "pair of the query's author, nothing excluded; `other pair of author`: the same with the source pair left "
          "out.", ""]
    for qs in ("trained", "phrasings"):
        L += [f"### Queries: {qs}", "",
              "| method | source R@1 | source R@10 | source MRR | author R@1 | author R@10 | author MRR "
              "| other pair of author R@1 | R@10 | MRR |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in r["methods"]:
            t = r["tracing"][qs][m]
            cells = [f"{t[x]['recall@1']:.3f} | {t[x]['recall@10']:.3f} | {t[x]['mrr']:.3f}" for x in TARGETS]
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        L.append("")
    nc = r.get("identity_norm_check")
    L += ["Sign / indexing check: each of the 800 training QA used as a query, the fraction whose own pair ranks "
          "first, and the fraction of own scores > 0 (a pair should help itself)."
          + (f" The factored identity route's own scores x n match the squared gradient norms computed by plain "
             f"autograd to a relative {nc['max_relative_difference_factored_vs_autograd']:.1e} (largest over the "
             "800)." if nc else ""), "",
          "| method | own pair first | MRR of own pair | own score > 0 |", "|---|---:|---:|---:|"]
    for m in r["methods"]:
        s = r["self_rank1"][m]
        L.append(f"| {m} | {s['fraction']:.3f} | {s['mrr']:.3f} | {s['fraction_own_score_positive']:.3f} |")
    L.append("")

    L += ["## Agreement with exact retrains", "",
          f"Predicted: the summed scores of the split's forget QA on a question's loss; actual: loss(retrain) - "
          f"loss(finetuned), summed answer cross-entropy. Questions: the split's forget QA + {cfg['n_retain_questions']} "
          "retain QA (seeded). Correlations against the mean of the two retrain seeds' changes (per-seed values in "
          "the JSON). Ceiling: retrain seed 2's change predicting seed 1's.", ""]
    for sp in cfg["splits"]:
        e = r["agreement"][sp]
        L += [f"### {sp} ({e['n_forget']} forget + {e['n_retain']} retain questions)", "",
              f"Actual mean change (mean of seeds): forget {e['actual_mean_forget']['mean']:.3f}, retain "
              f"{e['actual_mean_retain']['mean']:.3f} nats.", "",
              "| method | all: Pearson | all: Spearman | forget: Pearson | forget: Spearman | retain: Pearson "
              "| retain: Spearman | mean predicted (forget / retain) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        rows = []
        for m in [m for m in SOLVERS if m in e]:
            means = f"{e[m]['predicted_mean_forget']:.3g} / {e[m]['predicted_mean_retain']:.3g}"
            rows.append((m, e[m]["seed mean"], means))
            if "own model, seed mean" in e[m]:
                rows.append((f"{m}, actual from its own model's losses", e[m]["own model, seed mean"], means))
        rows.append(("ceiling: seed 2 vs seed 1", e["ceiling (seed 2 vs seed 1)"],
                     f"{e['actual_mean_forget']['2']:.3g} / {e['actual_mean_retain']['2']:.3g}"))
        for name, c, means in rows:
            L.append(f"| {name} | " + " | ".join(f"{_num(c[g]['pearson'])} | {_num(c[g]['spearman'])}"
                                               for g in ("all", "forget", "retain")) + f" | {means} |")  # fmt: skip
        L.append("")
    L += ["## Time", "", "| method | fit s | scores s |", "|---|---:|---:|"]
    for m, t in r["timing"].items():
        L.append(f"| {m} | {t['fit_seconds']:.0f} | {t['score_seconds']:.0f} |")
    L.append("")
    return L


def reading(r: dict) -> list[str]:
    """Sentences computed from the numbers (nothing here is typed in by hand)."""
    out = []
    tr = r["tracing"]
    infl = [m for m in SOLVERS if m in tr["phrasings"]]
    lex = [m for m in LEXICAL if m in tr["phrasings"]]
    if not infl:
        return ["- No influence solver ran."]
    for qs in ("phrasings", "trained"):
        for target in ("source pair", "same author, source excluded"):
            t = tr[qs]
            best = max(infl, key=lambda m: t[m][target]["mrr"])
            lb = max(lex, key=lambda m: t[m][target]["mrr"])
            b, x = t[best][target], t[lb][target]
            verdict = ("a lexical baseline is ahead of every influence solver" if x["mrr"] > b["mrr"] else
                       "the best influence solver is at or above every lexical baseline")
            out.append(f"- Fact tracing, {qs} queries, {target}: best influence solver `{best}` MRR {b['mrr']:.3f} "
                       f"(R@1 {b['recall@1']:.3f}, R@10 {b['recall@10']:.3f}); best lexical `{lb}` MRR "
                       f"{x['mrr']:.3f} (R@1 {x['recall@1']:.3f}); " + ", ".join(
                           f"`{m}` {t[m][target]['mrr']:.3f}" for m in lex) + f": {verdict}.")  # fmt: skip
    sr = r["self_rank1"]
    if "identity" in sr and "identity (unit)" in sr:
        out.append(f"- Sign check: own score > 0 for {min(sr[m]['fraction_own_score_positive'] for m in infl):.3f} "
                   f"(the lowest over solvers) of the training QA used as queries. Own pair first: raw identity "
                   f"{sr['identity']['fraction']:.3f}, unit identity {sr['identity (unit)']['fraction']:.3f}"
                   + (f", ekfac {sr['ekfac']['fraction']:.3f}" if "ekfac" in sr else "")
                   + " (the unit variant differs from raw identity only by dividing by the gradient norms).")
    for sp in r["config"]["splits"]:
        e = r["agreement"][sp]
        loss_units = [m for m in SOLVERS if m in e and m != "identity (unit)"]
        if not loss_units:
            continue
        best = max(loss_units, key=lambda m: e[m]["seed mean"]["all"]["spearman"] or -2)
        c, ceil = e[best]["seed mean"], e["ceiling (seed 2 vs seed 1)"]
        bf = max(loss_units, key=lambda m: e[m]["seed mean"]["forget"]["spearman"] or -2)
        br = max(loss_units, key=lambda m: e[m]["seed mean"]["retain"]["spearman"] or -2)
        line = (f"- Agreement, {sp}: best over all questions `{best}` Spearman {_num(c['all']['spearman'])} "
                f"(Pearson {_num(c['all']['pearson'])}); within the forget questions the best is `{bf}` "
                f"{_num(e[bf]['seed mean']['forget']['spearman'])}, within the retain questions `{br}` "
                f"{_num(e[br]['seed mean']['retain']['spearman'])}; the retrain-seed ceiling: all "
                f"{_num(ceil['all']['spearman'])}, forget {_num(ceil['forget']['spearman'])}, retain "
                f"{_num(ceil['retain']['spearman'])}.")
        if "ekfac" in e:
            line += (f" Scale: ekfac's mean predicted change of the forget questions {e['ekfac']['predicted_mean_forget']:.3g} "
                     f"vs the actual {e['actual_mean_forget']['mean']:.3g} nats.")
        out.append(line)
    return out


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    methods = r["methods"]
    bars = [("trained", "source pair"), ("phrasings", "source pair"), ("phrasings", "same author, source excluded")]
    w = 0.8 / len(bars)
    for k, (qs, t) in enumerate(bars):
        ax.bar(np.arange(len(methods)) + (k - 1) * w, [r["tracing"][qs][m][t]["mrr"] for m in methods], w,
               label=f"{qs}: {t}")
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("MRR")
    ax.set_title("Fact tracing over 800 training QA")
    ax.legend(fontsize=8)
    ax = axes[1]
    sp = r["config"]["splits"][-1]
    e = r["agreement"][sp]
    cands = [m for m in SOLVERS if m in e and m != "identity (unit)"]
    if cands:
        best = max(cands, key=lambda m: e[m]["seed mean"]["all"]["spearman"] or -2)
        d = r["scatter"][sp][best]
        p, a, f = np.asarray(d["predicted"]), np.asarray(d["actual_mean"]), np.asarray(d["is_forget"])
        ax.scatter(p[~f], a[~f], s=8, alpha=0.6, label="retain questions")
        ax.scatter(p[f], a[f], s=12, alpha=0.8, color="C3", label="forget questions")
        c = e[best]["seed mean"]["all"]
        ax.set_title(f"{sp}: {best} (Pearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f})")
        ax.set_xlabel("predicted loss change (summed influence of the forget QA; symlog)")
        ax.set_ylabel("actual loss change, mean of 2 retrain seeds (symlog)")
        ax.set_xscale("symlog", linthresh=max(float(np.median(np.abs(p))), 1e-12))
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
