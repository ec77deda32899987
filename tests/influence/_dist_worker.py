"""Rank body for ``tests/influence/test_distributed.py``: the tiny LM's factors and scores computed by 2
gloo ranks that share one store (each rank fits on its share of the training batches and scores its
share of the chunks; rank 0 joins them)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import _dist
from . import _tiny_lm as L

SCENARIOS = ("ekfac", "kfac_per_token", "projected")


def _body(solver: str, per_token: bool):
    def body(rank: int, world: int) -> dict:
        an = L.analyzer(solver=solver)
        calls: list[int] = []
        loss = an.factored.loss

        def counted(model, batch):
            calls.append(int(batch["input_ids"].shape[0]))
            return loss.output_fn(model, batch)

        import dataclasses

        an.factored.loss = dataclasses.replace(loss, output_fn=counted)
        st = L.store(Path(_OUT[0]) / f"store-{solver}", chunk_batches=2)
        scores = an.fit(L.train_set(), store=st).scores(L.train_set(), L.query_set(), per_token=per_token,
                                                        store=st)
        return {"scores": scores, "factors": an.factored.factors.tensors(), "calls": calls,
                "store": str(st.directory)}

    return body


def projected_analyzer():
    from soulkit.influence import InfluenceAnalyzer

    return InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="ekfac", projection=4, batch_size=L.BATCH, progress=False)


def _projected(rank: int, world: int) -> dict:
    """EK-FAC in a projected space, every training gradient kept (each rank fills its batches' rows)."""
    an = projected_analyzer()
    st = L.store(Path(_OUT[0]) / "store-projected", chunk_batches=2)
    an.fit(L.train_set(), store=st)
    stats = an.train_statistics(L.train_set(), store=st)
    return {"statistics": stats, "scores": an.scores(L.train_set(), L.query_set(), store=st)}


_OUT: list[str] = []
_BODIES = {"ekfac": _body("ekfac", False), "kfac_per_token": _body("kfac", True), "projected": _projected}


def main(rank: int, world: int, scenarios: list[str], out_dir: str) -> None:
    """Entry point of one rank: the scenarios in one process group (``tests/_dist.py``)."""
    _OUT.append(out_dir)
    torch.set_num_threads(1)
    _dist.run_rank(rank, world, scenarios, out_dir, _BODIES)
