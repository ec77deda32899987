"""The factored route (K-FAC / EK-FAC / gradient dot products from module hooks) on transformers LMs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from soulkit.influence import InfluenceAnalyzer, OutputLoss
from soulkit.influence.factored import FactoredInfluence, _categorical_weights
from soulkit.influence.modules import ModuleCapture, tracked_modules

transformers = pytest.importorskip("transformers")

VOCAB = 40


def _gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=True, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits[:, :-1]


def _seq_loss(z, b):
    labels = b["labels"][:, 1:]
    return F.cross_entropy(z.transpose(1, 2), labels, reduction="none", ignore_index=-100).sum(1)


LM_LOSS = OutputLoss(_logits, _seq_loss)


def _data(n, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _tracked_grads(model, names, example):
    """The gradient of one example's loss w.r.t. the tracked modules, as [out, in+1] matrices (autograd)."""
    model.zero_grad(set_to_none=True)
    batch = {k: v.unsqueeze(0) for k, v in example.items()}
    LM_LOSS(model, batch).sum().backward()
    mods = {t.name: t for t in tracked_modules(model, names)}
    return torch.cat([mods[n].gradient_matrix().flatten() for n in names])


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear-sdpa-tied"])
def test_identity_scores_are_gradient_dot_products_over_the_tracked_modules(build):
    model = build()
    train, queries = _data(6), _data(3, seed=2)
    an = InfluenceAnalyzer(model, LM_LOSS, solver="identity", modules=None, batch_size=4)
    fi = FactoredInfluence(model, LM_LOSS, method="identity", batch_size=4, progress=False).fit(train)
    names = [t.name for t in fi.tracked]
    assert not any("lm_head" in n or "wte" in n or "embed" in n for n in names)
    s = fi.scores(train, queries)
    gt = torch.stack([_tracked_grads(model, names, e) for e in train])
    gq = torch.stack([_tracked_grads(model, names, e) for e in queries])
    torch.testing.assert_close(s, gq @ gt.T / len(train), rtol=1e-4, atol=1e-5)
    assert an.factored is None  # solver='identity' without modules stays on the per-example route


def test_scoring_leaves_the_models_grads_and_weights_alone():
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fi = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=4, progress=False).fit(_data(6))
    fi.scores(_data(6), _data(2, seed=3))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["identity", "kfac", "ekfac"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_per_token_scores_sum_to_sequence_scores(method, build):
    model = build()
    train, queries = _data(6), _data(3, seed=2)
    fi = FactoredInfluence(model, LM_LOSS, method=method, l2=1e-2, batch_size=4, progress=False).fit(train)
    s = fi.scores(train, queries)
    st = fi.scores(train, queries, per_token=True)
    assert st.shape == (3, 6, 8)
    torch.testing.assert_close(st.sum(-1), s, rtol=1e-4, atol=1e-5 * s.abs().max().item())
    assert torch.all(torch.isfinite(s)) and s.abs().max() > 0


def test_padded_batches_give_the_unpadded_scores_and_zero_on_padding():
    model = _llama()
    g = torch.Generator().manual_seed(5)
    lengths = [8, 5, 6, 3, 7, 8]
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]

    def padded(s):
        ids = torch.zeros(8, dtype=torch.long)
        ids[: len(s)] = s
        mask = (torch.arange(8) < len(s)).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    train_pad = [padded(s) for s in seqs]
    queries = [padded(s) for s in _seq_list(3, g)]
    # the empirical Fisher draws no labels, so both fits see exactly the same output gradients
    kw = dict(method="ekfac", l2=1e-2, fisher="empirical", progress=False)
    a = FactoredInfluence(model, LM_LOSS, batch_size=3, **kw).fit(train_pad)
    one = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s} for s in seqs]
    b = FactoredInfluence(model, LM_LOSS, batch_size=1, **kw).fit(one)
    for name in a.factors.modules:
        fa, fb = a.factors.modules[name], b.factors.modules[name]
        torch.testing.assert_close(fa.eigenvalues("kfac"), fb.eigenvalues("kfac"), rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(fa.corrected, fb.corrected, rtol=1e-3, atol=1e-7)
    sa = a.scores(train_pad, queries, per_token=True)
    sb = b.scores(one, queries)  # batch_size 1: every training sequence unpadded
    torch.testing.assert_close(sa.sum(-1), sb, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(a.scores(train_pad, queries), sb, rtol=1e-3, atol=1e-6)
    for j, n in enumerate(lengths):
        assert torch.all(sa[:, j, n:] == 0), "padding positions carry a score"


def _seq_list(k, g):
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(k)]


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x)


