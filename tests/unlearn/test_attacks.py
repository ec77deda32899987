"""soulkit.unlearn.attacks: quantization against a plain-torch reference, relearning, the forget halves,
the few-shot prompts and the attack settings' checks. (run_attack end to end: tests/unlearn/test_cli_attack.py.)"""

import numpy as np
import pytest
import torch

from soulkit.unlearn.attacks import (
    ATTACKS,
    AttackConfig,
    few_shot_prompts,
    few_shot_rouge,
    probe_scores,
    quantize_tensor,
    quantize_weights,
    relearn,
    relearn_budgets,
    sequential_requests,
    split_forget_halves,
)
from soulkit.unlearn.data import generate_benchmark
from soulkit.unlearn.evaluate import score_answers
from soulkit.unlearn.metrics import rouge_l_recall
from soulkit.unlearn.models import ModelConfig, build_model
from soulkit.unlearn.qa import QA, format_prompt, greedy_answers

from ._corpus import FORGET, RETAIN, _assert_same_state, _state


# ------------------------------------------------------------------------------------------ reference
def _reference_quantize(w: torch.Tensor, bits: int, group_size: int | None, per_channel: bool = True):
    """Round-to-nearest symmetric quantization written out row by row, group by group, in float64.
    Returns (dequantized weight, integer codes, scale per element)."""
    w = w.detach().double()
    qmax = 2 ** (bits - 1) - 1
    deq = torch.empty_like(w)
    codes = torch.empty_like(w)
    scales = torch.empty_like(w)
    rows, cols = w.shape
    if not per_channel and group_size is None:
        groups = [(slice(None), slice(None))]
    else:
        width = group_size or cols
        groups = [(r, slice(c, min(c + width, cols))) for r in range(rows) for c in range(0, cols, width)]
    for r, c in groups:
        block = w[r, c]
        m = float(block.abs().max())
        s = m / qmax if m > 0 else 1.0
        # Python's round() is half-to-even, as torch.round
        code = torch.tensor([[max(-qmax, min(qmax, round(x / s))) for x in row]
                             for row in block.reshape(-1, block.shape[-1]).tolist()], dtype=torch.float64)
        code = code.reshape(block.shape)
        codes[r, c] = code
        deq[r, c] = code * s
        scales[r, c] = s
    return deq, codes, scales


def _awkward_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 0, rows).unsqueeze(1)
    w[0] = 0.0  # an all-zero output channel stays zero
    w[1, 3] = 5.0  # an outlier that sets its channel's (group's) scale
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 4, 7, 16])
def test_quantize_tensor_matches_the_reference(bits, group_size):
    w = _awkward_weight(6, 13)  # 13 columns: groups of 4 or 7 leave a shorter last group
    deq, codes, scales = _reference_quantize(w, bits, group_size)
    q = quantize_tensor(w, bits, group_size=group_size)
    assert q.dtype == w.dtype and q.shape == w.shape
    torch.testing.assert_close(q.double(), deq, rtol=0, atol=1e-6)
    # per channel / group: |w - q(w)| <= scale / 2
    assert bool(((w.double() - q.double()).abs() <= scales / 2 + 1e-6).all())
    assert bool((q[0] == 0).all())
    # levels: at most 2**bits distinct values per channel/group (int4: <= 16)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax
    width = group_size or w.shape[1]
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], width):
            assert len(torch.unique(q[r, c:c + width])) <= 2 ** bits


def test_int4_and_int8_error_bounds_on_a_large_weight():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    scale8 = w.abs().amax(dim=1, keepdim=True) / 127
    err8 = (w - quantize_tensor(w, 8)).abs()
    assert bool((err8 <= scale8 / 2 + 1e-7).all())
    q4 = quantize_tensor(w, 4)
    assert max(len(torch.unique(row)) for row in q4) <= 16
    q4g = quantize_tensor(w, 4, group_size=32)
    for r in range(64):
        for c in range(0, 96, 32):
            assert len(torch.unique(q4g[r, c:c + 32])) <= 16
    # group-wise scales fit the weight at least as well as one scale per row
    assert float((w - q4g).pow(2).sum()) <= float((w - q4).pow(2).sum())
    # per tensor: one scale for the whole weight
    qt = quantize_tensor(w, 8, per_channel=False)
    torch.testing.assert_close(qt.double(), _reference_quantize(w, 8, None, per_channel=False)[0], rtol=0, atol=1e-6)


