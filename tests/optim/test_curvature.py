"""Curvature primitives: HVP/GNVP against explicit Hessians and Jacobians, diagonal estimators against
the exact diagonal, on tiny transformers models too, and bad input (attention switching: test_attention.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian

from soulkit.optim import attention, estimators
from soulkit.optim import curvature as C
from soulkit.optim.curvature import (
    differentiable_attention,
    exact_hessian_diag,
    gnb_diag,
    gnvp,
    hutchinson_diag,
    hvp,
    module_loss_fn,
)

MODES = ["double_backward", "forward_over_reverse", "auto"]
DT = torch.float64


# --------------------------------------------------------------------------- helpers


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def unflat(vec, like):
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def explicit_hessian(loss_fn, params):
    """Dense Hessian of loss_fn over the flattened params (reference, small sizes only)."""
    with differentiable_attention():
        return hessian(lambda x: loss_fn(unflat(x, params)), flat(params).detach())


def rand_like_dict(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}


@pytest.fixture(autouse=True)
def _fresh_notices_one_thread(monkeypatch):
    # one-time notices are process-wide; give every test a clean slate
    monkeypatch.setattr(attention, "_NOTICES_GIVEN", set())
    # these problems are tiny: intra-op threads only add synchronisation, which on a busy machine
    # costs up to 30x (measured: 1 ms vs 30 ms per gnb_diag call with other jobs running)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randn(6, 2, dtype=DT)
    # written out rather than F.mse_loss: torch 2.13's mse_loss fails under forward-over-reverse
    # ("ZeroTensors are immutable"), see test_forward_over_reverse_mse_loss_torch_bug
    loss_fn = module_loss_fn(model, lambda call: ((call(x) - y) ** 2).mean())
    return model, loss_fn, dict(model.named_parameters())


def tiny_llama(seed=0, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).to(DT).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=50,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg).to(DT).eval()


IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))


def next_token_ce(logits):
    # our own float64 loss: transformers' built-in loss upcasts logits to float32
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def lm_loss_fn(model):
    return module_loss_fn(model, lambda call: next_token_ce(call(IDS).logits))


def assert_rel_close(got, want, rel):
    err = torch.linalg.vector_norm(flat(got) - flat(want))
    assert err <= rel * torch.linalg.vector_norm(flat(want)), (err, torch.linalg.vector_norm(flat(want)))


# LlamaRMSNorm normalises in float32 even in a float64 model, so Llama results agree to ~1e-7 only
REL = {"tiny_llama": 1e-6, "tiny_gpt2": 1e-10}


# --------------------------------------------------------------------------- hvp


@pytest.mark.parametrize("mode", MODES)
def test_hvp_matches_explicit_hessian_mlp(mode):
    model, loss_fn, params = mlp_problem()
    v = rand_like_dict(params, 3)
    H = explicit_hessian(loss_fn, params)
    ref = unflat(H @ flat(v), params)
    out = hvp(loss_fn, params, v, mode=mode)
    assert list(out) == list(params)
    for k in params:
        assert out[k].shape == params[k].shape and out[k].dtype == DT
        torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12)


def test_hvp_does_not_touch_params_or_grads():
    model, loss_fn, params = mlp_problem()
    before = {k: p.detach().clone() for k, p in params.items()}
    for mode in MODES:
        hvp(loss_fn, params, rand_like_dict(params, 0), mode=mode)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k])
        assert p.grad is None


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_hvp_tiny_transformers_subset_matches_explicit_hessian(builder, mode):
    model = builder()
    assert model.config._attn_implementation == "sdpa"
    names = {
        "tiny_llama": ["model.layers.0.input_layernorm.weight", "model.norm.weight"],
        "tiny_gpt2": ["transformer.h.0.ln_1.weight", "transformer.ln_f.bias"],
    }[builder.__name__]
    all_params = dict(model.named_parameters())
    # the first name sits before the attention block: its curvature goes through SDPA
    params = {k: all_params[k] for k in names}
    loss_fn = lm_loss_fn(model)
    v = rand_like_dict(params, 7)
    ref = unflat(explicit_hessian(loss_fn, params) @ flat(v), params)
    out = hvp(loss_fn, params, v, mode=mode)
    assert_rel_close(out, ref, REL[builder.__name__])
    assert all(out[k].abs().max() > 1e-6 for k in params)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_hvp_tiny_transformers_all_params_modes_agree_and_match_finite_differences(builder):
    model = builder()
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss_fn = lm_loss_fn(model)
    v = rand_like_dict(params, 11)
    a = hvp(loss_fn, params, v, mode="double_backward")
    b = hvp(loss_fn, params, v, mode="forward_over_reverse")
    assert_rel_close(a, b, REL[builder.__name__])
    # central differences of the gradient: H v = (g(p + e v) - g(p - e v)) / 2e + O(e^2) (measured
    # relative error ~7e-7 for GPT-2 at e=1e-5); Llama's float32 normalisation adds rounding ~1e-7 / e,
    # so it takes e=1e-4 (measured ~8e-5)
    eps, rel = {"tiny_llama": (1e-4, 5e-4), "tiny_gpt2": (1e-5, 1e-5)}[builder.__name__]

    def grad_at(shift):
        leaves = {k: (p + shift * v[k]).requires_grad_() for k, p in params.items()}
        with differentiable_attention():
            gs = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params.values())]

    fd = [(gp - gm) / (2 * eps) for gp, gm in zip(grad_at(eps), grad_at(-eps))]
    got = flat(a)
    want = torch.cat([t.reshape(-1) for t in fd])
    assert torch.linalg.vector_norm(got - want) <= rel * torch.linalg.vector_norm(want)


def test_module_loss_fn_holds_missing_params_fixed():
    model, loss_fn, params = mlp_problem()
    sub = {"2.bias": params["2.bias"]}
    v = {"2.bias": torch.ones(2, dtype=DT)}
    # loss = mean((W h + b - y)^2) over 6x2 entries: d2/db2 = 2 * 6 / 12 * I
    torch.testing.assert_close(hvp(loss_fn, sub, v)["2.bias"], torch.ones(2, dtype=DT))


# --------------------------------------------------------------------------- auto mode / fallback


def test_auto_falls_back_to_forward_over_reverse_when_double_backward_missing(monkeypatch):
    model, loss_fn, params = mlp_problem()
    v = rand_like_dict(params, 2)
    want = hvp(loss_fn, params, v, mode="forward_over_reverse")

    def boom(self, v, retain_graph=True):
        raise RuntimeError("derivative for aten::fake_op_backward is not implemented")

    monkeypatch.setattr(C._GradGraph, "hvp", boom)
    with pytest.warns(UserWarning, match="falling back to forward_over_reverse"):
        got = hvp(loss_fn, params, v, mode="auto")
    for k in params:
        torch.testing.assert_close(got[k], want[k])
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        hvp(loss_fn, params, v, mode="auto")
    # an explicit mode never falls back, and the error says what to do
    with pytest.raises(RuntimeError, match="differentiable_attention"):
        hvp(loss_fn, params, v, mode="double_backward")


def test_auto_falls_back_to_double_backward_when_forward_ad_missing(monkeypatch):
    model, loss_fn, params = mlp_problem()
    v = rand_like_dict(params, 2)
    want = hvp(loss_fn, params, v, mode="double_backward")
    monkeypatch.setattr(C, "_AUTO_MODE", "forward_over_reverse")

    def boom(*a, **k):
        raise NotImplementedError("Trying to use forward AD with fake_op that does not support it")

    monkeypatch.setattr(C, "_hvp_fwd_over_rev", boom)
    with pytest.warns(UserWarning, match="falling back to double_backward"):
        got = hvp(loss_fn, params, v)
    for k in params:
        torch.testing.assert_close(got[k], want[k])


def test_forward_over_reverse_mse_loss_torch_bug():
    """F.mse_loss breaks forward-over-reverse on this torch: explicit mode explains, auto is unaffected."""
    x = torch.randn(5, 2, dtype=DT)
    params = {"w": torch.randn(2, dtype=DT)}
    v = {"w": torch.ones(2, dtype=DT)}

    def loss_fn(p):
        return F.mse_loss(x @ p["w"], torch.zeros(5, dtype=DT))

    want = 2 * x.T @ x @ v["w"] / 5
    torch.testing.assert_close(hvp(loss_fn, params, v)["w"], want)
    try:
        got = hvp(loss_fn, params, v, mode="forward_over_reverse")
    except RuntimeError as err:
        assert "double_backward" in str(err)  # the error points at the other mode
    else:
        torch.testing.assert_close(got["w"], want)


def test_errors_that_are_not_missing_derivatives_propagate():
    params = {"x": torch.ones(2, dtype=DT)}

    def loss_fn(p):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        hvp(loss_fn, params, {"x": torch.ones(2, dtype=DT)})


def test_gradient_without_graph_warns():
    class Cube(torch.autograd.Function):  # backward not differentiable: double backward sees a constant
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    params = {"x": torch.tensor([1.0, 2.0], dtype=DT)}
    with pytest.warns(UserWarning, match="does not depend on the parameters"):
        hvp(
            lambda p: Cube.apply(p["x"]).sum(), params, {"x": torch.ones(2, dtype=DT)}, mode="double_backward"
        )


# --------------------------------------------------------------------------- gnvp


@pytest.mark.parametrize("mode", MODES)
def test_gnvp_equals_hvp_for_linear_model_with_mse(mode):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    params = dict(model.named_parameters())
    out_fn = module_loss_fn(model, lambda call: call(x))

    def loss_on_output(out):
        return ((out - y) ** 2).mean()

    v = rand_like_dict(params, 5)
    g = gnvp(out_fn, loss_on_output, params, v, mode=mode)
    h = hvp(lambda p: loss_on_output(out_fn(p)), params, v, mode=mode)
    for k in params:
        torch.testing.assert_close(g[k], h[k], rtol=1e-10, atol=1e-12)


def ce_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 4, (6,))
    return model, module_loss_fn(model, lambda call: call(x)), (lambda out: F.cross_entropy(out, y))


@pytest.mark.parametrize("mode", MODES)
def test_gnvp_cross_entropy_matches_explicit_jt_hl_j_and_is_psd(mode):
    model, out_fn, loss_on_output = ce_problem()
    params = {k: p.detach() for k, p in model.named_parameters()}
    p0 = flat(params)
    J = jacobian(lambda z: out_fn(unflat(z, params)).reshape(-1), p0)  # [outputs, params]
    out0 = out_fn(params).detach()
    HL = hessian(lambda o: loss_on_output(o.reshape(out0.shape)), out0.reshape(-1))
    G = J.T @ HL @ J
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # reference itself PSD
    H = explicit_hessian(lambda p: loss_on_output(out_fn(p)), params)
    assert (H - G).abs().max() > 1e-3  # the test is not vacuous: the MLP's Hessian is not G
    for seed in range(5):
        v = rand_like_dict(params, 100 + seed)
        got = gnvp(out_fn, loss_on_output, params, v, mode=mode)
        torch.testing.assert_close(flat(got), G @ flat(v), rtol=1e-10, atol=1e-12)
        assert torch.dot(flat(v), flat(got)) >= -1e-12


def test_gnvp_tiny_llama_modes_agree_and_psd():
    model = tiny_llama()
    params = {k: p.detach() for k, p in model.named_parameters()}
    out_fn = module_loss_fn(model, lambda call: call(IDS).logits)

    for seed in range(2):
        v = rand_like_dict(params, seed)
        a = gnvp(out_fn, next_token_ce, params, v, mode="double_backward")
        b = gnvp(out_fn, next_token_ce, params, v, mode="forward_over_reverse")
        assert_rel_close(a, b, REL["tiny_llama"])
        assert torch.dot(flat(v), flat(a)) > 0


# --------------------------------------------------------------------------- exact diagonal


def test_exact_hessian_diag_matches_dense_hessian_and_refuses_large():
    model, loss_fn, params = mlp_problem()
    H = explicit_hessian(loss_fn, params)
    d = exact_hessian_diag(loss_fn, params)
    torch.testing.assert_close(flat(d), torch.diagonal(H), rtol=1e-10, atol=1e-12)
    assert d["0.weight"].shape == params["0.weight"].shape
    with pytest.raises(ValueError, match="max_elements"):
        exact_hessian_diag(loss_fn, params, max_elements=10)


def test_exact_hessian_diag_tiny_llama_subset():
    model = tiny_llama()
    all_params = dict(model.named_parameters())
    params = {k: all_params[k] for k in ["model.layers.0.input_layernorm.weight", "model.norm.weight"]}
    loss_fn = lm_loss_fn(model)
    d = exact_hessian_diag(loss_fn, params)
    want = torch.diagonal(explicit_hessian(loss_fn, params))
    assert torch.linalg.vector_norm(flat(d) - want) <= 1e-6 * torch.linalg.vector_norm(want)


# --------------------------------------------------------------------------- hutchinson


def test_hutchinson_single_probe_signs_through_public_api():
    # loss = x0 * x1: H = [[0, 1], [1, 0]], one probe gives u0*u1 * [1, 1], +1 or -1 equally often
    params = {"x": torch.tensor([0.3, -0.2], dtype=DT)}
    g = torch.Generator().manual_seed(0)
    vals = [
        hutchinson_diag(lambda p: p["x"][0] * p["x"][1], params, generator=g)["x"][0].item()
        for _ in range(200)
    ]
    assert set(vals) == {-1.0, 1.0}
    assert abs(sum(vals) / len(vals)) < 4 / math.sqrt(len(vals))


def test_hutchinson_converges_to_exact_diag():
    # one parameter tensor (fewer ops per probe than the MLP) with a dense, indefinite Hessian
    X = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    params = {"w": torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=DT)}

    def loss_fn(p):
        z = X @ p["w"]
        return torch.logsumexp(z, 0) + torch.sin(z).sum()

    exact = flat(exact_hessian_diag(loss_fn, params))
    H = explicit_hessian(loss_fn, params)
    offdiag_var = (H**2).sum(1) - torch.diagonal(H) ** 2  # variance of one probe, per coordinate
    assert (offdiag_var > 1e-2).all()  # not vacuous: a single probe is noisy
    errs = {}
    for n in (16, 4096):
        est = flat(hutchinson_diag(loss_fn, params, n_samples=n, generator=torch.Generator().manual_seed(n)))
        err = (est - exact).abs()
        assert (err <= 5 * torch.sqrt(offdiag_var / n) + 1e-12).all(), n
        errs[n] = err.mean().item()
    assert errs[4096] < errs[16] / 4


def test_hutchinson_deterministic_and_modes_agree():
    model, loss_fn, params = mlp_problem()
    runs = [
        hutchinson_diag(loss_fn, params, n_samples=5, generator=torch.Generator().manual_seed(3), mode=m)
        for m in ("double_backward", "double_backward", "forward_over_reverse")
    ]
    for k in params:
        assert torch.equal(runs[0][k], runs[1][k])
        torch.testing.assert_close(runs[0][k], runs[2][k], rtol=1e-10, atol=1e-12)
    other = hutchinson_diag(loss_fn, params, n_samples=5, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(flat(other), flat(runs[0]))


def test_hutchinson_tiny_gpt2_runs_on_sdpa_model():
    model = tiny_gpt2()
    params = {k: p for k, p in model.named_parameters() if k.startswith("transformer.h.0.attn")}
    est = hutchinson_diag(lm_loss_fn(model), params, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert set(est) == set(params) and all(torch.isfinite(t).all() for t in est.values())


def test_hutchinson_generator_device_must_match():
    params = {"x": torch.empty(3, device="meta")}
    with pytest.raises(ValueError, match="generator"):
        hutchinson_diag(lambda p: p["x"].sum(), params, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        hutchinson_diag(lambda p: p["x"].sum(), {"x": torch.ones(2)}, generator=0)


# --------------------------------------------------------------------------- GNB


def softmax_regression(seed=0, n=8, d=3, c=4):
    torch.manual_seed(seed)
    model = nn.Linear(d, c).to(DT)
    x = torch.randn(n, d, dtype=DT)
    return model, x


def test_gnb_mean_equals_gauss_newton_diagonal():
    model, x = softmax_regression()
    params = dict(model.named_parameters())
    logits = model(x)
    B = x.shape[0]
    # explicit GN diagonal of the mean loss: J^T (diag(p) - p p^T) J / B, summed over examples
    p0 = flat({k: t.detach() for k, t in params.items()})
    J = jacobian(lambda z: torch.func.functional_call(model, unflat(z, params), (x,)), p0)  # [B, C, P]
    probs = torch.softmax(logits.detach(), -1)
    G = sum(J[n].T @ (torch.diag(probs[n]) - torch.outer(probs[n], probs[n])) @ J[n] for n in range(B)) / B
    want = torch.diagonal(G)

    M = 2000
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([flat(gnb_diag(logits, params, generator=g)) for _ in range(M)])
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(M)
    assert (se > 0).all()
    assert ((mean - want).abs() <= 5 * se + 1e-6).all(), ((mean - want).abs() / se).max()
    # and the estimate is not trivially close: one sample is far from the mean
    assert (samples[0] - want).abs().max() > 10 * se.max()


def test_gnb_is_B_times_squared_grad_of_mean_and_handles_sequences_masks_unused():
    model, x = softmax_regression()
    extra = nn.Parameter(torch.ones(2, dtype=DT))
    logits = model(x).reshape(2, 4, 4)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    seq = [model.weight, extra, model.bias]
    est = gnb_diag(logits, seq, mask=mask, generator=torch.Generator().manual_seed(5))
    assert isinstance(est, list) and len(est) == 3
    assert torch.equal(est[1], torch.zeros(2, dtype=DT))
    loss_sum, B = estimators.sampled_label_loss(logits, mask=mask, generator=torch.Generator().manual_seed(5))
    assert B == 6
    gw, gb = torch.autograd.grad(loss_sum / B, [model.weight, model.bias], retain_graph=True)
    torch.testing.assert_close(est[0], B * gw**2)
    torch.testing.assert_close(est[2], B * gb**2)
    # labels with ignore_index select the same positions
    labels = torch.where(
        mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100, dtype=torch.long)
    )
    by_labels = gnb_diag(logits, seq, labels=labels, generator=torch.Generator().manual_seed(5))
    for a, b in zip(est, by_labels):
        assert torch.equal(a, b)
    # retain_graph=False frees the graph: a second backward through it fails
    gnb_diag(logits, dict(model.named_parameters()), retain_graph=False)
    with pytest.raises(RuntimeError):
        logits.sum().backward()


def test_gnb_bad_input():
    model, x = softmax_regression()
    logits = model(x)
    with pytest.raises(ValueError, match="logits"):
        gnb_diag(logits.detach(), list(model.parameters()))
    with pytest.raises(ValueError, match=r"params\[1\]"):
        gnb_diag(logits, [model.weight, torch.ones(2, dtype=DT)])
    with pytest.raises(TypeError, match="params"):
        gnb_diag(logits, model.weight)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    model, loss_fn, params = mlp_problem()
    v = rand_like_dict(params, 0)
    k0 = next(iter(params))

    with pytest.raises(ValueError, match="mode"):
        hvp(loss_fn, params, v, mode="newton")
    with pytest.raises(ValueError, match="mode"):
        gnvp(loss_fn, lambda o: o, params, v, mode="fast")
    with pytest.raises(ValueError, match=r"v must have the same keys.*missing from v: \['0.weight'\]"):
        hvp(loss_fn, params, {k: t for k, t in v.items() if k != "0.weight"})
    with pytest.raises(ValueError, match=r"not in params: \['extra'\]"):
        hvp(loss_fn, params, {**v, "extra": torch.ones(1, dtype=DT)})
    with pytest.raises(ValueError, match=rf"v\['{k0}'\] has shape"):
        hvp(loss_fn, params, {**v, k0: torch.ones(3, dtype=DT)})
    with pytest.raises(TypeError, match=rf"v\['{k0}'\] has dtype"):
        hvp(loss_fn, params, {**v, k0: v[k0].float()})
    with pytest.raises(TypeError, match=rf"v\['{k0}'\] is complex"):
        hvp(loss_fn, params, {**v, k0: v[k0].to(torch.complex128)})
    with pytest.raises(TypeError, match=rf"params\['{k0}'\] is complex"):
        hvp(loss_fn, {**params, k0: params[k0].detach().to(torch.complex128)}, v)
    with pytest.raises(TypeError, match=r"params\['i'\] must be floating point"):
        hvp(
            lambda p: p["i"].sum(),
            {"i": torch.ones(2, dtype=torch.long)},
            {"i": torch.ones(2, dtype=torch.long)},
        )
    with pytest.raises(ValueError, match=r"v contains NaN or Inf"):
        hvp(loss_fn, params, {**v, k0: torch.full_like(v[k0], float("nan"))})
    with pytest.raises(TypeError, match="params must be a dict"):
        hvp(loss_fn, list(params.values()), v)
    with pytest.raises(ValueError, match="params is empty"):
        hutchinson_diag(loss_fn, {})
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hvp(None, params, v)

    def vec_loss(p):
        return loss_fn(p) * torch.ones(3, dtype=DT)

    for mode in ("double_backward", "forward_over_reverse"):
        with pytest.raises(ValueError, match="loss_fn must return a scalar"):
            hvp(vec_loss, params, v, mode=mode)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        hutchinson_diag(vec_loss, params)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        exact_hessian_diag(vec_loss, params)
    with pytest.raises(TypeError, match="loss_fn must return a scalar torch.Tensor"):
        hvp(lambda p: 1.0, params, v)
    with pytest.raises(ValueError, match="loss_on_output must return a scalar"):
        gnvp(module_loss_fn(model, lambda call: call(torch.ones(2, 3, dtype=DT))), lambda o: o, params, v)
    with pytest.raises(TypeError, match="output_fn must return a torch.Tensor"):
        gnvp(lambda p: (p[k0],), lambda o: o.sum(), params, v)
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_diag(loss_fn, params, n_samples=0)
    with pytest.raises(ValueError, match="max_elements"):
        exact_hessian_diag(loss_fn, params, max_elements=0)
    with pytest.raises(TypeError, match="model must be"):
        module_loss_fn(lambda x: x, lambda call: call())
