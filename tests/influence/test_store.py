"""The resumable influence store: same scores as a run without it, resume after SIGKILL bit-identical,
a store made for another model, data set or options refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from soulkit.influence import InfluenceAnalyzer, InfluenceStore, StoreMismatchError
from soulkit.influence.store import data_fingerprint, model_fingerprint

from .. import _kill
from . import _tiny_lm as L

ROOT = Path(__file__).resolve().parents[2]


def _wrap_forward(an: InfluenceAnalyzer, wrapper) -> None:
    """Route ``an``'s forward passes through ``wrapper(fn, model, batch)``."""
    loss = an.factored.loss
    an.factored.loss = dataclasses.replace(loss, output_fn=lambda m, b: wrapper(loss.output_fn, m, b))


def interrupt_at(an: InfluenceAnalyzer, stop: int) -> None:
    """Make ``an`` raise KeyboardInterrupt at its ``stop``-th forward pass (counting from 0), as Ctrl-C would."""
    seen: list[int] = []

    def interrupt(fn, model, batch):
        if len(seen) == stop:
            raise KeyboardInterrupt
        seen.append(1)
        return fn(model, batch)

    _wrap_forward(an, interrupt)


def _counting(an: InfluenceAnalyzer) -> list[int]:
    """Count the model's forward passes of ``an`` (one entry per batch run)."""
    calls: list[int] = []

    def counted(fn, model, batch):
        calls.append(batch["input_ids"].shape[0])
        return fn(model, batch)

    _wrap_forward(an, counted)
    return calls


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("solver", ["ekfac", "kfac", "identity"])
def test_a_stored_run_equals_a_plain_run_and_a_rerun_only_reads(tmp_path, solver):
    train, queries = L.train_set(), L.query_set()
    if solver == "identity":
        def make():
            return InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="identity", modules=["mix", "up"],
                                     batch_size=L.BATCH, progress=False)
    else:
        def make():
            return L.analyzer(solver=solver)
    plain = make().fit(train).scores(train, queries)
    st = L.store(tmp_path / "s", chunk_batches=4)  # chunks of 4 + 2 batches
    stored = make().fit(train, store=st).scores(train, queries, store=st)
    assert torch.equal(stored, plain)
    again = make()
    calls = _counting(again)
    assert torch.equal(again.fit(train, store=st).scores(train, queries, store=st), plain)
    assert calls == [], "a complete store is read, not recomputed"
    if solver != "identity":
        assert again.factored.factors is not None
        for name, f in make().fit(train).factored.factors.modules.items():
            g = again.factored.factors.modules[name]
            assert torch.equal(f.a_vecs, g.a_vecs) and torch.equal(f.s_vals, g.s_vals)
            assert (f.corrected is None) == (solver == "kfac") and (f.corrected is None or
                                                                    torch.equal(f.corrected, g.corrected))
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["factors"]["method"] == solver and meta["scores"]["n_queries"] == L.N_QUERIES


def test_per_token_scores_are_stored_too(tmp_path):
    train, queries = L.train_set(), L.query_set()
    plain = L.analyzer().fit(train).scores(train, queries, per_token=True)
    assert torch.equal(L.run(tmp_path / "s", per_token=True), plain)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "s" / "scores.safetensors"))
    assert torch.equal(saved["per_token"], plain) and torch.equal(saved["scores"], plain.sum(-1))