def test_quantize_tensor_keeps_the_dtype():
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        q = quantize_tensor(w.to(dtype), 8)
        assert q.dtype == dtype
        ref = _reference_quantize(w.to(dtype).double(), 8, None)[0]
        torch.testing.assert_close(q.double(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 8)])
def test_quantize_weights_quantizes_every_linear_conv1d_and_embedding(tiny_tokenizer, arch, bits, group_size):
    model = build_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, max_positions=96),
                        tiny_tokenizer, seed=0).eval()
    before = _state(model)
    q = quantize_weights(model, bits=bits, group_size=group_size)
    _assert_same_state(before, _state(model))  # the input model is unchanged
    assert q is not model
    named = dict(model.named_modules())
    n = 0
    for name, mod in q.named_modules():
        orig = named[name]
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            ref = _reference_quantize(orig.weight, bits, group_size)[0]
        elif type(mod).__name__ == "Conv1D":  # [in, out]: output channels are columns
            ref = _reference_quantize(orig.weight.t(), bits, group_size)[0].t()
        else:
            for pname, p in mod.named_parameters(recurse=False):
                assert torch.equal(p, getattr(orig, pname)), f"{name}.{pname} (not quantized) changed"
            continue
        torch.testing.assert_close(mod.weight.double(), ref, rtol=0, atol=1e-6, msg=name)
        if getattr(mod, "bias", None) is not None:
            assert torch.equal(mod.bias, orig.bias)  # biases keep full precision
        n += 1
    assert n >= 2 * 4 + 1
    if arch == "gpt2":
        assert any(type(m).__name__ == "Conv1D" for m in q.modules())
    # a tied LM head stays tied to the (quantized) input embedding
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        assert q.get_output_embeddings().weight is q.get_input_embeddings().weight
    # the quantized model still runs
    ids = torch.tensor([tiny_tokenizer(format_prompt("Where was Mara Quill born?"))["input_ids"]])
    assert torch.isfinite(q(input_ids=ids).logits).all()


