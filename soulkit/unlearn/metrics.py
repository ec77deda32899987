"""Pure metric functions of the TOFU-style evaluation: arrays in, floats/arrays out, no model.

Definitions follow TOFU (Maini et al. 2024, its legacy evaluation code) and the MIA/privleak conventions
of MUSE / open-unlearning. ``l(a)`` is the mean per-token NLL of answer ``a`` given its question.
Inputs are numpy arrays, torch tensors or nested lists; malformed ones (wrong shape, empty, NaN/Inf)
raise ``ValueError`` naming the argument.

* :func:`rouge_l_recall` -- rouge-score ``rougeL`` recall with the Porter stemmer (as TOFU).
* :func:`truth_ratio`, :func:`truth_ratio_score`, :func:`forget_quality_statistic`,
  :func:`forget_quality` (``scipy.stats.ks_2samp``), :func:`normalized_probability`,
  :func:`model_utility` (harmonic mean of 9 values).
* membership inference scores per sequence, all oriented so that **higher = more member-like**:
  :func:`mia_loss_score`, :func:`mia_zlib_score`, :func:`mia_min_k_score`,
  :func:`mia_min_k_plus_plus_score` (:data:`MIA_ATTACKS` names them); :func:`mia_auc` (the
  Mann-Whitney U statistic, from ``scipy.stats.rankdata``), :func:`privleak`.
* :func:`extraction_strength` from teacher-forced greedy correctness.

:func:`soulkit.unlearn.evaluate.evaluate_model` computes all of them for a model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer
from scipy import stats
from scipy.special import logsumexp

__all__ = [
    "MIA_ATTACKS",
    "extraction_strength",
    "forget_quality",
    "forget_quality_statistic",
    "mia_auc",
    "mia_loss_score",
    "mia_min_k_plus_plus_score",
    "mia_min_k_score",
    "mia_zlib_score",
    "model_utility",
    "normalized_probability",
    "privleak",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_score",
]

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
_STD_FLOOR = 1e-8  # Min-K%++: sigma below this is treated as this (a near one-hot next-token distribution)


# ----------------------------------------------------------------------------------------------------
# array helpers
# ----------------------------------------------------------------------------------------------------

def _to_numpy(x: Any, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype == torch.bool else x.double().numpy()
    return np.asarray(x, dtype=dtype)


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _token_arrays(logprob: Any, mask: Any | None, name: str = "logprob") -> tuple[np.ndarray, np.ndarray]:
    """``[B, T]`` float values and bool mask; every row needs >= 1 masked-in token; finite where masked."""
    lp = _to_numpy(logprob)
    if lp.ndim != 2 or lp.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, T] with B >= 1, got {lp.shape}")
    m = np.ones(lp.shape, dtype=bool) if mask is None else _to_numpy(mask, dtype=bool)
    if m.shape != lp.shape:
        raise ValueError(f"mask shape {m.shape} does not match {name} shape {lp.shape}")
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"sequence(s) {empty.tolist()} have no answer tokens in the mask")
    if not np.isfinite(lp[m]).all():
        raise ValueError(f"{name} contains NaN or Inf at answer positions")
    return lp, m


def _check_k(k: float) -> float:
    if not (isinstance(k, (int, float)) and 0.0 < k <= 1.0):
        raise ValueError(f"k must be in (0, 1], got {k!r}")
    return float(k)


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    n = max(1, math.floor(k * values.size + 1e-9))
    return float(np.sort(values)[:n].mean())


# ----------------------------------------------------------------------------------------------------
# TOFU metrics
# ----------------------------------------------------------------------------------------------------

def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each prediction against its reference: ``LCS(pred, ref) / len(ref)`` in tokens.

    rouge-score's ``rougeL`` with ``use_stemmer=True`` (as TOFU): lower-cased, non-alphanumerics
    dropped, Porter-stemmed. An empty prediction scores 0.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l_recall needs at least one prediction")
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(f"prediction and reference {i} must be strings, got {type(p).__name__}, "
                            f"{type(r).__name__}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rougeL"].recall for p, r in zip(predictions, references)],
                    dtype=np.float64)


def _para_pert(para_nll: Any, pert_nll: Any, para_name: str) -> tuple[np.ndarray, np.ndarray]:
    para = _array(para_nll, para_name, 1)
    pert = _array(pert_nll, "pert_nll", 2)
    if pert.shape[0] != para.shape[0]:
        raise ValueError(f"pert_nll has {pert.shape[0]} rows but {para_name} has {para.shape[0]} entries")
    return para, pert


def truth_ratio(para_nll: Any, pert_nll: Any) -> np.ndarray:
    """Truth ratio per question (TOFU's metric form; larger = the model prefers the wrong answers).

    ``R = mean_p exp(-l(a_pert_p)) / exp(-l(a_para)) = mean_p exp(l(a_para) - l(a_pert_p))``

    Args:
        para_nll: ``[N]`` mean per-token NLL of the paraphrased answer (for real authors / world
            facts, of the answer itself, as in TOFU).
        pert_nll: ``[N, P]`` mean per-token NLL of each perturbed answer.
    """
    para, pert = _para_pert(para_nll, pert_nll, "para_nll")
    log_r = logsumexp(para[:, None] - pert, axis=1) - math.log(pert.shape[1])
    return np.exp(log_r)


def truth_ratio_score(R: Any, forget: bool) -> float:
    """Reported truth ratio: ``mean(min(R, 1/R))`` on a forget set (1 = indifferent between true and
    false answers, as a model that never saw them), else ``mean(max(0, 1 - R))`` (1 = true answers far
    preferred)."""
    r = _to_numpy(R)
    if r.ndim != 1 or r.size == 0 or np.isnan(r).any():
        raise ValueError(f"R must be a non-empty 1-D array without NaN, got shape {r.shape}")
    if (r < 0).any():
        raise ValueError("truth ratios must be >= 0")
    if forget:
        with np.errstate(divide="ignore"):
            return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality_statistic(para_nll: Any, pert_nll: Any) -> np.ndarray:
    """Per-question statistic inside forget quality (geometric form, TOFU legacy code):

    ``T = exp(mean_p l(a_pert_p) - l(a_para))`` -- ``[N]`` from ``para_nll [N]``, ``pert_nll [N, P]``.
    """
    para, pert = _para_pert(para_nll, pert_nll, "para_nll")
    return np.exp(pert.mean(axis=1) - para)


def forget_quality(T_model: Any, T_retrain: Any) -> tuple[float, float]:
    """Forget quality: ``(p-value, statistic)`` of ``scipy.stats.ks_2samp(T_model, T_retrain)``.

    p = 1 / statistic = 0 for identical samples; with complete separation the p-value sits at its
    floor (which depends only on the sample sizes), so the KS statistic is reported as well.
    """
    a = _array(T_model, "T_model", 1)
    b = _array(T_retrain, "T_retrain", 1)
    res = stats.ks_2samp(a, b)
    return float(res.pvalue), float(res.statistic)


def normalized_probability(true_nll_mean: Any, pert_nll_mean: Any) -> np.ndarray:
    """Per question ``P(true) / (P(true) + sum_p P(pert_p))`` with ``P(a) = exp(-l(a))``.

    ``true_nll_mean``: ``[N]``; ``pert_nll_mean``: ``[N, P]`` (mean per-token NLLs). Computed in log space.
    """
    true, pert = _para_pert(true_nll_mean, pert_nll_mean, "true_nll_mean")
    logits = -np.concatenate([true[:, None], pert], axis=1)
    return np.exp(logits[:, 0] - logsumexp(logits, axis=1))


def model_utility(values: Sequence[float] | Mapping[str, float]) -> float:
    """Harmonic mean of the 9 utility values {probability, ROUGE, truth ratio} x {retain, real authors,
    world facts}; 0 if any value is 0. Each value must lie in [0, 1]."""
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if len(vals) != 9:
        raise ValueError(f"model_utility needs exactly 9 values, got {len(vals)}")
    a = _array(vals, "model utility values", 1)
    if ((a < 0) | (a > 1)).any():
        raise ValueError(f"model utility values must lie in [0, 1], got {a.tolist()}")
    if (a == 0).any():
        return 0.0
    return float(stats.hmean(a))


# ----------------------------------------------------------------------------------------------------
# membership inference and extraction
# ----------------------------------------------------------------------------------------------------

def mia_loss_score(logprob: Any, mask: Any | None = None) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018): ``-mean NLL = mean log p`` over answer tokens, ``[B]``.

    ``logprob``: ``[B, T]`` token log-probabilities; ``mask``: ``[B, T]`` bool answer positions
    (``None``: all). Higher = lower loss = more member-like.
    """
    lp, m = _token_arrays(logprob, mask)
    return (lp * m).sum(axis=1) / m.sum(axis=1)


def mia_zlib_score(logprob: Any, mask: Any | None, texts: Sequence[str]) -> np.ndarray:
    """zlib attack (Carlini et al. 2021): ratio of log-perplexity to zlib entropy, negated, ``[B]``.

    ``score = -(mean NLL of the answer tokens) / len(zlib.compress(text.encode("utf-8")))`` -- the
    log-perplexity (mean, not total, NLL: Carlini et al.'s ``log(perplexity)``, as MUSE and
    open-unlearning compute it) over the zlib-compressed length in bytes of the scored text. Higher =
    lower loss than the text's compressibility explains = more member-like.
    """
    texts = list(texts)
    nll = -mia_loss_score(logprob, mask)
    if len(texts) != nll.shape[0]:
        raise ValueError(f"{len(texts)} texts for {nll.shape[0]} sequences")
    z = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)
    return -nll / z


