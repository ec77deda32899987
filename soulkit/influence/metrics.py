"""How good are influence scores? Leave-one-out correlation, LDS, brittleness.

* :func:`loo_correlation` -- Pearson and Spearman (``scipy.stats``) between predicted and actual
  leave-one-out loss changes, and the least-squares slope of actual on predicted (1 = calibrated).
* :func:`lds` -- the linear datamodeling score (Park et al. 2023).
* :func:`brittleness` -- the fewest top proponents whose removal flips a prediction (retrain callback).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["BrittlenessResult", "LDSResult", "LOOCorrelation", "brittleness", "lds", "loo_correlation"]


def _as_array(x: Any, name: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimension(s), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


@dataclass(frozen=True)
class LOOCorrelation:
    """Agreement of predicted and actual leave-one-out effects (one query, or pooled)."""

    pearson: float
    spearman: float
    slope: float  # least-squares slope of actual on predicted
    intercept: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {
            "pearson": self.pearson,
            "spearman": self.spearman,
            "slope": self.slope,
            "intercept": self.intercept,
            "n": self.n,
        }


def loo_correlation(predicted: Any, actual: Any) -> LOOCorrelation | list[LOOCorrelation]:
    """Pearson, Spearman and slope (actual on predicted) between predictions and retraining.

    Args:
        predicted: ``[n]`` (one query) or ``[m, n]`` (one row per query) predicted loss changes.
        actual: same shape, the measured ``loss(theta without j) - loss(theta)``.

    Returns:
        one :class:`LOOCorrelation`, or a list of them (one per row) for 2-D input.
    """
    p = _as_array(predicted, "predicted", (1, 2))
    a = _as_array(actual, "actual", (1, 2))
    if p.shape != a.shape:
        raise ValueError(f"predicted has shape {p.shape} but actual has {a.shape}")
    if p.ndim == 2:
        return [loo_correlation(pr, ar) for pr, ar in zip(p, a)]  # type: ignore[misc]
    if p.size < 3:
        raise ValueError(f"need at least 3 points for a correlation, got {p.size}")
    if np.ptp(p) == 0 or np.ptp(a) == 0:
        raise ValueError("predicted or actual is constant: the correlation is undefined")
    pear = float(stats.pearsonr(p, a)[0])
    spear = float(stats.spearmanr(p, a)[0])
    fit = stats.linregress(p, a)
    return LOOCorrelation(pear, spear, float(fit.slope), float(fit.intercept), int(p.size))


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score: mean over queries of the Spearman correlation across subsets."""

    lds: float
    per_query: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"lds": self.lds, "per_query": self.per_query.tolist()}


def lds(scores: Any, subsets: Any, actual: Any) -> LDSResult:
    """Linear datamodeling score (Park et al. 2023) of removal-calibrated scores.

    For each subset ``S_s`` (a model retrained on those training examples only), the scores predict
    the query loss ``loss_q(S_s) ~ loss_q(full) + sum_{j not in S_s} scores[q, j]``; LDS is the
    Spearman correlation across subsets between that prediction and the actual loss, averaged over
    queries. (For a fixed query ``sum_{j not in S} = sum_all - sum_{j in S}``, so this is the same
    ranking as Park et al.'s ``-sum_{j in S} scores`` on loss-valued outputs.)

    Args:
        scores: ``[m, n]`` from :meth:`InfluenceAnalyzer.scores`.
        subsets: ``[s, n]`` boolean masks (True = kept in the subset) or a sequence of index arrays.
        actual: ``[s, m]`` query losses of the models retrained on each subset (averaged over seeds).
    """
    sc = _as_array(scores, "scores", 2)
    m, n = sc.shape
    if (
        isinstance(subsets, np.ndarray)
        and subsets.dtype == bool
        or (hasattr(subsets, "dtype") and str(getattr(subsets, "dtype", "")) == "torch.bool")
    ):
        mask = np.asarray(subsets.cpu() if hasattr(subsets, "cpu") else subsets, dtype=bool)
    else:
        if not isinstance(subsets, Sequence) and not isinstance(subsets, np.ndarray):
            raise TypeError(
                f"subsets must be a boolean mask [s, n] or a sequence of index arrays, got {type(subsets).__name__}"
            )
        mask = np.zeros((len(subsets), n), dtype=bool)
        for s, idx in enumerate(subsets):
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"subsets[{s}] has indices outside [0, {n})")
            mask[s, idx] = True
    if mask.ndim != 2 or mask.shape[1] != n:
        raise ValueError(f"subsets mask must have shape [s, {n}], got {mask.shape}")
    act = _as_array(actual, "actual", 2)
    if act.shape != (mask.shape[0], m):
        raise ValueError(f"actual must have shape [s, m] = [{mask.shape[0]}, {m}], got {act.shape}")
    if mask.shape[0] < 3:
        raise ValueError(f"need at least 3 subsets, got {mask.shape[0]}")
    predicted = (~mask).astype(np.float64) @ sc.T  # [s, m]
    per = np.array([float(stats.spearmanr(predicted[:, q], act[:, q])[0]) for q in range(m)])
    return LDSResult(float(np.nanmean(per)), per)


