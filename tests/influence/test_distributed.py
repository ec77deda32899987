"""Factors and scores of 2 gloo ranks on the CPU (each fitting on half of the training batches, sums
all-reduced, and scoring half of the chunks into one store) equal one process's."""

from __future__ import annotations

import pytest
import torch

from .. import _dist
from . import _dist_worker as W
from . import _tiny_lm as L

pytestmark = [pytest.mark.distributed, _dist.needs_gloo]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    return _dist.launch(W.main, W.SCENARIOS, tmp_path_factory)


def _covariance(f: dict, name: str, side: str) -> torch.Tensor:
    """``Q diag(l) Q^T``: comparable whatever the eigenvectors' signs."""
    q, v = f[f"{name}/{side}_vecs"], f[f"{name}/{side}_vals"]
    return q @ torch.diag(v) @ q.T


@pytest.mark.parametrize("scenario", ["ekfac", "kfac_per_token"])
def test_two_ranks_give_the_single_process_factors_and_scores(ranks, scenario):
    solver, per_token = ("ekfac", False) if scenario == "ekfac" else ("kfac", True)
    single = L.analyzer(solver=solver).fit(L.train_set())
    expected = single.scores(L.train_set(), L.query_set(), per_token=per_token)
    r0, r1 = ranks[scenario]
    # every rank returns the whole, joined tensor, and the ranks agree bit for bit
    assert r0["scores"].shape == expected.shape
    assert torch.equal(r0["scores"], r1["scores"])
    torch.testing.assert_close(r0["scores"], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    mine = single.factored.factors.tensors()
    for name in single.factored.dims:
        for side in ("a", "s"):
            torch.testing.assert_close(_covariance(r0["factors"], name, side), _covariance(mine, name, side),
                                       rtol=1e-5, atol=1e-6)
            assert torch.equal(r0["factors"][f"{name}/{side}_vecs"], r1["factors"][f"{name}/{side}_vecs"])
        if solver == "ekfac":
            c = mine[f"{name}/corrected"]
            torch.testing.assert_close(r0["factors"][f"{name}/corrected"], c, rtol=1e-4, atol=1e-6 * c.max().item())
    # the work was split: 6 training batches per pass, 3 chunks of 2 batches, one query batch on each rank
    passes = 2 if solver == "ekfac" else 1
    n_batches = -(-L.N_TRAIN // L.BATCH)
    assert len(r0["calls"]) + len(r1["calls"]) == passes * n_batches + 2 + n_batches
    assert sum(r0["calls"]) + sum(r1["calls"]) == (passes + 1) * L.N_TRAIN + 2 * L.N_QUERIES
    assert len(r0["calls"]) == passes * 3 + 1 + 4 and len(r1["calls"]) == passes * 3 + 1 + 2


def test_one_process_reads_the_store_the_ranks_wrote(ranks):
    r0, _ = ranks["ekfac"]
    an = L.analyzer()
    st = L.store(r0["store"], chunk_batches=2)
    assert torch.equal(an.fit(L.train_set(), store=st).scores(L.train_set(), L.query_set(), store=st), r0["scores"])


def test_two_ranks_keep_the_single_process_training_gradients(ranks):
    an = W.projected_analyzer().fit(L.train_set())
    stats = an.train_statistics(L.train_set())
    expected = an.scores(L.train_set(), L.query_set())
    r0, r1 = ranks["projected"]
    for name, g in stats.items():
        assert torch.equal(r0["statistics"][name], r1["statistics"][name])
        torch.testing.assert_close(r0["statistics"][name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    torch.testing.assert_close(r0["scores"], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