@pytest.mark.slow  # three fresh interpreters killed in turn: ~17 s on two busy cores
def test_resume_after_kills_at_several_points_is_bit_identical(tmp_path):
    """One store, three SIGKILLs (inside the covariance pass, inside the EK-FAC pass, inside scoring), each
    rerun resuming the previous one; the last rerun finishes and equals an uninterrupted run bit for bit."""
    reference = L.run(tmp_path / "uninterrupted")
    d = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tests.influence._tiny_lm", str(d), "0.15"]

    def partial(phase):
        return lambda: any((d / "partial").glob(f"{phase}.rank0-of-1.safetensors"))

    for ready in (partial("covariances"), partial("eigenvalue_corrections"),
                  lambda: any((d / "scores").glob("chunk-*.safetensors"))):
        _kill.kill_when(argv, ready, env=env, timeout=120, cwd=ROOT)
    assert (d / "eigenvalue_corrections.safetensors").is_file() and not (d / "scores.safetensors").exists()
    before = _hashes(d)
    an = L.analyzer()
    calls = _counting(an)
    st = L.store(d)
    resumed = an.fit(L.train_set(), store=st).scores(L.train_set(), L.query_set(), store=st)
    assert torch.equal(resumed, reference)
    n_batches = -(-L.N_TRAIN // L.BATCH)
    # factors were read, not refitted; only the missing chunks were scored (queries: one batch)
    assert 1 + 1 <= len(calls) < 1 + n_batches
    assert all(before[k] == v for k, v in _hashes(d).items() if k in before and "covariances" in k)


@pytest.mark.parametrize("stop", [3, 9, 15], ids=["covariances", "ekfac-eigenvalues", "scores"])
def test_an_interrupted_run_continues_where_it_stopped(tmp_path, stop):
    """In process: a run stopped at its ``stop``-th forward (6 covariance batches, 6 EK-FAC batches, 1 query
    batch, 6 scored batches) is continued by the next from its partial sums or its chunks, bit-identically."""
    reference = L.run(tmp_path / "uninterrupted")
    st = L.store(tmp_path / "s")
    an = L.analyzer()
    interrupt_at(an, stop)
    with pytest.raises(KeyboardInterrupt):
        an.fit(L.train_set(), store=st).scores(L.train_set(), L.query_set(), store=st)
    again = L.analyzer()
    calls = _counting(again)
    resumed = again.fit(L.train_set(), store=st).scores(L.train_set(), L.query_set(), store=st)
    assert torch.equal(resumed, reference)
    full = 6 + 6 + 1 + 6
    assert len(calls) == full - stop + (1 if stop > 12 else 0)  # the query pass is redone, nothing else


def test_a_store_for_another_model_data_or_options_is_refused(tmp_path):
    train, queries = L.train_set(), L.query_set()
    d = tmp_path / "s"
    L.run(d)
    before = _hashes(d)
    other_model = L.TinyLM(seed=1)
    cases = [
        (lambda: L.analyzer(other_model).fit(train, store=d), "another model"),
        (lambda: L.analyzer().fit(L.data(L.N_TRAIN, 9), store=d), "other training data"),
        (lambda: L.analyzer().fit(train[:-1], store=d), "other training data"),
        (lambda: L.analyzer(solver="kfac").fit(train, store=d), "method"),
        (lambda: L.analyzer().fit(train).scores(train, L.data(3, 9), store=d), "other queries"),
        (lambda: L.analyzer().fit(train).scores(train, queries, per_token=True, store=d), "per_token"),
    ]
    for call, needle in cases:
        with pytest.raises(StoreMismatchError, match=needle) as e:
            call()
        assert "another store" in str(e.value)
    assert _hashes(d) == before, "a refused store is left as it was"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        L.analyzer().fit(train, store=tmp_path / "other")
    # clearing starts over
    InfluenceStore(d).clear()
    assert not (d / "store.json").exists()
    L.analyzer(solver="kfac").fit(train, store=d)
    assert json.loads((d / "store.json").read_text())["factors"]["method"] == "kfac"


def test_fingerprints_see_weights_batches_and_order():
    m = L.TinyLM()
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(L.TinyLM())
    with torch.no_grad():
        m.mix.weight[0, 0] += 1e-6
    assert model_fingerprint(m) != fp
    from torch.utils.data import DataLoader

    tr = L.train_set()
    digest, n, k = data_fingerprint(DataLoader(tr, batch_size=4))
    assert (n, k) == (L.N_TRAIN, 6)
    assert data_fingerprint(DataLoader(tr[::-1], batch_size=4))[0] != digest
    assert data_fingerprint(DataLoader(tr, batch_size=5))[0] != digest  # batches seed the pseudo-labels


def test_bad_store_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="chunk_batches"):
        InfluenceStore(tmp_path, chunk_batches=0)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        InfluenceStore(tmp_path, checkpoint_seconds=float("nan"))
    with pytest.raises(TypeError, match="store must be"):
        L.analyzer().fit(L.train_set(), store=3)
    an = InfluenceAnalyzer(L.TinyLM(), L.lm_loss(), solver="identity", batch_size=4)  # per-example route
    with pytest.raises(ValueError, match="factored route"):
        an.fit(L.train_set(), store=tmp_path / "s")
    assert not (tmp_path / "s").exists()