def test_quantize_weights_rejects_bad_settings(tiny_model):
    for bits in (3, 16, True):
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            quantize_weights(tiny_model, bits=bits)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(tiny_model, bits=4, group_size=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_weights(torch.nn.Sequential(torch.nn.ReLU()), bits=8)


# ------------------------------------------------------------------------------------------ halves
def _records(authors: dict[str, int]) -> list[QA]:
    return [QA(f"Question {i} about {a}?", f"Answer {i} about {a}.", author=a)
            for a, n in authors.items() for i in range(n)]


def test_split_forget_halves_is_per_author_and_deterministic():
    recs = _records({"Ann Lee": 6, "Bo Tan": 5, "Cy Ruiz": 1})
    a, b = split_forget_halves(recs, seed=0)
    assert split_forget_halves(recs, seed=0) == (a, b)
    assert {r.question for r in a}.isdisjoint({r.question for r in b})
    assert sorted(r.question for r in a + b) == sorted(r.question for r in recs)
    count = {name: sum(r.author == name for r in a) for name in ("Ann Lee", "Bo Tan", "Cy Ruiz")}
    assert count == {"Ann Lee": 3, "Bo Tan": 2, "Cy Ruiz": 0}
    # original order within each half
    assert a == [r for r in recs if r in a] and b == [r for r in recs if r in b]
    # another seed draws other halves
    assert any(split_forget_halves(recs, seed=s)[0] != a for s in range(1, 5))
    with pytest.raises(ValueError, match="at least 2"):
        split_forget_halves(recs[:1])
    with pytest.raises(ValueError, match="single QA pair"):
        split_forget_halves(_records({"A": 1, "B": 1}))


# ------------------------------------------------------------------------------------------ relearning
def test_relearn_lowers_the_loss_on_the_attack_half_and_leaves_the_input_alone(tiny_model, tiny_tokenizer):
    before = _state(tiny_model)
    nll0 = score_answers(tiny_model, tiny_tokenizer, FORGET).mean()
    out = relearn(tiny_model, tiny_tokenizer, FORGET, steps=10, lr=3e-3, batch_size=2, seed=0)
    _assert_same_state(before, _state(tiny_model))
    assert out is not tiny_model and not out.training
    nll1 = score_answers(out, tiny_tokenizer, FORGET).mean()
    assert nll1 < nll0 - 0.5, (nll0, nll1)


def test_relearn_budgets_are_prefixes_of_one_run(tiny_model, tiny_tokenizer):
    models, losses = relearn_budgets(tiny_model, tiny_tokenizer, FORGET, (4, 2), lr=1e-3, batch_size=2,
                                     seed=1, show_progress=False)
    assert sorted(models) == [2, 4] and len(losses) == 4 and all(np.isfinite(losses))
    alone = relearn(tiny_model, tiny_tokenizer, FORGET, steps=2, lr=1e-3, batch_size=2, seed=1,
                    show_progress=False)
    _assert_same_state(_state(models[2]), _state(alone))
    assert not all(torch.equal(a, b) for a, b in zip(_state(models[2]).values(), _state(models[4]).values()))


def test_relearn_with_sophia(tiny_model, tiny_tokenizer):
    nll0 = score_answers(tiny_model, tiny_tokenizer, FORGET).mean()
    out = relearn(tiny_model, tiny_tokenizer, FORGET, steps=6, lr=3e-3, optimizer="sophia", batch_size=4,
                  show_progress=False)
    assert score_answers(out, tiny_tokenizer, FORGET).mean() < nll0


def test_relearn_rejects_bad_settings(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        relearn(tiny_model, tiny_tokenizer, FORGET, steps=0)
    with pytest.raises(ValueError, match="budgets must be >= 1"):
        relearn_budgets(tiny_model, tiny_tokenizer, FORGET, (0, 5))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        relearn(tiny_model, tiny_tokenizer, FORGET, optimizer="sgd")
    with pytest.raises(ValueError, match="empty"):
        relearn(tiny_model, tiny_tokenizer, [], steps=1)


# ------------------------------------------------------------------------------------------ few-shot
def test_few_shot_prompts():
    prompts = few_shot_prompts(["Where was Mara Quill born?"], RETAIN, shots=2, seed=0)
    text = format_prompt(prompts[0])
    assert text.startswith("Question: ") and text.endswith("Question: Where was Mara Quill born?\nAnswer:")
    assert text.count("Question: ") == 3 and text.count("\nAnswer: ") == 2
    assert few_shot_prompts(["Where was Mara Quill born?"], RETAIN, shots=2, seed=0) == prompts
    with pytest.raises(ValueError, match="need 5 example"):
        few_shot_prompts(["q?"], RETAIN, shots=5)


def test_few_shot_rouge(memorised, tiny_tokenizer):
    res = few_shot_rouge(memorised, tiny_tokenizer, FORGET, RETAIN, shots=1, seed=0, max_new_tokens=12)
    assert res["new_token_budget"] == 12
    assert res["forget_rouge"] > 0.5  # the memorised model answers its forget questions
    assert 0.0 <= res["forget_rouge_few_shot"] <= 1.0
    with pytest.raises(ValueError, match="few-shot prompts with 3 shot"):
        few_shot_rouge(memorised, tiny_tokenizer, FORGET, RETAIN, shots=3, max_new_tokens=12)


# ------------------------------------------------------------------------------------------ probes
def test_probe_scores_against_a_direct_computation(memorised, tiny_model, tiny_tokenizer):
    values = [["Lyon"], ["science fiction"], ["Lyon", "poetry"], ["Paris"]]
    recs = [QA(r.question, r.answer, author=r.author, extra={"values": v, "probe": "a" if i < 2 else "b"})
            for i, (r, v) in enumerate(zip(FORGET, values))]
    recs.append(QA("Where was Mara Quill born, again?", "Mara Quill was born in Lyon."))  # no values, no kind
    res = probe_scores(memorised, tiny_tokenizer, recs, max_new_tokens=12)
    gen = greedy_answers(memorised, tiny_tokenizer, [r.question for r in recs], max_new_tokens=12)
    rouge = rouge_l_recall(gen, [r.answer for r in recs])
    prob = np.exp(-score_answers(memorised, tiny_tokenizer, recs))
    hits = [float(all(v.casefold() in g.casefold() for v in vs)) for g, vs in zip(gen, values)]
    assert res["n"] == 5 and res["rouge"] == pytest.approx(rouge.mean())
    assert res["probability"] == pytest.approx(prob.mean()) and res["value_hit"] == pytest.approx(np.mean(hits))
    assert res["rouge"] > 0.5 and res["value_hit"] >= 0.5  # the memorised model knows its forget facts
    assert res["by_kind"]["a"] == {"rouge": pytest.approx(rouge[:2].mean()), "probability": pytest.approx(prob[:2].mean()),
                                   "value_hit": pytest.approx(np.mean(hits[:2])), "n": 2}
    assert res["by_kind"]["b"]["n"] == 2
    fresh = probe_scores(tiny_model, tiny_tokenizer, recs, max_new_tokens=12)  # an untrained model knows nothing
    assert fresh["rouge"] < res["rouge"] - 0.3 and fresh["probability"] < res["probability"] - 0.5
    assert probe_scores(memorised, tiny_tokenizer, FORGET, max_new_tokens=12)["value_hit"] is None
    with pytest.raises(ValueError, match="at least one"):
        probe_scores(memorised, tiny_tokenizer, [])


# ------------------------------------------------------------------------------------------ settings
def test_attack_config_checks():
    assert len(ATTACKS) == 7
    for name in ATTACKS:  # every attack of issue 16 runs
        assert AttackConfig(name).attack == name
    assert AttackConfig("relearn", steps=(50, 10, 25, 10)).steps == (10, 25, 50)
    assert AttackConfig("relearn", steps=5).steps == (5,)
    assert AttackConfig("quantize", bits=8).settings() == {"attack": "quantize", "bits": 8, "group_size": None,
                                                           "per_channel": True}
    with pytest.raises(ValueError, match="unknown attack 'melt'"):
        AttackConfig("melt")
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 2"):
        AttackConfig("quantize", bits=2)
    with pytest.raises(ValueError, match=r"steps \(relearning budgets\) must be ints >= 1"):
        AttackConfig("relearn", steps=(10, 0))
    with pytest.raises(ValueError, match="lr must be"):
        AttackConfig("relearn", lr=float("nan"))
    with pytest.raises(ValueError, match="unknown optimizer"):
        AttackConfig("relearn", optimizer="adahessian")
    with pytest.raises(ValueError, match="group_size"):
        AttackConfig("quantize", group_size=0)
    with pytest.raises(ValueError, match="shots"):
        AttackConfig("few-shot", shots=0)
    # relearning's lr defaults to 1e-3; sequential requests keep None (the benchmark's lr for the pair)
    assert AttackConfig("relearn").lr == 1e-3 and AttackConfig("sequential").lr is None
    seq = AttackConfig("sequential", method="graddiff", optimizer="signum", requests=2, lr=1e-4)
    assert seq.settings() == {"attack": "sequential", "method": "graddiff", "optimizer": "signum", "lr": 1e-4,
                              "requests": 2, "seed": 0}
    with pytest.raises(ValueError, match="unknown optimizer 'signum'; choose one of adamw, sophia"):
        AttackConfig("relearn", optimizer="signum")
    with pytest.raises(ValueError, match="unknown unlearning method 'forget-it'"):
        AttackConfig("sequential", method="forget-it")
    with pytest.raises(ValueError, match="requests must be an int >= 1"):
        AttackConfig("sequential", requests=0)
    with pytest.raises(ValueError, match="lr must be"):
        AttackConfig("sequential", lr=-1.0)


def test_sequential_requests_are_disjoint_forget01_sized_groups():
    bench = generate_benchmark(40, qa_per_author=2, seed=0)  # forget01: 1 author, forget10: 4
    reqs = sequential_requests(bench, "forget10", 4)
    assert reqs == [[n] for n in reversed(bench.forget_authors("forget10"))]
    assert reqs[0] == bench.forget_authors("forget01")
    big = generate_benchmark(200, qa_per_author=1, seed=0, n_holdout=0)  # TOFU's size: forget01 = 2 authors
    reqs = sequential_requests(big, "forget10", 4)
    assert [len(r) for r in reqs] == [2, 2, 2, 2] and reqs[0] == big.forget_authors("forget01")
    pool = big.forget_authors("forget10")  # 20 authors; the requests are the last 8, two by two from the end
    assert reqs == [pool[18:20], pool[16:18], pool[14:16], pool[12:14]]
    with pytest.raises(ValueError, match="5 sequential requests of 1 author.s. need 5 forget authors, forget10 has 4"):
        sequential_requests(bench, "forget10", 5)
    with pytest.raises(ValueError, match="int >= 1"):
        sequential_requests(bench, "forget10", 0)
