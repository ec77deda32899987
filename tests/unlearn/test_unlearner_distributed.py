"""The Unlearner on torch.distributed: 2 CPU ranks (gloo) with parallel="ddp" and "fsdp2" against one
process running the same recipe, in float64.

* GradDiff + AdamW (2 micro-batches, warmup and linear decay, clipping), DDP and FSDP2;
* NPO (KL retain term, so the frozen reference runs on each rank: a full copy under DDP, sharded under
  FSDP2) + Sophia (GNB refresh with sampled labels), interrupted after step 3 and resumed from the
  step-2 checkpoint that rank 0 wrote, DDP and FSDP2;
* a NaN loss seen by one rank only: every rank stops and restores the checkpoint (DDP, FSDP2) or, under
  FSDP2 without out_dir, the in-memory snapshot;
* IDK with SOUL's released optimizer (FSDP2); SimNPO with signum, a SalUn mask with Sophia, and
  Sophia's Hutchinson refresh (DDP);
* ``soulkit unlearn`` itself on the ranks against the same command in one process.

The recipes and rank bodies are in ``tests/unlearn/_dist_worker.py``; ``tests/_dist.py`` starts the
ranks. One launch runs every scenario (~70 s on 2 busy cores, with the one-process CLI run): marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .. import _dist
from . import _dist_worker as W

pytestmark = [pytest.mark.distributed, pytest.mark.slow, _dist.needs_gloo]


@pytest.fixture(scope="module")
def cli_single(tmp_path_factory) -> Path:
    """``soulkit unlearn`` in this process: the reference, and the models the ranks find in the cache."""
    from soulkit.cli import main

    root = tmp_path_factory.mktemp("cli")
    W.add_cli_scale()
    assert main(W.cli_args(root / "out", root / "cache")) == 0
    return root


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory, cli_single) -> dict[str, list[dict]]:
    mp = pytest.MonkeyPatch()
    mp.setenv(W.CLI_CACHE_ENV, str(cli_single / "cache"))  # the ranks inherit it
    try:
        return _dist.launch(W.main, W.SCENARIOS, tmp_path_factory, W.WORLD_SIZE)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, tuple]:
    """Each recipe run in this process (parallel=None), uninterrupted."""
    return {name: W.run(name, None, tmp_path_factory.mktemp(name) / "run", interrupt=False) for name in W.SPECS}


@pytest.mark.parametrize("scenario", [s for s in W.SCENARIOS if s not in ("bad_batch", "cli_ddp")])
def test_ranks_follow_the_single_process_trajectory(dist_results, single_process, scenario):
    r0, r1 = dist_results[scenario]
    name = scenario.split("_", 1)[1]
    tok, ref, _, _ = single_process[name]
    spec = W.SPECS[name]
    # a NaN on one rank stops every rank at the same step and restores the step-2 checkpoint
    assert (ref.stopped, ref.steps) == (("nonfinite_loss", 2) if spec.nan_at_call else
                                        ("completed", spec.config["steps"]))
    assert r0["vocab"] == r1["vocab"] == W.vocab_digest(tok)  # every process started from the same data
    ref_params = ref.model.state_dict()
    start = W.build()[1].state_dict()
    for r in (r0, r1):
        assert (r["stopped"], r["steps"]) == (ref.stopped, ref.steps)
        assert r["untouched"] and r["is_plain"]  # the input model is never modified; the result is unsharded
        assert r["params"].keys() == ref_params.keys()
        for k, v in ref_params.items():
            assert r["params"][k].dtype == torch.float64
            torch.testing.assert_close(r["params"][k], v, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
            assert torch.equal(r["params"][k], r0["params"][k])  # replicas agree bit for bit
        assert r["losses"] == pytest.approx([e["loss"] for e in ref.log], rel=1e-9, abs=1e-11)
        if spec.on_disk:
            # rank 0 wrote the model and the log once; the checkpoint is gone and no temporary file is left
            assert r["model_dir"] and not r["checkpoint_left"] and r["log_lines"] == ref.steps and r["stray"] == []
            assert r["mask_file"] == (spec.config.get("mask") is not None)
        else:
            assert not r["written"]  # no out_dir: nothing on disk (the NaN restored the in-memory snapshot)
        assert r["resumed_from"] == (-1 if spec.interrupt_at is None else 2)
    moved = max((ref_params[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2, "the trajectory barely moved: the comparison would be vacuous"


def test_a_world_size_that_does_not_divide_the_batch_is_one_clear_error(dist_results):
    for r in dist_results["bad_batch"]:
        assert r["error"] == ("UnlearnConfig.batch_size=3 must be a multiple of the world size 2: each rank takes "
                              "an equal share of every global batch")


def test_soulkit_unlearn_under_torchrun_runs_ddp_and_rank_0_writes(dist_results, cli_single):
    """``soulkit unlearn`` on 2 ranks (as under ``torchrun``: a process group, no --parallel) writes what one
    process writes, once, with the same unlearned weights (float32 model: within rounding)."""
    from safetensors.torch import load_file

    single = cli_single / "out"
    weights = load_file(str(single / "model" / "model.safetensors"))
    results = json.loads((single / "results.json").read_text())
    moved = False
    for r in dist_results["cli_ddp"]:
        assert r["files"] == sorted(p.name for p in single.iterdir())  # results, model, log, run.json; no checkpoint
        assert r["results"]["parallel"] == {"kind": "ddp", "world_size": 2}
        assert (r["results"]["steps"], r["results"]["stopped"]) == (results["steps"], results["stopped"]) == (3, "completed")
        assert r["results"]["final_loss"] == pytest.approx(results["final_loss"], rel=1e-5)
        for k, v in weights.items():
            torch.testing.assert_close(r["weights"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    start = load_file(str(next((cli_single / "cache").rglob("finetuned*/model.safetensors"))))
    moved = max((weights[k] - start[k]).abs().max().item() for k in weights if k in start)
    assert moved > 1e-4