def _regression(n=24):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, dtype=torch.float64, generator=g)
    y = torch.randn(n, 2, dtype=torch.float64, generator=g)
    return TensorDataset(X, y)


SQ_LOSS = OutputLoss(lambda m, b: m(b[0]), lambda z, b: 0.5 * ((z - b[1]) ** 2).sum(-1))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_equals_the_exact_gauss_newton_for_one_linear_layer(method):
    # squared error: the output Hessian is I, so F = A (x) I exactly and K-FAC / EK-FAC are exact up to
    # the Monte Carlo error of the sampled S (3000 draws per example)
    model, data = _Linear(), _regression()
    queries = TensorDataset(*(t[:5] + 0.3 for t in data.tensors))
    exact = InfluenceAnalyzer(model, SQ_LOSS, solver="exact", curvature="gauss_newton", l2=0.1).fit(data)
    want = exact.scores(data, queries)
    fi = FactoredInfluence(model, SQ_LOSS, method=method, l2=0.1, likelihood="gaussian", fisher_samples=3000,
                           batch_size=24, progress=False).fit(data)
    got = fi.scores(data, queries)
    assert torch.corrcoef(torch.stack([got.flatten().double(), want.flatten()]))[0, 1] > 0.999
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0.03 * want.abs().max().item())


def test_empirical_fisher_is_not_the_gauss_newton():
    model, data = _Linear(), _regression()
    queries = TensorDataset(*(t[:5] + 0.3 for t in data.tensors))
    want = InfluenceAnalyzer(model, SQ_LOSS, solver="exact", curvature="gauss_newton", l2=0.1).fit(data).scores(
        data, queries)
    emp = FactoredInfluence(model, SQ_LOSS, method="kfac", l2=0.1, fisher="empirical", progress=False,
                            batch_size=24).fit(data).scores(data, queries)
    assert (emp.double() - want).abs().max() > 0.05 * want.abs().max()


def test_categorical_weights_are_recovered_for_sums_means_and_masks():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (3, 5))
    y[0, :2] = -100
    ce = F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100)  # [3, 5]
    loss = ce.sum(1) / torch.tensor([3.0, 5.0, 5.0])
    (r,) = torch.autograd.grad(loss.sum(), z)
    w = _categorical_weights(r.reshape(-1, 7), torch.softmax(z.detach(), -1).reshape(-1, 7)).reshape(3, 5)
    want = torch.tensor([[0, 0, 1 / 3, 1 / 3, 1 / 3], [0.2] * 5, [0.2] * 5])
    torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-6)
    smooth = F.cross_entropy(z.transpose(1, 2), y.clamp_min(0), reduction="none", label_smoothing=0.2).sum()
    (r,) = torch.autograd.grad(smooth, z)
    with pytest.raises(ValueError, match="fisher='empirical'"):
        _categorical_weights(r.reshape(-1, 7), torch.softmax(z.detach(), -1).reshape(-1, 7))


def test_query_rank_at_full_rank_is_exact_and_low_rank_close():
    model = _gpt2()
    train, queries = _data(6), _data(3, seed=2)
    exact = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=6, progress=False).fit(train)
    want = exact.scores(train, queries)
    full = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=6, query_rank=64,
                             progress=False).load_factors(_saved(exact), train)
    torch.testing.assert_close(full.scores(train, queries), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(full.scores(train, queries, per_token=True),
                               exact.scores(train, queries, per_token=True), rtol=1e-3, atol=1e-5)
    errors = []
    for rank in (1, 4, 12):
        low = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=6, query_rank=rank,
                                progress=False).load_factors(_saved(exact), train)
        errors.append((low.scores(train, queries) - want).norm().item())
    assert errors[0] > errors[1] > errors[2] > 0, errors  # a truncated SVD: more rank, less error


