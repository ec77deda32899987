"""Sophia under DDP and FSDP2: 2 CPU ranks (gloo, loopback) against a single-process run.

The rank body lives in ``tests/optim/_dist_worker.py``; processes are started and meet as
``tests/_dist.py`` does it (spawn, a rendezvous file, gloo on loopback). One launch runs all
scenarios (module fixture): starting two ranks that import torch and torch._dynamo (DDP and
FSDP2 do) costs far more than the scenarios themselves.
"""

from __future__ import annotations

import math

import pytest
import torch

from .. import _dist
from . import _dist_worker as W

pytestmark = [pytest.mark.distributed, _dist.needs_gloo]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict[str, list[dict]]:
    return _dist.launch(W.main, W.SCENARIOS, tmp_path_factory, W.WORLD_SIZE)


def _assert_params_close(actual, expected, what: str, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _assert_moved(params) -> None:
    start = list(W.build_model().parameters())
    moved = max((p - s).abs().max().item() for p, s in zip(params, start))
    assert moved > 10 * W.HYPER["lr"] * 0.1, "the trajectory barely moved: the comparison would be vacuous"


def test_ddp_accumulate_gnb_matches_single_process(dist_results):
    """DDP, 2 ranks x 2 micro-batches, GNB refresh from the training logits: Sophia sums the buffers and
    term counts over micro-batches and ranks at fold time, so the run equals one process on the global
    batch that folds the GNB estimate of the same sampled labels."""
    r0, r1 = dist_results["ddp_gnb"]
    refresh_steps = [t for t in range(W.STEPS) if t % W.HYPER["hessian_update_interval"] == 0]
    for r in (r0, r1):
        assert sorted(r["sampled"]) == refresh_steps
        assert r["num_hessian_updates"] == len(refresh_steps)
        assert r["pending_terms_after"] == 0
        # each rank adds its own half of the global batch, over its micro-batches
        assert all(r["terms_added"][t] == W.GLOBAL_BATCH // W.WORLD_SIZE for t in refresh_steps)
        assert all(0.0 <= w <= 1.0 for w in r["win_rate"])
    # DDP keeps replicas identical
    _assert_params_close(r1["params"], r0["params"], "rank1 vs rank0 params", rtol=0, atol=0)
    _assert_params_close(r1["hessian"], r0["hessian"], "rank1 vs rank0 hessian", rtol=0, atol=0)

    sampled = {t: torch.cat([r0["sampled"][t], r1["sampled"][t]]) for t in refresh_steps}
    assert all(s.shape == (W.GLOBAL_BATCH,) for s in sampled.values())
    ref_model, ref_opt = W.gnb_reference(sampled)
    ref_params = [p.detach() for p in ref_model.parameters()]
    _assert_params_close(r0["params"], ref_params, "DDP vs single-process params")
    _assert_params_close(
        r0["hessian"], [ref_opt.state[p]["hessian"] for p in ref_model.parameters()], "DDP vs single-process h"
    )
    assert ref_opt.num_hessian_updates == len(refresh_steps)
    assert all(h.abs().max() > 0 for h in r0["hessian"])
    _assert_moved(r0["params"])


def test_ddp_paper_style_update_hessian_matches_single_process(dist_results):
    """DDP averages the sampled-loss gradient over ranks; update_hessian(batch_size=B_global) then gives
    the single-process estimate."""
    r0, r1 = dist_results["ddp_paper"]
    ref_model, ref_opt = W.train_paper_style()
    ref_params = [p.detach() for p in ref_model.parameters()]
    for r in (r0, r1):
        assert r["num_hessian_updates"] == ref_opt.num_hessian_updates == math.ceil(
            W.STEPS / W.HYPER["hessian_update_interval"]
        )
        _assert_params_close(r["params"], ref_params, "DDP vs single-process params")
        assert r["win_rate"] == pytest.approx(ref_opt.win_rate(), abs=1e-12)
    _assert_moved(r0["params"])


@pytest.mark.parametrize("scenario", ["fsdp2_paper", "fsdp2_paper_fused"])
def test_fsdp2_paper_style_matches_single_process(dist_results, scenario):
    """FSDP2 (fully_shard, DTensor parameters and state): paper-style refresh, trajectory equals one
    process; accumulate_gnb refuses sharded parameters with a clear error. ``_fused``: Sophia(fused=True)
    sends the DTensors to the foreach path instead of the Triton kernel."""
    r0, r1 = dist_results[scenario]
    if "skipped" in r0:
        pytest.skip(r0["skipped"])
    ref_model, ref_opt = W.train_paper_style()
    ref_params = [p.detach() for p in ref_model.parameters()]
    ref_h = [ref_opt.state[p]["hessian"] for p in ref_model.parameters()]
    for r in (r0, r1):
        assert r["state_is_dtensor"]
        assert r["num_hessian_updates"] == ref_opt.num_hessian_updates
        _assert_params_close(r["params"], ref_params, "FSDP2 vs single-process params")
        _assert_params_close(r["hessian"], ref_h, "FSDP2 vs single-process h")
        # the win rate is counted on this rank's shard: a fraction, not the global one
        assert all(0.0 <= w <= 1.0 for w in r["win_rate"])
        assert "DTensor/FSDP2" in r["accumulate_gnb_error"]
        assert "DTensor/FSDP2" in r["accumulate_hutchinson_error"]
    _assert_moved(r0["params"])


def test_ddp_hutchinson_estimates_are_averaged_over_ranks(dist_results):
    """DDP, Hutchinson refresh: each rank's estimate of its own half-batch loss (same probes on every
    rank) averaged over ranks is the estimate of the global batch's mean loss, so the run equals one
    process (and the replicas stay identical, which per-rank estimates would break)."""
    r0, r1 = dist_results["ddp_hutchinson"]
    _assert_params_close(r1["params"], r0["params"], "rank1 vs rank0 params", rtol=0, atol=0)
    _assert_params_close(r1["hessian"], r0["hessian"], "rank1 vs rank0 hessian", rtol=0, atol=0)
    ref_model, ref_opt = W.train_hutchinson()
    _assert_params_close(r0["params"], [p.detach() for p in ref_model.parameters()], "DDP vs single-process params")
    _assert_params_close(r0["hessian"], [ref_opt.state[p]["hessian"] for p in ref_model.parameters()],
                         "DDP vs single-process h")
    assert r0["num_hessian_updates"] == ref_opt.num_hessian_updates == math.ceil(
        W.STEPS / W.HYPER["hessian_update_interval"]
    )
    _assert_moved(r0["params"])
