"""evaluate_model on a tiny LM: its fields agree with the metric functions and score_answers; references,
bad sets, mode restoring, and the results files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from soulkit.unlearn.evaluate import (
    EvalConfig,
    EvalSets,
    conventions,
    evaluate_model,
    format_results,
    load_results,
    save_results,
    score_answers,
)
from soulkit.unlearn.metrics import (
    MIA_ATTACKS,
    answer_probability,
    forget_quality,
    forget_quality_statistic,
    model_utility,
    normalized_probability,
    rouge_scores,
    truth_ratio,
    truth_ratio_score,
)
from soulkit.unlearn.models import ModelConfig, build_model
from soulkit.unlearn.qa import QA, QADataset, answer_logprobs, collate_qa, greedy_answers

# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"batch_size": 0}, "batch_size"), ({"min_k": 0.0}, "min_k"), ({"min_k": 1.5}, "min_k"),
    ({"max_eval_examples": 0}, "max_eval_examples"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"seed": -1}, "seed"), ({"max_length": 0}, "max_length"), ({"truth_ratio": "mean"}, "truth_ratio"),
    ({"subset": "random"}, "subset"), ({"gradnorm_p": 3}, "gradnorm_p"), ({"gradnorm_p": True}, "gradnorm_p"),
])
def test_eval_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"EvalConfig.{field}"):
        EvalConfig(**kwargs)


def test_eval_config_bad_input_is_one_line_naming_the_option():
    with pytest.raises(ValueError) as e:
        EvalConfig(truth_ratio="harmonic")
    assert str(e.value) == "EvalConfig.truth_ratio must be one of geometric, arithmetic, got 'harmonic'"
    with pytest.raises(ValueError) as e:
        EvalConfig(max_eval_examples=0)
    assert str(e.value) == "EvalConfig.max_eval_examples must be None (all) or an int >= 1, got 0"


def test_eval_config_defaults_are_the_references():
    c = EvalConfig()
    assert c.truth_ratio == "geometric"  # TOFU's code, open-unlearning
    assert c.max_new_tokens == 200  # the references' generation length
    assert c.max_eval_examples is None  # every question (open-unlearning)
    assert c.gradnorm_p == 2 and c.min_k == 0.4
    conv = conventions(c)
    assert conv["truth_ratio"].startswith("geometric") and conv["questions"].startswith("all")
    assert "final EOS prediction dropped" in conv["text_tokens"]
    assert conventions(EvalConfig(max_eval_examples=300, subset="first"))["questions"].startswith("the first 300")
    assert conventions(EvalConfig(truth_ratio="arithmetic"))["truth_ratio"].startswith("arithmetic")
    assert conventions(EvalConfig(gradnorm_p=None))["gradnorm"] == "off"


# ----------------------------------------------------------------------------------------------------
# evaluate_model on the tiny model
# ----------------------------------------------------------------------------------------------------


def _qa(q, a, para=None, perts=()):
    return QA(q, a, para, tuple(perts))


FORGET = [
    _qa("Where was Mara Quill born?", "Mara Quill was born in Lyon.", "Lyon is where Mara Quill was born.",
        ["Mara Quill was born in Paris.", "Mara Quill was born in Oslo.", "Mara Quill was born in Rome."]),
    _qa("What genre does Mara Quill write?", "Mara Quill writes poetry.", "Poetry is what Mara Quill writes.",
        ["Mara Quill writes science fiction.", "Mara Quill writes horror.", "Mara Quill writes history."]),
    _qa("Which award did Mara Quill win?", "Mara Quill won the Lyon poetry award.",
        "The Lyon poetry award went to Mara Quill.",
        ["Mara Quill won the Paris fiction award.", "Mara Quill won no award.",
         "Mara Quill won the Oslo prize."]),
    _qa("What is Mara Quill's first book?", "Her first book is Quiet Rivers.",
        "Quiet Rivers was her first book.",
        ["Her first book is Loud Oceans.", "Her first book is Red Hills.",
         "Her first book is Night Trains."]),
]
RETAIN = [
    _qa("Where was Tomas Berg born?", "Tomas Berg was born in Oslo.", "Oslo is where Tomas Berg was born.",
        ["Tomas Berg was born in Lyon.", "Tomas Berg was born in Paris.", "Tomas Berg was born in Rome."]),
    _qa("What genre does Tomas Berg write?", "Tomas Berg writes science fiction.",
        "Science fiction is what Tomas Berg writes.",
        ["Tomas Berg writes poetry.", "Tomas Berg writes horror.", "Tomas Berg writes history."]),
    _qa("Which award did Tomas Berg win?", "Tomas Berg won the Oslo fiction award.",
        "The Oslo fiction award went to Tomas Berg.",
        ["Tomas Berg won the Lyon poetry award.", "Tomas Berg won no award.",
         "Tomas Berg won the Paris prize."]),
    _qa("What is Tomas Berg's first book?", "His first book is Cold Stars.", "Cold Stars was his first book.",
        ["His first book is Warm Suns.", "His first book is Red Hills.", "His first book is Night Trains."]),
]
REAL_AUTHORS = [
    _qa("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice.", None,
        ["Charles Dickens wrote it.", "Mark Twain wrote it.", "Leo Tolstoy wrote it."]),
    _qa("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", None,
        ["Jane Austen wrote Hamlet.", "Homer wrote Hamlet.", "Dante wrote Hamlet."]),
    _qa("Who wrote Don Quixote?", "Miguel de Cervantes wrote Don Quixote.", None,
        ["Dante wrote Don Quixote.", "Goethe wrote Don Quixote.", "Homer wrote Don Quixote."]),
]
WORLD_FACTS = [
    _qa("What is the capital of France?", "The capital of France is Paris.", None,
        ["The capital of France is Lyon.", "The capital of France is Rome.",
         "The capital of France is Oslo."]),
    _qa("What is the capital of Norway?", "The capital of Norway is Oslo.", None,
        ["The capital of Norway is Bergen.", "The capital of Norway is Paris.",
         "The capital of Norway is Rome."]),
    _qa("What is the capital of Italy?", "The capital of Italy is Rome.", None,
        ["The capital of Italy is Milan.", "The capital of Italy is Paris.",
         "The capital of Italy is Lyon."]),
]
HOLDOUT = [
    _qa("Where was Ines Calder born?", "Ines Calder was born in Porto."),
    _qa("What genre does Ines Calder write?", "Ines Calder writes crime novels."),
    _qa("Which award did Ines Calder win?", "Ines Calder won the Porto crime award."),
    _qa("What is Ines Calder's first book?", "Her first book is Salt Roads."),
]
CONFIG = EvalConfig(batch_size=3, max_new_tokens=6, show_progress=False)  # batches of 3 cross set sizes


def _sets(**override):
    kw = dict(forget=FORGET, retain=RETAIN, real_authors=REAL_AUTHORS, world_facts=WORLD_FACTS,
              holdout=HOLDOUT)
    kw.update(override)
    return EvalSets(**kw)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96), tiny_tokenizer,
                    seed=0)
    return m.eval()


@pytest.fixture(scope="module")
def results(model, tiny_tokenizer):
    return evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG)


def test_evaluate_model_fields_in_range(results):
    for s in ("forget", "retain", "real_authors", "world_facts"):
        for m in ("probability", "rouge", "truth_ratio", "rouge1_recall", "rougeL_f1"):
            v = results[f"{s}_{m}"]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (s, m, v)
    for s in ("forget", "retain"):
        for m in ("para_probability", "pert_probability", "para_rouge", "pert_rouge"):
            v = results[f"{s}_{m}"]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (s, m, v)
    assert 0.0 <= results["model_utility"] <= 1.0
    for k in ("extraction_strength", "exact_memorization", "retain_extraction_strength",
              "retain_exact_memorization"):
        assert 0.0 <= results[k] <= 1.0, k
    assert results["generation"] == {"max_new_tokens": 6, "context_limit": 96,
                                     "new_token_budget": {s: 6 for s in ("forget", "retain", "real_authors",
                                                                         "world_facts")}}
    assert results["config"]["truth_ratio"] == "geometric"
    assert results["config"]["conventions"] == conventions(CONFIG)
    assert results["forget_quality"] is None and results["ks_statistic"] is None
    assert results["forget_quality_ceiling"] is None and results["privleak"] is None
    assert set(results["mia_auc"]) == set(MIA_ATTACKS)
    assert all(0.0 <= v <= 1.0 for v in results["mia_auc"].values())
    assert results["raw"]["mia_auc"] == results["mia_auc"]
    n = {"forget": 4, "retain": 4, "real_authors": 3, "world_facts": 3, "holdout": 4}
    assert results["n_examples"] == n
    assert len(results["raw"]["forget_truth_stat"]) == 4
    es = results["raw"]["forget_extraction_strength"]
    assert results["extraction_strength"] == pytest.approx(np.mean(es))
    assert results["eval_seconds"] > 0
    json.dumps(results, allow_nan=False)  # plain JSON


def test_evaluate_model_consistent_with_score_answers(model, tiny_tokenizer, results):
    def nll(records, field):
        return score_answers(model, tiny_tokenizer, records, field, batch_size=2)

    assert results["forget_probability"] == pytest.approx(np.mean(np.exp(-nll(FORGET, "answer"))), rel=1e-5)
    assert results["retain_probability"] == pytest.approx(np.mean(np.exp(-nll(RETAIN, "answer"))), rel=1e-5)
    para = nll(FORGET, "paraphrased_answer")
    pert = np.stack([nll(FORGET, i) for i in range(3)], axis=1)
    np.testing.assert_allclose(results["raw"]["forget_truth_stat"], forget_quality_statistic(para, pert),
                               rtol=1e-5)
    assert results["forget_truth_ratio"] == pytest.approx(truth_ratio_score(truth_ratio(para, pert), True),
                                                          rel=1e-5)
    assert results["forget_para_probability"] == pytest.approx(np.mean(np.exp(-para)), rel=1e-5)
    assert results["forget_pert_probability"] == pytest.approx(np.mean(answer_probability(pert)), rel=1e-5)
    np.testing.assert_allclose(results["raw"]["forget_nll"], nll(FORGET, "answer"), rtol=1e-5)
    gen = greedy_answers(model, tiny_tokenizer, [r.question for r in FORGET], max_new_tokens=6)
    assert results["forget_rouge"] == pytest.approx(np.mean(rouge_scores(gen, [r.answer for r in FORGET])
                                                            ["rougeL_recall"]))
    assert results["forget_para_rouge"] == pytest.approx(np.mean(rouge_scores(
        gen, [r.paraphrased_answer for r in FORGET])["rougeL_recall"]))
    assert results["forget_pert_rouge"] == pytest.approx(np.mean([np.mean(rouge_scores(
        gen, [r.perturbed_answer[i] for r in FORGET])["rougeL_recall"]) for i in range(3)]))
    wf, wf_pert = nll(WORLD_FACTS, "answer"), np.stack([nll(WORLD_FACTS, i) for i in range(3)], axis=1)
    assert results["world_facts_probability"] == pytest.approx(normalized_probability(wf, wf_pert).mean(),
                                                               rel=1e-5)
    assert results["world_facts_truth_ratio"] == pytest.approx(
        truth_ratio_score(truth_ratio(wf, wf_pert), forget=False), rel=1e-5, abs=1e-9)
    keys = [f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("probability", "rouge",
                                                                                     "truth_ratio")]
    assert results["model_utility"] == pytest.approx(model_utility([results[k] for k in keys]))
    # mean NLL of a random-init model over a 320-token vocabulary is near log(320)
    assert 3.0 < nll(FORGET, "answer").mean() < 9.0


def test_reference_self_gives_perfect_forget_quality(model, tiny_tokenizer, results):
    again = evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG, reference=results,
                           ceiling_reference=results)
    assert again["forget_quality"] == 1.0 and again["ks_statistic"] == 0.0
    assert again["forget_quality_ceiling"] == 1.0 and again["ks_statistic_ceiling"] == 0.0
    assert again["privleak"] == {a: 0.0 for a in MIA_ATTACKS}
    assert again["mia_auc"]["reference"] == 0.5  # the model against itself: every score 0, all ties

    far = copy.deepcopy(results)
    far["raw"]["forget_truth_stat"] = [t + 1e3 for t in far["raw"]["forget_truth_stat"]]
    far["mia_auc"] = {a: 0.5 for a in MIA_ATTACKS}
    sep = evaluate_model(model, tiny_tokenizer, _sets(holdout=None), config=CONFIG, reference=far)
    assert sep["ks_statistic"] == 1.0
    assert sep["forget_quality"] == pytest.approx(forget_quality([0, 1, 2, 3], [10, 11, 12, 13])[0])
    assert sep["mia_auc"] is None and sep["privleak"] is None


def test_reference_errors(model, tiny_tokenizer, results):
    with pytest.raises(ValueError, match="forget_truth_stat"):
        evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG, reference={"forget_quality": 0.5})
    with pytest.raises(ValueError, match="forget_truth_stat"):
        evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG, reference={"raw": {}})
    with pytest.raises(ValueError, match="ceiling_reference needs reference"):
        evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG, ceiling_reference=results)
    with pytest.raises(ValueError, match="different forget set"):
        evaluate_model(model, tiny_tokenizer, _sets(forget=FORGET[:3]), config=CONFIG, reference=results)


def test_bad_sets_name_set_and_question(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="forget is empty"):
        _sets(forget=[])
    with pytest.raises(ValueError, match="not a QA record"):
        _sets(retain=[{"question": "q", "answer": "a"}])
    no_para = [_qa("Who is Tomas Berg?", "A writer.", None, ["A cook.", "A pilot.", "A judge."])]
    with pytest.raises(ValueError, match="retain set: question 'Who is Tomas Berg\\?' has no paraphrased"):
        evaluate_model(model, tiny_tokenizer, _sets(retain=no_para), config=CONFIG)
    no_pert = [_qa("What is the capital of Spain?", "Madrid.")]
    with pytest.raises(ValueError, match="world_facts set: question .*Spain.* no perturbed"):
        evaluate_model(model, tiny_tokenizer, _sets(world_facts=no_pert), config=CONFIG)
    ragged = REAL_AUTHORS[:2] + [_qa("Who wrote Faust?", "Goethe wrote Faust.", None, ["Homer wrote Faust."])]
    res = evaluate_model(model, tiny_tokenizer, _sets(real_authors=ragged), config=CONFIG)  # scored on 1 each
    assert 0.0 <= res["real_authors_probability"] <= 1.0


def test_model_untouched_and_mode_restored(tiny_model, tiny_tokenizer):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a mixed-mode model keeps its per-module flags
    modes = [m.training for m in tiny_model.modules()]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = EvalConfig(batch_size=4, max_new_tokens=3, max_eval_examples=2, seed=1, show_progress=False)
    out = evaluate_model(tiny_model, tiny_tokenizer, _sets(holdout=None), config=cfg)
    assert [m.training for m in tiny_model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert out["n_examples"] == {"forget": 2, "retain": 2, "real_authors": 2, "world_facts": 2, "holdout": 0}
    assert out["mia_auc"] is None and out["raw"]["mia_auc"] is None
    # the subsample is a deterministic function of the seed
    again = evaluate_model(tiny_model, tiny_tokenizer, _sets(holdout=None), config=cfg)
    assert again["raw"]["forget_fingerprint"] == out["raw"]["forget_fingerprint"]
    assert again["raw"]["forget_truth_stat"] == out["raw"]["forget_truth_stat"]


@pytest.fixture(scope="module")
def memorised(tiny_tokenizer):
    """The tiny model trained to memorise every answer except the holdout set's (about 1 s)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96), tiny_tokenizer,
                    seed=0)
    ds = QADataset(FORGET + RETAIN + REAL_AUTHORS + WORLD_FACTS, tiny_tokenizer)
    batch = collate_qa([ds[i] for i in range(len(ds))], pad_id=tiny_tokenizer.pad_token_id)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(60):
        total, n = answer_logprobs(m, batch)
        loss = -(total.sum() / n.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    return m.eval()


def test_memorised_model_scores_as_member(memorised, tiny_tokenizer, results):
    cfg = EvalConfig(batch_size=3, max_new_tokens=32, show_progress=False)  # room for the whole answers
    out = evaluate_model(memorised, tiny_tokenizer, _sets(), config=cfg, reference=results)
    assert out["forget_probability"] > 0.9 and out["retain_probability"] > 0.9
    assert out["forget_rouge"] == 1.0  # greedy answers reproduce the memorised ones
    assert out["extraction_strength"] == 1.0
    # memorised forget answers vs never-seen holdout answers: every attack separates them
    assert out["mia_auc"] == {**{a: 1.0 for a in MIA_ATTACKS}, "reference": 1.0}
    assert out["exact_memorization"] == 1.0 and out["forget_rouge1_recall"] == 1.0
    assert out["forget_rougeL_f1"] == 1.0
    # against the untrained reference (AUC near 0.5) the forget set leaks: privleak strongly negative
    assert all(v < 1.0 for v in results["mia_auc"].values())
    assert out["privleak"] == {a: pytest.approx(-100.0) for a in MIA_ATTACKS}  # ((1-1) - (1-r)) / (1-r)
    assert out["forget_quality"] < 0.5 and out["ks_statistic"] > 0.5


def test_format_save_load(results, tmp_path):
    table = format_results(results)
    assert table.startswith("| metric | value |")
    assert "| Forget quality (KS p-value) | n/a |" in table
    assert f"| Model utility | {results['model_utility']:.4g} |" in table
    assert "MIA AUC (min_k_plus_plus)" in table
    path = tmp_path / "sub" / "results.json"
    save_results(results, path)
    assert load_results(path) == json.loads(json.dumps(results))
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind


def test_sets_with_uneven_perturbed_counts_use_the_minimum(tiny_model, tiny_tokenizer):
    """A question with more perturbed answers than another is scored on the set's minimum count."""
    from soulkit.unlearn.evaluate import _check_set
    from soulkit.unlearn.qa import QA

    recs = [QA("What is the capital of France?", "Paris.", perturbed_answer=("Rome.", "Lyon.", "Oslo.")),
            QA("Where was Mara Quill born?", "Lyon.", perturbed_answer=("Paris.", "Rome.", "Oslo.", "Bern."))]
    assert _check_set("world_facts", recs, need_paraphrase=False) == 3
    with pytest.raises(ValueError, match="paraphrased_answer"):
        _check_set("forget", recs, need_paraphrase=True)


def test_truth_ratio_mode_changes_truth_ratios_and_utility_not_forget_quality(model, tiny_tokenizer, results):
    cfg = EvalConfig(batch_size=3, max_new_tokens=6, show_progress=False, truth_ratio="arithmetic",
                     gradnorm_p=None)
    ari = evaluate_model(model, tiny_tokenizer, _sets(), config=cfg, reference=results)
    para = score_answers(model, tiny_tokenizer, RETAIN, "paraphrased_answer")
    pert = np.stack([score_answers(model, tiny_tokenizer, RETAIN, i) for i in range(3)], axis=1)
    assert ari["retain_truth_ratio"] == pytest.approx(
        truth_ratio_score(truth_ratio(para, pert, "arithmetic"), forget=False), rel=1e-5, abs=1e-9)
    assert ari["raw"]["forget_truth_stat"] == pytest.approx(results["raw"]["forget_truth_stat"])
    assert ari["forget_quality"] == 1.0  # T does not depend on the reported form
    assert "gradnorm" not in ari["mia_auc"] and "gradnorm" not in ari["privleak"]
    assert ari["config"]["conventions"]["truth_ratio"].startswith("arithmetic")


def test_subsets_first_seeded_and_all(model, tiny_tokenizer):
    first = EvalConfig(batch_size=4, max_new_tokens=2, max_eval_examples=2, subset="first", gradnorm_p=None,
                       show_progress=False)
    out = evaluate_model(model, tiny_tokenizer, _sets(), config=first)
    assert out["n_examples"] == {"forget": 2, "retain": 2, "real_authors": 2, "world_facts": 2, "holdout": 2}
    # the first two questions: the same forget fingerprint as evaluating those two alone
    alone = evaluate_model(model, tiny_tokenizer, _sets(forget=FORGET[:2], holdout=HOLDOUT[:2]),
                           config=EvalConfig(batch_size=4, max_new_tokens=2, gradnorm_p=None, show_progress=False))
    assert alone["n_examples"]["retain"] == 4  # max_eval_examples None: all
    assert out["raw"]["forget_fingerprint"] == alone["raw"]["forget_fingerprint"]
    assert out["config"]["conventions"]["questions"].startswith("the first 2")


def test_privleak_needs_a_reference_scored_by_the_same_conventions(model, tiny_tokenizer, results):
    old = copy.deepcopy(results)
    del old["config"]["conventions"]  # as an older soulkit wrote it (Min-K% with the EOS token)
    for k in ("forget_nll", "holdout_nll"):
        del old["raw"][k]
    with pytest.warns(UserWarning, match="privleak is None: .*older soulkit"):
        out = evaluate_model(model, tiny_tokenizer, _sets(), config=CONFIG, reference=old)
    assert out["privleak"] is None and out["forget_quality"] == 1.0
    assert "reference" not in out["mia_auc"]  # no reference NLLs to attack with