def mia_min_k_score(logprob: Any, mask: Any | None = None, k: float = 0.4) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest ``max(1, floor(k * n))`` of a sequence's ``n``
    answer-token log-probs, ``[B]``. Higher = even the least likely tokens are likely = more member-like."""
    k = _check_k(k)
    lp, m = _token_arrays(logprob, mask)
    return np.array([_lowest_k_mean(lp[i][m[i]], k) for i in range(lp.shape[0])])


def mia_min_k_plus_plus_score(logprob: Any, mean: Any, std: Any, mask: Any | None = None,
                              k: float = 0.4) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): per token ``(log p(x_t) - mu_t) / sigma_t``, where ``mu_t`` and
    ``sigma_t`` are the mean and std of ``log p(z)`` for ``z`` drawn from the model's own next-token
    distribution; the score is the mean of the lowest ``max(1, floor(k * n))`` token scores, ``[B]``.
    ``sigma_t`` is floored at 1e-8. Higher = more member-like."""
    k = _check_k(k)
    lp, m = _token_arrays(logprob, mask)
    mu, _ = _token_arrays(mean, m, "mean")
    sd, _ = _token_arrays(std, m, "std")
    if (sd[m] < 0).any():
        raise ValueError("std must be >= 0")
    z = (lp - mu) / np.maximum(sd, _STD_FLOOR)
    return np.array([_lowest_k_mean(z[i][m[i]], k) for i in range(lp.shape[0])])


