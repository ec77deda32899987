"""LoGra-style projected gradients (``projection=k``) and the kept training statistics that let ``scores``
skip the training pass: checked against plain autograd, against the unprojected route, and through a store."""

from __future__ import annotations

import pytest
import torch

from soulkit.influence import InfluenceAnalyzer
from soulkit.influence.factored import FactoredInfluence

from . import _tiny_lm as L
from .test_store import _counting, interrupt_at


def _double(model: torch.nn.Module) -> torch.nn.Module:
    return model.double()


def _module_grad(model, name: str, example) -> torch.Tensor:
    """``[out, in + 1]``: the loss's gradient w.r.t. a linear module's weight, its bias appended (plain autograd)."""
    mod = dict(model.named_modules())[name]
    batch = {"input_ids": example["input_ids"].unsqueeze(0)}
    loss = L._loss(L._logits(model, batch), batch).sum()
    dw, db = torch.autograd.grad(loss, [mod.weight, mod.bias])
    return torch.cat([dw, db.unsqueeze(1)], dim=1)


def test_projected_identity_scores_are_projected_gradient_dot_products():
    model = _double(L.TinyLM())
    train, queries = L.train_set(), L.query_set()
    fi = FactoredInfluence(model, L.lm_loss(), method="identity", modules=["mix", "up"], projection=5,
                           batch_size=L.BATCH, progress=False).fit(train)
    assert fi.dims == {"mix": (5, 5), "up": (5, 5)}  # 12 and 24 outputs, 13 inputs: all sides projected
    expected = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for name in ("mix", "up"):
        p_in, p_out = fi._projections[name]
        assert p_in.shape == (5, 13) and p_out.shape[1] == (12 if name == "mix" else 24)

        def proj(e, name=name, p_in=p_in, p_out=p_out):
            return (p_out.double() @ _module_grad(model, name, e) @ p_in.double().T).flatten()

        gq = torch.stack([proj(e) for e in queries])
        gt = torch.stack([proj(e) for e in train])
        expected += gq @ gt.T
    expected /= len(train)  # the route returns float32 scores
    torch.testing.assert_close(fi.scores(train, queries).double(), expected, rtol=1e-4,
                               atol=1e-6 * float(expected.abs().max()))


def test_projection_wider_than_every_module_is_the_unprojected_route():
    train, queries = L.train_set(), L.query_set()
    plain = L.analyzer(_double(L.TinyLM())).fit(train).scores(train, queries)
    wide = InfluenceAnalyzer(_double(L.TinyLM()), L.lm_loss(), solver="ekfac", projection=64, batch_size=L.BATCH,
                             progress=False)
    assert all(p is None for pair in wide.factored._projections.values() for p in pair)
    torch.testing.assert_close(wide.fit(train).scores(train, queries), plain)


