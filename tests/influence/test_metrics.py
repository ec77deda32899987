"""Metrics (LOO correlation, LDS, brittleness) on synthetic answers. (The scatter plots: test_plots.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from soulkit.influence import brittleness, lds, loo_correlation


def test_loo_correlation_line_and_rows():
    x = np.linspace(-1, 1, 50)
    r = loo_correlation(x, 2 * x + 0.1)
    assert r.pearson == pytest.approx(1) and r.spearman == pytest.approx(1)
    assert r.slope == pytest.approx(2) and r.intercept == pytest.approx(0.1) and r.n == 50
    rng = np.random.default_rng(0)
    noisy = x + 0.3 * rng.standard_normal(50)
    r = loo_correlation(torch.tensor(x), torch.tensor(noisy))
    assert r.pearson == pytest.approx(stats.pearsonr(x, noisy)[0])
    rows = loo_correlation(np.stack([x, -x]), np.stack([x, x]))
    assert [round(q.pearson, 6) for q in rows] == [1.0, -1.0]
    with pytest.raises(ValueError, match="predicted has shape"):
        loo_correlation(x, x[:10])
    with pytest.raises(ValueError, match="constant"):
        loo_correlation(np.ones(5), x[:5])
    with pytest.raises(ValueError, match="NaN"):
        loo_correlation(np.array([1.0, np.nan, 2.0]), np.ones(3))


def test_lds_of_an_exact_linear_datamodel_is_one():
    rng = np.random.default_rng(0)
    n, m, s = 40, 3, 60
    scores = rng.standard_normal((m, n))
    masks = rng.random((s, n)) < 0.5
    # a world where removing examples changes the loss additively by their scores
    actual = 1.0 + (~masks).astype(float) @ scores.T
    res = lds(scores, masks, actual)
    assert res.lds == pytest.approx(1.0) and res.per_query.shape == (m,)
    idx = [np.flatnonzero(row) for row in masks]
    assert lds(scores, idx, actual).lds == pytest.approx(1.0)
    assert lds(scores, torch.from_numpy(masks), actual).lds == pytest.approx(1.0)
    assert lds(-scores, masks, actual).lds == pytest.approx(-1.0)  # sign matters
    noisy = actual + 3 * rng.standard_normal(actual.shape)
    assert 0 < lds(scores, masks, noisy).lds < 1
    with pytest.raises(ValueError, match=r"actual must have shape \[s, m\] = \[60, 3\]"):
        lds(scores, masks, actual.T)
    with pytest.raises(ValueError, match="outside"):
        lds(scores, [[0, 1, 99]] * 3, actual[:3])


def test_brittleness_finds_fewest_proponents():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(30)
    top = set(np.argsort(-scores)[:5].tolist())
    calls = []

    def retrain_predict(removed):
        calls.append(len(removed))
        # the prediction flips once at least 5 of the top proponents are gone
        return int(len(top & set(np.asarray(removed).tolist())) >= 5)

    res = brittleness(scores, retrain_predict, ks=range(1, 11))
    assert res.k == 5 and res.original == 0 and sorted(res.removed.tolist()) == sorted(top)
    calls.clear()
    res_b = brittleness(scores, retrain_predict, ks=list(range(1, 11)), original=0, search="binary")
    assert res_b.k == 5 and len(calls) < 10
    none = brittleness(scores, lambda removed: 0, ks=[1, 2, 4])
    assert none.k is None and none.removed.size == 0
    default = brittleness(scores, retrain_predict)  # 1, 2, 4, 8, ... up to the positive scores
    assert default.k == 8
    with pytest.raises(ValueError, match="strictly increasing"):
        brittleness(scores, retrain_predict, ks=[3, 2])
    with pytest.raises(ValueError, match="search must be"):
        brittleness(scores, retrain_predict, search="random")