def _saved(fi):
    import tempfile

    d = tempfile.mkdtemp()
    fi.save_factors(d)
    return d


def test_factors_round_trip_and_refuse_another_model(tmp_path):
    model = _gpt2()
    train = _data(6)
    fi = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=3, progress=False).fit(train)
    fi.save_factors(tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["factors.json", "factors.safetensors"]
    again = FactoredInfluence(model, LM_LOSS, method="ekfac", l2=1e-2, batch_size=3, progress=False)
    again.load_factors(tmp_path / "f", train)
    q = _data(2, seed=4)
    torch.testing.assert_close(again.scores(train, q), fi.scores(train, q))
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=24,
                                                                 n_layer=2, n_head=2)).eval()
    with pytest.raises(ValueError, match="another model"):
        FactoredInfluence(wider, LM_LOSS, method="ekfac", progress=False).load_factors(tmp_path / "f", train)
    with pytest.raises(ValueError, match="missing"):
        FactoredInfluence(model, LM_LOSS, method="ekfac", modules=["transformer.h.0.mlp.c_fc"],
                          progress=False).load_factors(tmp_path / "f", train)
    with pytest.raises(ValueError, match="fitted on 6 sequences"):
        again.load_factors(tmp_path / "f", _data(5))
    with pytest.raises(FileNotFoundError, match="no saved factors"):
        again.load_factors(tmp_path / "nothing", train)


def test_bf16_model_gets_fp32_factors_and_close_scores():
    model = _llama()
    train, queries = _data(6), _data(2, seed=2)
    ref = FactoredInfluence(model, LM_LOSS, method="kfac", l2=1e-1, batch_size=6, progress=False).fit(train)
    low = FactoredInfluence(_llama().to(torch.bfloat16), LM_LOSS, method="kfac", l2=1e-1, batch_size=6,
                            progress=False).fit(train)
    f = next(iter(low.factors.modules.values()))
    assert f.a_vecs.dtype == torch.float64
    a, b = ref.scores(train, queries), low.scores(train, queries)
    assert b.dtype == torch.float32
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_gradient_checkpointing_gives_the_same_scores():
    model = _llama()
    train, queries = _data(4), _data(2, seed=2)
    want = FactoredInfluence(model, LM_LOSS, method="kfac", l2=1e-1, batch_size=4, progress=False).fit(
        train).scores(train, queries)
    ck = _llama()
    if hasattr(ck, "activation_checkpointing_enable"):  # transformers >= 5.x
        ck.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ck.train()  # transformers checkpoints only in training mode; the model has no dropout
    assert ck.model.layers[0].gradient_checkpointing
    fi = FactoredInfluence(ck, LM_LOSS, method="kfac", l2=1e-1, batch_size=4, progress=False).fit(train)
    torch.testing.assert_close(fi.scores(train, queries), want, rtol=1e-4, atol=1e-6)