def test_projections_are_seeded_and_change_with_the_seed():
    def proj(seed):
        return FactoredInfluence(L.TinyLM(), L.lm_loss(), method="kfac", projection=4, seed=seed)._projections["up"]

    a, b, c = proj(0), proj(0), proj(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # entries N(0, 1/k): E ||P x||^2 = ||x||^2 (what keeps inner products in expectation)
    big = FactoredInfluence(torch.nn.Sequential(torch.nn.Linear(400, 3)), L.lm_loss(), method="identity",
                            modules=["0"], projection=200)._projections["0"][0]
    assert big.shape == (200, 401) and abs(float(big.pow(2).sum(0).mean()) - 1.0) < 0.05


@pytest.mark.parametrize("solver", ["ekfac", "kfac", "identity"])
@pytest.mark.parametrize("query_rank", [None, 2])
def test_kept_training_gradients_give_the_training_pass_scores(solver, query_rank):
    train, queries = L.train_set(), L.query_set()
    kw = dict(solver=solver, projection=4, query_rank=query_rank, batch_size=L.BATCH, progress=False,
              modules=["mix", "up"] if solver == "identity" else None)
    passed = InfluenceAnalyzer(_double(L.TinyLM()), L.lm_loss(), **kw).fit(train).scores(train, queries)
    an = InfluenceAnalyzer(_double(L.TinyLM()), L.lm_loss(), **kw).fit(train)
    stats = an.train_statistics(train)
    assert {k: tuple(v.shape) for k, v in stats.items()} == {"mix": (L.N_TRAIN, 4, 4), "up": (L.N_TRAIN, 4, 4)}
    calls = _counting(an)
    kept = an.scores(train, queries)
    assert calls == [L.N_QUERIES]  # the queries' batch only: no pass over the training set
    torch.testing.assert_close(kept, passed, rtol=1e-5, atol=1e-6 * float(passed.abs().max()))  # float32 sums
    with pytest.raises(ValueError, match="differs from the training set"):
        an.scores(L.data(L.N_TRAIN, 7), queries)
    per_token = an.scores(train, queries, per_token=True)  # per-token scores still take the training pass
    torch.testing.assert_close(per_token.sum(-1), passed, rtol=1e-5, atol=1e-8)


def test_kept_training_gradients_are_stored_resumed_and_reused_for_new_queries(tmp_path):
    train = L.train_set()
    st = L.store(tmp_path / "s")

    def make():
        return InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="ekfac", projection=4, batch_size=L.BATCH,
                                 progress=False)

    first = make().fit(train, store=st)
    first.train_statistics(train, store=st)
    expected = {s: first.scores(train, L.data(L.N_QUERIES, s)) for s in (2, 3)}
    assert (st.directory / "train_gradients.safetensors").is_file()
    again = make()
    calls = _counting(again)
    again.fit(train, store=st)
    again.train_statistics(train, store=st)
    assert calls == []  # factors and training gradients read back
    for s, want in expected.items():  # any query set against the one store: no "scores" section is claimed
        assert torch.equal(again.scores(train, L.data(L.N_QUERIES, s), store=st), want)
    assert calls == [L.N_QUERIES, L.N_QUERIES]


def test_projection_bad_input_is_named(tmp_path):
    train = L.train_set()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="projection must be an integer >= 1"):
            InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="ekfac", projection=bad)
    with pytest.raises(ValueError, match="projection is an option of the factored route"):
        InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="cg", projection=4)
    with pytest.raises(ValueError, match="no projected counterpart"):
        FactoredInfluence(L.TinyLM(), L.lm_loss(), method="optimizer_state", projection=4)
    an = L.analyzer().fit(train)
    with pytest.raises(ValueError, match="set projection=k"):
        an.train_statistics(train)
    with pytest.raises(RuntimeError, match="call fit"):
        InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="kfac", projection=4).train_statistics(train)
    fitted = InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="kfac", projection=4, batch_size=L.BATCH,
                               progress=False).fit(train)
    fitted.save_factors(tmp_path / "f")
    other = InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="kfac", projection=4, seed=1, batch_size=L.BATCH,
                              progress=False)
    with pytest.raises(ValueError, match="projected spaces differ"):
        other.load_factors(tmp_path / "f", train)


@pytest.mark.parametrize("stop", [2, 14, 17])
def test_an_interrupted_training_gradient_pass_resumes_bit_identically(tmp_path, stop):
    """Stopped at its ``stop``-th forward (6 covariance, 6 EK-FAC, 6 training-gradient batches), the rerun
    continues from the partial checkpoint and keeps the uninterrupted run's gradients bit for bit."""
    train = L.train_set()

    def make():
        return InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="ekfac", projection=4, batch_size=L.BATCH,
                                 progress=False)

    reference = make().fit(train)
    reference = reference.train_statistics(train)
    st = L.store(tmp_path / "s")
    an = make()
    interrupt_at(an, stop)
    with pytest.raises(KeyboardInterrupt):
        an.fit(train, store=st).train_statistics(train, store=st)
    again = make()
    calls = _counting(again)
    kept = again.fit(train, store=st).train_statistics(train, store=st)
    assert len(calls) == 18 - stop
    for name, g in reference.items():
        assert torch.equal(kept[name], g)