@dataclass(frozen=True)
class BrittlenessResult:
    """Fewest top proponents whose removal flips the prediction (``k is None``: no tried ``k`` did)."""

    k: int | None
    removed: np.ndarray = field(repr=False)
    original: Any = None
    tried: tuple[tuple[int, Any], ...] = ()


def brittleness(
    scores: Any,
    retrain_predict: Callable[[np.ndarray], Any],
    *,
    ks: Sequence[int] | None = None,
    original: Any = None,
    search: str = "linear",
) -> BrittlenessResult:
    """Fewest top proponents of one prediction whose removal (and retraining) flips it.

    Proponents are the training examples with the largest positive scores (removing them raises the
    query's loss most). For each ``k`` in ``ks`` the ``k`` top proponents are removed and
    ``retrain_predict(removed_indices)`` retrains without them and returns the new prediction (e.g. a
    class label); the first ``k`` whose prediction differs from ``original`` is returned.

    Args:
        scores: ``[n]`` scores of one query (a row of :meth:`InfluenceAnalyzer.scores`).
        retrain_predict: ``removed (int64 array) -> prediction``; ``retrain_predict([])`` gives the
            original prediction when ``original`` is not passed.
        ks: increasing removal counts to try (default ``1, 2, 4, ...`` up to the number of proponents).
        original: the prediction with nothing removed.
        search: ``"linear"`` (try every ``k`` in order) or ``"binary"`` (bisection over ``ks``;
            assumes that once flipped, larger removals stay flipped).
    """
    s = _as_array(scores, "scores", 1)
    if not callable(retrain_predict):
        raise TypeError(f"retrain_predict must be callable, got {type(retrain_predict).__name__}")
    if search not in ("linear", "binary"):
        raise ValueError(f"search must be 'linear' or 'binary', got {search!r}")
    order = np.argsort(-s, kind="stable")
    n_pos = int((s > 0).sum())
    if ks is None:
        ks = [2**i for i in range(int(math.log2(max(n_pos, 1))) + 1)]
        if n_pos and ks[-1] != n_pos:
            ks.append(n_pos)
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 or k > s.size for k in ks) or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be strictly increasing integers in [1, {s.size}], got {ks}")
    if original is None:
        original = retrain_predict(np.zeros(0, dtype=np.int64))
    tried: list[tuple[int, Any]] = []

    def flips(k: int) -> bool:
        pred = retrain_predict(order[:k].astype(np.int64))
        tried.append((k, pred))
        return bool(np.any(np.asarray(pred) != np.asarray(original)))

    found: int | None = None
    if search == "linear":
        for k in ks:
            if flips(k):
                found = k
                break
    else:
        lo, hi = 0, len(ks) - 1
        if flips(ks[hi]):
            while lo < hi:
                mid = (lo + hi) // 2
                if flips(ks[mid]):
                    hi = mid
                else:
                    lo = mid + 1
            found = ks[lo]
    removed = order[:found].astype(np.int64) if found is not None else np.zeros(0, dtype=np.int64)
    return BrittlenessResult(found, removed, original, tuple(tried))