def test_capture_ignores_forwards_recomputed_by_checkpointing():
    import torch.utils.checkpoint as ckpt

    from soulkit.influence.modules import TrackedModule

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    net = nn.Sequential(lin, nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    calls = []
    lin.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for checkpointed in (False, True):
        with ModuleCapture([TrackedModule("0", lin, transposed=False, has_bias=True)]) as cap:
            out = ckpt.checkpoint(net, x, use_reentrant=False) if checkpointed else net(x)
        s = cap.output_grads(out, torch.ones_like(out))
        results.append((cap.inputs()["0"], s["0"]))
    assert len(calls) == 3, "the checkpointed pass did not recompute the forward"
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_capture_sees_conv1d_as_a_transposed_linear_map():
    model = _gpt2()
    tm = next(t for t in tracked_modules(model) if t.name.endswith("mlp.c_fc"))
    assert tm.transposed and (tm.out_features, tm.in_features) == (64, 16)
    batch = {k: v.unsqueeze(0) for k, v in _data(1)[0].items()}
    with ModuleCapture([tm]) as cap:
        logits = _logits(model, batch)
    loss = _seq_loss(logits, batch).sum()
    (r,) = torch.autograd.grad(loss, logits, retain_graph=True)
    s = cap.output_grads(logits, r, retain_graph=True)[tm.name]
    G = torch.bmm(s.transpose(1, 2), cap.inputs()[tm.name])[0]
    loss.backward()
    torch.testing.assert_close(G, tm.gradient_matrix(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    model = _gpt2()
    with pytest.raises(ValueError, match="no module named 'transformer.h.9'"):
        FactoredInfluence(model, LM_LOSS, modules=["transformer.h.9"])
    with pytest.raises(ValueError, match="is a Dropout"):
        FactoredInfluence(model, LM_LOSS, modules=["transformer.drop"])
    frozen = _gpt2()
    frozen.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weight"):
        FactoredInfluence(frozen, LM_LOSS, modules=["transformer.h.0.mlp.c_fc"])
    with pytest.raises(TypeError, match="OutputLoss"):
        FactoredInfluence(model, lambda m, b: m(**b).loss)
    mean_over_batch = OutputLoss(_logits, lambda z, b: _seq_loss(z, b).mean())
    with pytest.raises(ValueError, match="one loss per sequence"):
        FactoredInfluence(model, mean_over_batch, progress=False).fit(_data(4))
    with pytest.raises(ValueError, match="16 \\(max_position_embeddings\\)|positions"):
        FactoredInfluence(model, LM_LOSS, progress=False).fit(_data(4, T=20))
    with pytest.raises(ValueError, match="solver='ekfac' computes first-order"):
        InfluenceAnalyzer(model, LM_LOSS, solver="ekfac", loo="newton")
    an = InfluenceAnalyzer(model, LM_LOSS, solver="kfac", l2=0.1, batch_size=4, progress=False).fit(_data(4))
    with pytest.raises(RuntimeError, match="per-example solver"):
        an.self_scores(_data(4))
    with pytest.raises(ValueError, match="fitted on 4"):
        an.scores(_data(5), _data(1))


def test_nonfinite_activations_are_refused():
    model = _gpt2()
    with torch.no_grad():
        model.transformer.h[0].ln_2.weight[0] = float("nan")
    with pytest.raises((FloatingPointError, ValueError), match="NaN"):
        FactoredInfluence(model, LM_LOSS, method="kfac", progress=False).fit(_data(4))


def test_default_damping_is_relative_to_each_modules_curvature():
    model = _gpt2()
    fi = FactoredInfluence(model, LM_LOSS, method="kfac", batch_size=4, progress=False).fit(_data(4))
    f = next(iter(fi.factors.modules.values()))
    assert fi._damping(f) == pytest.approx(0.1 * float(f.eigenvalues("kfac").mean()))
    assert math.isfinite(fi.scores(_data(4), _data(1)).abs().max().item())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_categorical_fisher_tracks_the_exact_gauss_newton_on_softmax_regression(method):
    sklearn = pytest.importorskip("sklearn.datasets")
    X, y = sklearn.load_iris(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + 0.025 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    data, queries = TensorDataset(X, y), TensorDataset(X[::10], y[::10])
    loss = OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))
    exact = InfluenceAnalyzer(model, loss, solver="exact", curvature="gauss_newton", l2=0.05).fit(data)
    want = exact.scores(data, queries)
    got = InfluenceAnalyzer(model, loss, solver=method, l2=0.05, batch_size=50, progress=False).fit(data).scores(
        data, queries)
    r = [torch.corrcoef(torch.stack([got[i].double(), want[i]]))[0, 1].item() for i in range(len(queries))]
    assert min(r) > 0.88, r  # a Kronecker-factored approximation of the Gauss-Newton, not the matrix itself
