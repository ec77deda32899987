"""One-shot Newton unlearning: the step is scale * (n_F/n) * g / (diag(H) + damping), checked by hand on a
float64 copy of a tiny Llama that memorised a few QA pairs; it lowers the forget probability and never
touches its input."""

import copy
import math

import numpy as np
import pytest
import torch

from soulkit.optim.curvature import gnb_diag
from soulkit.unlearn.evaluate import score_answers
from soulkit.unlearn.newton import newton_unlearn
from soulkit.unlearn.qa import QADataset, collate_qa

from ._corpus import FORGET, RETAIN


@pytest.fixture()
def memorised64(memorised):
    return copy.deepcopy(memorised).double()


def _prob(model, tok, records) -> float:
    return float(np.exp(-score_answers(model, tok, records)).mean())


def _delta(new, old) -> dict[str, torch.Tensor]:
    o = dict(old.named_parameters())
    return {n: (p - o[n]).detach() for n, p in new.named_parameters()}


def _batch(records, tok):
    ds = QADataset(records, tok)
    return collate_qa([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)


def test_step_by_hand(memorised64, tiny_tokenizer):
    """The parameter change equals scale * (n_F / n) * g / (h + damping) with g the mean forget gradient of
    the per-example mean NLL and h the GNB diagonal over retain + forget (one batch, same seed)."""
    tok, model = tiny_tokenizer, memorised64
    scale, damping, seed = 0.3, 1e-3, 5
    new, info = newton_unlearn(model, tok, FORGET, retain=RETAIN, damping=damping, scale=scale, seed=seed)

    params = dict(model.named_parameters())
    fb = _batch(FORGET, tok)  # the mean answer NLL by hand, in float64 (a memorised model's gradients cancel)
    logp = torch.log_softmax(model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits[:, :-1], -1)
    targets = fb["labels"][:, 1:]
    valid = targets != -100
    tok_logp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    g = torch.autograd.grad((-tok_logp.sum(1) / valid.sum(1)).mean(), list(params.values()))
    b = _batch(RETAIN + FORGET, tok)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    h = gnb_diag(logits[:, :-1], params, labels=b["labels"][:, 1:], generator=torch.Generator().manual_seed(seed))
    factor = scale * len(FORGET) / (len(FORGET) + len(RETAIN))

    delta = _delta(new, model)
    sq = 0.0
    for (name, hh), gg in zip(h.items(), g, strict=True):
        expected = factor * gg / (hh.clamp_min(0) + damping)
        sq += float(expected.square().sum())
        atol = 1e-6 * float(expected.abs().max()) + 1e-12
        torch.testing.assert_close(delta[name], expected, rtol=1e-4, atol=atol, msg=name)
    assert info["step_norm"] == pytest.approx(math.sqrt(sq), rel=1e-4)
    flat_h = torch.cat([v.flatten() for v in h.values()])
    assert info["h_mean"] == pytest.approx(float(flat_h.mean()), rel=1e-6)
    assert info["h_median"] == pytest.approx(float(flat_h.median()), rel=1e-6)
    assert info["n_forget"] == 4 and info["n_train"] == 8
    assert info["estimator"] == "gnb" and info["damping"] == damping and info["scale"] == scale


def test_linearity(memorised64, tiny_tokenizer):
    tok, model = tiny_tokenizer, memorised64
    one, info1 = newton_unlearn(model, tok, FORGET, retain=RETAIN, scale=0.05)
    two, info2 = newton_unlearn(model, tok, FORGET, retain=RETAIN, scale=0.1)
    d1, d2 = _delta(one, model), _delta(two, model)
    assert sum(float(v.abs().sum()) for v in d1.values()) > 0
    for name in d1:
        torch.testing.assert_close(d2[name], 2 * d1[name], rtol=1e-6, atol=1e-12, msg=name)
    assert info2["step_norm"] == pytest.approx(2 * info1["step_norm"], rel=1e-9)


def test_seeded_estimate(memorised64, tiny_tokenizer):
    a, ia = newton_unlearn(memorised64, tiny_tokenizer, FORGET, retain=RETAIN, scale=0.1, seed=1)
    b, ib = newton_unlearn(memorised64, tiny_tokenizer, FORGET, retain=RETAIN, scale=0.1, seed=1)
    c, ic = newton_unlearn(memorised64, tiny_tokenizer, FORGET, retain=RETAIN, scale=0.1, seed=2)
    assert ia == ib and ia["h_mean"] != ic["h_mean"]
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("estimator,damping,scale", [("gnb", 1e-3, 0.1), ("hutchinson", 1e-2, 1.0)])
def test_lowers_forget_probability(memorised, tiny_tokenizer, estimator, damping, scale):
    tok = tiny_tokenizer
    before = {k: v.clone() for k, v in memorised.state_dict().items()}
    p_forget0, p_retain0 = _prob(memorised, tok, FORGET), _prob(memorised, tok, RETAIN)
    assert p_forget0 > 0.9 and p_retain0 > 0.9
    new, info = newton_unlearn(memorised, tok, FORGET, retain=RETAIN, estimator=estimator, damping=damping,
                               scale=scale)
    after = memorised.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # input untouched
    assert new is not memorised and not new.training
    assert info["estimator"] == estimator and info["step_norm"] > 0 and math.isfinite(info["h_mean"])
    assert all(torch.isfinite(p).all() for p in new.parameters())
    p_forget, p_retain = _prob(new, tok, FORGET), _prob(new, tok, RETAIN)
    assert p_forget < 0.6 * p_forget0, (p_forget0, p_forget)
    assert p_retain > 0.5 * p_retain0, (p_retain0, p_retain)
    assert p_retain / p_retain0 > p_forget / p_forget0


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="exact"), "estimator must be 'gnb' or 'hutchinson', got 'exact'"),
    (dict(forget=[]), "forget set is empty"),
    (dict(retain=[]), "needs the retain set"),
    (dict(retain=None), "needs the retain set"),
    (dict(damping=0.0), "damping must be a finite number > 0"),
    (dict(damping=-1e-3), "damping must be a finite number > 0"),
    (dict(damping=float("nan")), "damping must be a finite number > 0"),
    (dict(scale=float("nan")), "scale must be a finite number > 0"),
    (dict(scale=float("inf")), "scale must be a finite number > 0"),
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale=-0.1), "scale must be a finite number > 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(curvature="fisher"), "curvature must be one of 'diagonal', 'kfac', 'ekfac', got 'fisher'"),
    (dict(curvature="diagonal", modules=["model.layers.0.mlp.up_proj"]), "modules and factors are options of"),
    (dict(curvature="kfac", damping=0.0), "damping must be a finite number > 0"),
    (dict(curvature="ekfac", scale=-1.0), "scale must be a finite number > 0"),
])
def test_validation(tiny_model, tiny_tokenizer, kwargs, match):
    args = dict(forget=FORGET, retain=RETAIN)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        newton_unlearn(tiny_model, tiny_tokenizer, args.pop("forget"), **args)
