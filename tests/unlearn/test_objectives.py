"""Unlearning objectives against values computed by hand from the tiny model's logits."""

import copy
import math

import pytest
import torch

from soulkit.unlearn.objectives import (
    DEFAULT_REFUSALS,
    IDK,
    NPO,
    OBJECTIVES,
    GradDiff,
    GradientAscent,
    KLRetain,
    Objective,
    ObjectiveOutput,
    SimNPO,
    frozen_reference,
    make_objective,
    retain_kl,
    sequence_nll,
)
from soulkit.unlearn.qa import QA, QADataset, collate_qa

FORGET = [
    QA("Where was Mara Quill born?", "Mara Quill was born in Lyon.", author="Mara Quill"),
    QA("What genre does Tomas Berg write?", "Tomas Berg writes science fiction and poetry.", author="Tomas Berg"),
    QA("Which award did Mara Quill win?", "The Lyon award.", author="Mara Quill"),
]
RETAIN = [
    QA("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    QA("What is the capital of France?", "Paris."),
]


def _batch(records, tok):
    ds = QADataset(records, tok)
    return collate_qa([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)


@pytest.fixture()
def batches(tiny_tokenizer):
    return _batch(FORGET, tiny_tokenizer), _batch(RETAIN, tiny_tokenizer)


def _token_logps(model, batch):
    """Per-position log p(target) [B, T-1] and answer mask, by hand: log_softmax + gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return lp * mask, mask


def _manual_nll(model, batch):
    lp, mask = _token_logps(model, batch)
    return -lp.sum() / mask.sum()


def _manual_seq_logp(model, batch):
    lp, mask = _token_logps(model, batch)
    return lp.sum(1), mask.sum(1)


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def _grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def test_batches_have_padding_and_prompt_masking(batches):
    forget, _ = batches
    n_answer = (forget["labels"] != -100).sum(1)
    assert len(set(n_answer.tolist())) > 1  # answers of different lengths: per-sequence sums matter
    assert (forget["attention_mask"] == 0).any()  # right padding present


def test_ga_is_minus_token_mean_nll(tiny_model, batches):
    forget, _ = batches
    expected = _manual_nll(tiny_model, forget)
    out = GradientAscent()(tiny_model, forget)
    assert isinstance(out, ObjectiveOutput) and out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(-expected.item(), rel=1e-5)
    assert out.metrics["forget_nll"] == pytest.approx(expected.item(), rel=1e-5)
    assert sequence_nll(tiny_model, forget).item() == pytest.approx(expected.item(), rel=1e-5)
    # a token mean over the batch, not a mean of per-sequence means
    lp, n = _manual_seq_logp(tiny_model, forget)
    assert abs((-(lp / n).mean()).item() - expected.item()) > 1e-4


def test_ga_step_raises_forget_nll(tiny_model, batches):
    forget, _ = batches
    before = sequence_nll(tiny_model, forget).item()
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    GradientAscent()(tiny_model, forget).loss.backward()
    opt.step()
    assert sequence_nll(tiny_model, forget).item() > before


def test_graddiff_is_minus_forget_plus_gamma_retain(tiny_model, batches):
    forget, retain = batches
    out = GradDiff(gamma=0.3)(tiny_model, forget, retain)
    expected = -_manual_nll(tiny_model, forget) + 0.3 * _manual_nll(tiny_model, retain)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["retain_nll"] == pytest.approx(_manual_nll(tiny_model, retain).item(), rel=1e-5)

    ref = _perturbed(tiny_model)
    out_kl = GradDiff(gamma=2.0, retain_loss="kl")(tiny_model, forget, retain, reference=ref)
    kl = retain_kl(tiny_model, ref, retain)
    assert out_kl.loss.item() == pytest.approx((-_manual_nll(tiny_model, forget) + 2.0 * kl).item(), rel=1e-5)
    assert out_kl.metrics["retain_kl"] == pytest.approx(kl.item(), rel=1e-5)


def test_retain_kl_zero_for_same_model_positive_after_perturbing(tiny_model, batches):
    _, retain = batches
    assert abs(retain_kl(tiny_model, copy.deepcopy(tiny_model), retain).item()) < 1e-6
    ref = _perturbed(tiny_model)
    kl = retain_kl(tiny_model, ref, retain).item()
    assert kl > 1e-4

    # by hand: KL(p_ref || p_theta) over the full vocabulary, mean over answer positions
    def logprobs(m):
        logits = m(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits[:, :-1]
        return torch.log_softmax(logits.double(), -1)

    with torch.no_grad():
        lq, lp = logprobs(tiny_model), logprobs(ref)
    mask = retain["labels"][:, 1:] != -100
    forward = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum() / mask.sum()
    reverse = ((lq.exp() * (lq - lp)).sum(-1) * mask).sum() / mask.sum()
    assert kl == pytest.approx(forward.item(), rel=1e-4)
    assert abs(forward - reverse).item() > 1e-3 * forward.item()  # the direction is checked, not just size


def test_npo_at_reference_equals_two_over_beta_log2(tiny_model, batches):
    forget, _ = batches
    ref = copy.deepcopy(tiny_model)
    for beta in (0.1, 1.0, 3.0):
        out = NPO(beta=beta)(tiny_model, forget, reference=ref)
        assert out.loss.item() == pytest.approx(2.0 / beta * math.log(2.0), rel=1e-5)
        assert abs(out.metrics["log_ratio"]) < 1e-4


def test_npo_matches_formula_with_summed_logprobs(tiny_model, batches):
    forget, _ = batches
    ref = _perturbed(tiny_model)
    beta = 0.7
    lt, _ = _manual_seq_logp(tiny_model, forget)
    with torch.no_grad():
        lr, _ = _manual_seq_logp(ref, forget)
    expected = -(2 / beta) * torch.nn.functional.logsigmoid(-beta * (lt - lr)).mean()
    assert NPO(beta=beta)(tiny_model, forget, reference=ref).loss.item() == pytest.approx(expected.item(),
                                                                                          rel=1e-5)


def test_npo_gradient_at_reference_is_mean_grad_of_summed_logprob(tiny_model, batches):
    # d/dtheta -(2/b) log sigmoid(-b*d) = 2 * sigmoid(b*d) * grad d; at theta == ref, sigmoid(0) = 1/2:
    # grad NPO = mean_i grad log pi_theta(y_i|x_i), i.e. the gradient of GA on mean summed log-likelihoods
    forget, _ = batches
    ref = copy.deepcopy(tiny_model)
    g_npo = _grad(tiny_model, NPO(beta=0.1)(tiny_model, forget, reference=ref).loss)
    lt, _ = _manual_seq_logp(tiny_model, forget)
    g_ga = _grad(tiny_model, lt.mean().float())
    assert g_ga.norm() > 0
    torch.testing.assert_close(g_npo, g_ga, rtol=1e-4, atol=1e-6)


def test_npo_gradient_tends_to_ga_direction_as_beta_vanishes(tiny_model, batches):
    forget, _ = batches
    ref = _perturbed(tiny_model, scale=0.02)  # log ratios of order 1, different per sequence
    lt, _ = _manual_seq_logp(tiny_model, forget)
    with torch.no_grad():
        lr, _ = _manual_seq_logp(ref, forget)
    g_ga = _grad(tiny_model, lt.mean().float())

    def npo_grad(beta):
        return _grad(tiny_model, NPO(beta=beta)(tiny_model, forget, reference=ref).loss)

    def cosine(g):
        return torch.nn.functional.cosine_similarity(g, g_ga, dim=0).item()

    g_small, g_large = npo_grad(1e-4), npo_grad(5.0)
    assert cosine(g_small) > 0.999
    # by hand: grad = mean_i 2 * sigmoid(beta * log_ratio_i) * grad log pi_theta(y_i|x_i)
    w = 2 * torch.sigmoid(5.0 * (lt - lr)).detach()
    torch.testing.assert_close(g_large, _grad(tiny_model, (w * lt).mean().float()), rtol=1e-4, atol=1e-6)
    # unequal weights at large beta turn the direction away from GA's
    assert cosine(g_large) < cosine(g_small) - 1e-4


def test_simnpo_matches_formula(tiny_model, batches):
    forget, retain = batches
    lt, n = _manual_seq_logp(tiny_model, forget)
    for beta, delta in ((4.5, 0.0), (2.0, 0.5)):
        expected = -(2 / beta) * torch.nn.functional.logsigmoid(-beta * lt / n - delta).mean()
        out = SimNPO(beta=beta, delta=delta)(tiny_model, forget)
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert SimNPO().beta == 4.5 and SimNPO().delta == 0.0
    assert not SimNPO().needs_reference and not SimNPO().needs_retain
    out = SimNPO(retain_loss="nll", gamma=0.5)(tiny_model, forget, retain)
    expected = -(2 / 4.5) * torch.nn.functional.logsigmoid(-4.5 * lt / n).mean() + 0.5 * _manual_nll(
        tiny_model, retain)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_idk_prepare_forget_is_deterministic_and_keeps_questions(tiny_model, tiny_tokenizer, batches):
    assert len(DEFAULT_REFUSALS) >= 25 and len(set(DEFAULT_REFUSALS)) == len(DEFAULT_REFUSALS)
    records = [QA(f"What is fact {i} of Mara Quill?", f"Fact {i}.", author="Mara Quill", attribute=str(i))
               for i in range(20)]
    a = IDK(seed=0).prepare_forget(records)
    assert a == IDK(seed=0).prepare_forget(records)
    assert [r.question for r in a] == [r.question for r in records]
    assert [(r.author, r.attribute) for r in a] == [(r.author, r.attribute) for r in records]
    assert all(r.answer in DEFAULT_REFUSALS for r in a)
    assert len({r.answer for r in a}) > 1  # varied refusals
    assert [r.answer for r in a] != [r.answer for r in IDK(seed=1).prepare_forget(records)]
    assert records[0].answer == "Fact 0."  # inputs untouched
    # independent of batch order
    assert IDK(seed=0).prepare_forget(records[::-1]) == a[::-1]

    # loss: NLL of the refusal answers + gamma * retain NLL
    _, retain = batches
    idk = IDK(gamma=0.25)
    refused = _batch(idk.prepare_forget(FORGET), tiny_tokenizer)
    out = idk(tiny_model, refused, retain)
    expected = _manual_nll(tiny_model, refused) + 0.25 * _manual_nll(tiny_model, retain)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_retain_wrapper(tiny_model, tiny_tokenizer, batches):
    forget, retain = batches
    ref = _perturbed(tiny_model)
    wrapped = KLRetain(GradientAscent(), alpha=0.5)
    assert wrapped.needs_retain and wrapped.needs_reference and wrapped.name == "ga+kl"
    out = wrapped(tiny_model, forget, retain, reference=ref)
    expected = -_manual_nll(tiny_model, forget) + 0.5 * retain_kl(tiny_model, ref, retain)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    idk = KLRetain(IDK(seed=3))
    assert idk.prepare_forget(FORGET) == IDK(seed=3).prepare_forget(FORGET)
    with pytest.raises(ValueError, match="reference"):
        wrapped(tiny_model, forget, retain)
    with pytest.raises(ValueError, match="retain_batch"):
        wrapped(tiny_model, forget, reference=ref)


def test_make_objective_and_validation():
    assert set(OBJECTIVES) == {"ga", "graddiff", "npo", "simnpo", "idk", "rmu"}
    for name, cls in OBJECTIVES.items():
        obj = make_objective(name)
        assert isinstance(obj, cls) and isinstance(obj, Objective) and obj.name == name
    assert make_objective("NPO", beta=0.2).beta == 0.2
    assert NPO().beta == 0.1 and NPO().retain_loss is None and GradDiff().gamma == 1.0
    with pytest.raises(ValueError, match="known.*graddiff"):
        make_objective("rmu_typo")
    with pytest.raises(ValueError, match="bad arguments"):
        make_objective("ga", beta=1.0)
    with pytest.raises(ValueError, match="NPO.beta"):
        NPO(beta=0.0)
    with pytest.raises(ValueError, match="SimNPO.beta"):
        SimNPO(beta=-1.0)
    with pytest.raises(ValueError, match="SimNPO.delta"):
        SimNPO(delta=float("nan"))
    with pytest.raises(ValueError, match="GradDiff.gamma"):
        GradDiff(gamma=-0.1)
    with pytest.raises(ValueError, match="GradDiff.retain_loss"):
        GradDiff(retain_loss=None)
    with pytest.raises(ValueError, match="NPO.retain_loss"):
        make_objective("npo", retain_loss="mse")
    with pytest.raises(ValueError, match="IDK.refusals"):
        IDK(refusals=())
    with pytest.raises(ValueError, match="KLRetain.alpha"):
        KLRetain(NPO(), alpha=-1.0)
    with pytest.raises(ValueError, match="Objective"):
        KLRetain("npo")
    assert GradDiff(retain_loss="kl").needs_reference and not GradDiff().needs_reference
    assert NPO().needs_reference and not NPO().needs_retain and NPO(retain_loss="nll").needs_retain


def test_missing_inputs_raise(tiny_model, batches):
    forget, retain = batches
    with pytest.raises(ValueError, match="retain_batch"):
        GradDiff()(tiny_model, forget)
    with pytest.raises(ValueError, match="reference"):
        NPO()(tiny_model, forget)
    with pytest.raises(ValueError, match="reference"):
        GradDiff(retain_loss="kl")(tiny_model, forget, retain)
    with pytest.raises(ValueError, match="separate"):
        NPO()(tiny_model, forget, reference=tiny_model)
    with pytest.raises(ValueError, match="collate_qa"):
        GradientAscent()(tiny_model, {"input_ids": forget["input_ids"]})
    empty = dict(forget, labels=torch.full_like(forget["labels"], -100))
    with pytest.raises(ValueError, match="no answer tokens"):
        GradientAscent()(tiny_model, empty)
    with pytest.raises(ValueError, match="no answer tokens"):
        SimNPO()(tiny_model, empty)


def test_reference_never_updated_nor_given_grads(tiny_model, batches):
    forget, retain = batches
    ref = _perturbed(tiny_model)  # requires_grad still True: no_grad must protect it
    ref.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    for obj in (NPO(retain_loss="kl"), KLRetain(SimNPO()), GradDiff(retain_loss="kl")):
        opt.zero_grad()
        obj(tiny_model, forget, retain, reference=ref).loss.backward()
        opt.step()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None for p in tiny_model.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ref.training  # the mode it was handed in is restored
    frozen = frozen_reference(tiny_model)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name, kwargs", [
    ("ga", {}), ("graddiff", {"retain_loss": "nll"}), ("graddiff", {"retain_loss": "kl"}),
    ("npo", {"retain_loss": "kl"}), ("simnpo", {"retain_loss": "nll"}), ("idk", {}),
    ("npo", {"retain_loss": None}),
])
def test_rank_shares_of_a_batch_average_to_the_whole_batch(tiny_model, tiny_tokenizer, name, kwargs):
    """Two ranks' shares (rows 0::2, 1::2; answer lengths differ between them) give losses, metrics and
    gradients whose mean is the whole batch's: what DDP's gradient averaging needs to be exact."""
    from soulkit.unlearn.qa import SHARE_KEY, shard_batch

    model = tiny_model.double()
    ref = frozen_reference(_perturbed(model))
    obj = make_objective(name, **kwargs)
    forget = [FORGET[0], FORGET[1], FORGET[2], QA("Who is Tomas Berg?", "A writer.")]
    fb = _batch(obj.prepare_forget(forget), tiny_tokenizer)
    rb = _batch(RETAIN, tiny_tokenizer)
    whole = obj(model, fb, rb, reference=ref)
    shares = [obj(model, shard_batch(fb, r, 2), shard_batch(rb, r, 2), reference=ref) for r in (0, 1)]
    mean_loss = (shares[0].loss + shares[1].loss) / 2
    torch.testing.assert_close(mean_loss, whole.loss, rtol=1e-12, atol=1e-12)
    for k, v in whole.metrics.items():
        assert (shares[0].metrics[k] + shares[1].metrics[k]) / 2 == pytest.approx(v, rel=1e-10, abs=1e-12), k
    mean_grad = (_grad(model, shares[0].loss) + _grad(model, shares[1].loss)) / 2
    torch.testing.assert_close(mean_grad, _grad(model, whole.loss), rtol=1e-10, atol=1e-12)
    share = shard_batch(fb, 1, 2)
    assert share[SHARE_KEY].rows == 4 and share["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        shard_batch(fb, 0, 3)