def mia_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score (higher = member).

    0.5 = chance; 1 = members always score higher. The fraction of (member, non-member) pairs the
    score orders right, a tie counting 1/2: the Mann-Whitney U statistic over ``n_members *
    n_nonmembers``, which equals ``sklearn.metrics.roc_auc_score`` (without needing scikit-learn).
    """
    a = _array(member_scores, "member_scores", 1)
    b = _array(nonmember_scores, "nonmember_scores", 1)
    ranks = stats.rankdata(np.concatenate([a, b]))  # tied scores share their average rank
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def privleak(auc: float, auc_retain: float) -> float:
    """PrivLeak: ``((1 - auc) - (1 - auc_retain)) / (1 - auc_retain) * 100``.

    ``auc``: MIA AUC (forget vs holdout) of the evaluated model; ``auc_retain``: that of the retrained
    model. 0 = as private as retraining; negative = forget set still more member-like than after
    retraining (under-unlearning, leakage); positive = less member-like (over-unlearning).
    Raises ``ValueError`` when ``auc_retain == 1`` (the relative difference is undefined).
    """
    for name, v in (("auc", auc), ("auc_retain", auc_retain)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    if auc_retain == 1.0:
        raise ValueError("privleak is undefined for auc_retain == 1 (division by 1 - auc_retain = 0)")
    return ((1.0 - auc) - (1.0 - auc_retain)) / (1.0 - auc_retain) * 100.0


def extraction_strength(correct: Any, mask: Any | None = None) -> np.ndarray:
    """Extraction strength per sequence (Carlini et al. 2021 style): ``ES = 1 - k / |y|``.

    ``k`` is the shortest answer prefix from which greedy decoding reproduces the rest of the answer
    exactly. With teacher forcing (``correct[b, t]``: argmax prediction equals the target) that is
    ``k = (index within the answer of the last wrongly predicted token) + 1``, or 0 when every token is
    right: ES = 1 means the whole answer is extractable from the question alone, 0 means not even the
    last token. ``correct``/``mask``: ``[B, T]`` bool (``mask``: answer positions; ``None``: all).
    """
    c = _to_numpy(correct, dtype=bool)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"correct must have shape [B, T] with B >= 1, got {c.shape}")
    _, m = _token_arrays(np.zeros(c.shape), mask, "correct")
    out = np.empty(c.shape[0])
    for i in range(c.shape[0]):
        ans = c[i][m[i]]
        wrong = np.flatnonzero(~ans)
        k = int(wrong[-1]) + 1 if wrong.size else 0
        out[i] = 1.0 - k / ans.size
    return out
