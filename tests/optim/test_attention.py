"""soulkit.optim.attention: differentiable_attention puts attention on a twice-differentiable path
(torch SDPA's math backend; transformers models on other kernels switched to eager and back), and
notice_once says so once. The tiny models and losses are those of test_curvature.py."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from soulkit.optim import attention
from soulkit.optim.attention import differentiable_attention, notice_once
from soulkit.optim.curvature import hvp

from .test_curvature import lm_loss_fn, rand_like_dict, tiny_llama


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    # one-time notices are process-wide; give every test a clean slate
    monkeypatch.setattr(attention, "_NOTICES_GIVEN", set())


def _attention_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    return q.requires_grad_(), k, v


def _hessian_vector_of_attention(attend, q, k, v, direction):
    g, = torch.autograd.grad((attend(q, k, v) ** 2).sum(), q, create_graph=True)
    hv, = torch.autograd.grad((g * direction).sum(), q)
    return hv


def _eager_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_fused_sdpa_really_lacks_second_derivatives_on_this_torch():
    """Documents why curvature pins SDPA to the math backend; skipped if a future torch adds it."""
    model = tiny_llama()
    params = {k: p.detach().requires_grad_() for k, p in model.named_parameters()}
    loss = lm_loss_fn(model)(params)
    g = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    try:
        torch.autograd.grad(
            [x for x in g if x is not None and x.requires_grad][0].sum(), list(params.values())
        )
    except RuntimeError as err:
        assert "not implemented" in str(err)
    else:
        pytest.skip("this torch has a double backward for the default CPU SDPA kernel")


def test_sdpa_inside_the_context_has_the_second_derivative_of_eager_attention():
    q, k, v = _attention_inputs()
    direction = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    want = _hessian_vector_of_attention(_eager_attention, q, k, v, direction)
    with differentiable_attention():
        got = _hessian_vector_of_attention(_sdpa, q, k, v, direction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 1e-3  # a real second derivative, not zeros on both sides


def test_differentiable_attention_switches_non_differentiable_implementation_and_restores():
    model = tiny_llama(attn="eager")
    # pretend the model was loaded with flash attention (not installable here); the context must switch it
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.warns(UserWarning, match="soulkit: curvature uses the math attention path"):
        with differentiable_attention(model):
            assert model.config._attn_implementation == "eager"
            assert model.model.config._attn_implementation == "eager"
            params = {k: p for k, p in list(model.named_parameters())[:3]}
            out = hvp(lm_loss_fn(model), params, rand_like_dict(params, 0))
            assert all(torch.isfinite(t).all() for t in out.values())
    assert model.config._attn_implementation == "flash_attention_2"
    # restored on error too, and warned only once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError):
            with differentiable_attention(model):
                assert model.config._attn_implementation == "eager"
                raise KeyError("boom")
    assert model.config._attn_implementation == "flash_attention_2"


def test_differentiable_attention_leaves_sdpa_and_plain_modules_alone():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with differentiable_attention(model):
            assert model.config._attn_implementation == "sdpa"
        with differentiable_attention(nn.Linear(2, 2)):
            pass
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="model"):
        with differentiable_attention("llama"):
            pass


def test_notice_once_warns_or_logs_once_per_key(caplog):
    with pytest.warns(UserWarning, match="first"):
        notice_once("a", "first", warn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        notice_once("a", "again", warn=True)  # same key: silent
    with caplog.at_level(logging.INFO, logger="soulkit"):
        notice_once("b", "logged", warn=False)
        notice_once("b", "logged", warn=False)
    assert [r.getMessage() for r in caplog.records if r.name == "soulkit"] == ["logged"]
    assert attention._NOTICES_GIVEN == {"a", "b"}
