"""soulkit.unlearn.suite: scales, default unlearning settings, and an UnlearningSuite wired to tiny saved
models (no training): its evaluation sets, cached retrain references, tokenizer check and unlearning run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from soulkit.unlearn import suite as suite_mod
from soulkit.unlearn.data import generate_benchmark
from soulkit.unlearn.evaluate import EvalConfig, EvalSets
from soulkit.unlearn.models import TrainRecipe, build_model, save_model, train_tokenizer
from soulkit.unlearn.suite import SCALES, Scale, UnlearningSuite, default_unlearn_config
from soulkit.unlearn.unlearner import UnlearnConfig

from ._corpus import ARCH

EVAL = EvalConfig(max_eval_examples=6, max_new_tokens=4, batch_size=8, show_progress=False)


# ------------------------------------------------------------------------------------------ settings
def test_scales_are_well_formed():
    assert {"demo", "small", "tofu"} <= set(SCALES)
    for name, s in SCALES.items():
        assert isinstance(s, Scale) and isinstance(s.recipe, TrainRecipe) and isinstance(s.eval, EvalConfig)
        assert s.n_authors >= 2 and s.qa_per_author >= 1 and s.description, name
    assert (SCALES["tofu"].n_authors, SCALES["tofu"].qa_per_author) == (200, 20)  # TOFU's size
    # the references' evaluation settings; only the two smaller scales subsample their sets
    assert SCALES["tofu"].eval == EvalConfig()
    assert all(s.eval.max_new_tokens == 200 and s.eval.truth_ratio == "geometric" for s in SCALES.values())
    assert (SCALES["demo"].eval.max_eval_examples, SCALES["small"].eval.max_eval_examples) == (100, 200)


def test_default_unlearn_config():
    c = default_unlearn_config("graddiff", "sophia")
    assert isinstance(c, UnlearnConfig)
    assert (c.lr, c.epochs, c.batch_size) == (2e-4, 5.0, 8)
    assert c.optimizer_kwargs == {"rho": 1.0}
    assert default_unlearn_config("graddiff", "adamw").optimizer_kwargs == {}
    assert default_unlearn_config("someday", "adamw").lr == 1e-4  # not in the sweep: the common lr
    c = default_unlearn_config("npo", "sophia", steps=3, optimizer_kwargs={"hessian_update_interval": 2})
    assert c.steps == 3 and c.optimizer_kwargs == {"rho": 1.0, "hessian_update_interval": 2}
    assert default_unlearn_config("npo", "sophia", optimizer_kwargs={"rho": 0.1}).optimizer_kwargs == {"rho": 0.1}
    with pytest.raises(ValueError, match="UnlearnConfig.lr"):
        default_unlearn_config("npo", "adamw", lr=0.0)


def test_from_scale_validates_and_loads_saved_data(tmp_path):
    with pytest.raises(ValueError, match="unknown scale 'huge'; choose one of demo, small, tofu"):
        UnlearningSuite.from_scale("huge", cache_dir=tmp_path)
    bench = generate_benchmark(5, qa_per_author=3, n_perturbed=3, seed=4)
    bench.save(tmp_path / "data")
    scale = Scale(9, 2, TrainRecipe(model=ARCH, vocab_size=400), EVAL, "test")
    suite = UnlearningSuite.from_scale(scale, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                       progress=False)
    assert suite.benchmark == bench  # the saved data, not 9 generated authors
    assert suite.eval_config == EVAL and suite.zoo.recipe == scale.recipe
    generated = UnlearningSuite.from_scale(scale, seed=1, cache_dir=tmp_path / "cache")
    assert len(generated.benchmark.authors) == 9 and generated.benchmark.seed == 1
    assert UnlearningSuite(bench, eval_config=EVAL, cache_dir=tmp_path, progress=True).eval_config.show_progress


# ------------------------------------------------------------------------------------------ a wired suite
@pytest.fixture()
def suite(tmp_path, monkeypatch):
    """A 5-author suite whose finetuned model and retrains are untrained tiny Llamas saved on disk."""
    bench = generate_benchmark(5, qa_per_author=3, n_perturbed=3)
    s = UnlearningSuite(bench, TrainRecipe(model=ARCH, vocab_size=400), eval_config=EVAL,
                        cache_dir=tmp_path / "cache", progress=False)
    tok = s.zoo.tokenizer()
    dirs = {}

    def model_dir(name: str, seed: int):
        if name not in dirs:
            dirs[name] = save_model(build_model(ARCH, tok, seed=seed), tok, tmp_path / "models" / name)
        return dirs[name]

    monkeypatch.setattr(s.zoo, "finetuned", lambda: model_dir("finetuned", 0))
    monkeypatch.setattr(s.zoo, "retrained", lambda split, seed=1: model_dir(f"retrain-{split}-{seed}", 10 + seed))
    return s


def test_eval_sets_of_a_split(suite):
    sets = suite.eval_sets("forget10")
    forget, retain = suite.benchmark.split("forget10")
    assert isinstance(sets, EvalSets)
    assert (sets.forget, sets.retain) == (forget, retain)
    assert sets.real_authors == suite.benchmark.real_authors and sets.world_facts == suite.benchmark.world_facts
    assert sets.holdout == suite.benchmark.holdout
    with pytest.raises(ValueError, match="unknown split"):
        suite.eval_sets("forget")


def test_references_are_evaluated_once_and_cached(suite, monkeypatch):
    calls = []
    real = suite_mod.evaluate_model

    def counting(model, tok, sets, **kw):
        calls.append(kw)
        return real(model, tok, sets, **kw)

    monkeypatch.setattr(suite_mod, "evaluate_model", counting)
    ref = suite.reference("forget10", seed=1)
    assert len(calls) == 1 and "reference" not in calls[0]
    cached = suite.reference_path("forget10", seed=1)
    assert cached.parent == suite.zoo.root and cached.name.startswith("eval-forget10-retrain-seed1-")
    assert json.loads(cached.read_text()) == json.loads(json.dumps(ref))
    assert suite.reference("forget10", seed=1) == json.loads(cached.read_text()) and len(calls) == 1

    res = suite.evaluate_dir(suite.finetuned_dir(), "forget10")
    assert len(calls) == 3  # the seed-2 retrain (ceiling), then the model itself
    assert calls[-1]["reference"] == json.loads(cached.read_text())
    assert res["split"] == "forget10" and res["model_dir"] == str(suite.finetuned_dir())
    assert 0.0 <= res["forget_quality"] <= 1.0 and 0.0 <= res["forget_quality_ceiling"] <= 1.0
    # another setting that changes numbers is another cache file (no reference computed otherwise is reused)
    quiet = suite.reference_path("forget10", seed=1)
    suite.eval_config = replace(EVAL, show_progress=True, batch_size=3)
    assert suite.reference_path("forget10", seed=1) == quiet  # progress bars and batching change no number
    suite.eval_config = replace(EVAL, truth_ratio="arithmetic")
    assert suite.reference_path("forget10", seed=1) != quiet
    suite.eval_config = EVAL
    without = suite.evaluate_dir(suite.finetuned_dir(), "forget10", with_ceiling=False)
    assert without["forget_quality_ceiling"] is None
    assert without["forget_quality"] == pytest.approx(res["forget_quality"])


def test_a_foreign_tokenizer_is_refused(suite):
    foreign = train_tokenizer(["some other text entirely, nothing like the benchmark"] * 3, vocab_size=300,
                              min_frequency=1)
    model = build_model(ARCH, foreign)
    with pytest.raises(ValueError, match="does not match the benchmark's tokenizer"):
        suite.evaluate(model, foreign, "forget10")


def test_bad_split_or_objective_fails_before_any_work(suite):
    with pytest.raises(ValueError, match="unknown split"):
        suite.unlearn("npo", "adamw", "forget")
    with pytest.raises(ValueError, match="unknown unlearning objective"):
        suite.unlearn("nope", "adamw", "forget10")
    assert not suite.reference_path("forget10", seed=1).exists()


def test_unlearn_reports_the_run(suite, tmp_path):
    config = default_unlearn_config("graddiff", "sophia", steps=2, batch_size=2, eval_every=1,
                                    optimizer_kwargs={"hessian_update_interval": 1})
    results, run = suite.unlearn("graddiff", "sophia", "forget10", config=config, out_dir=tmp_path / "run")
    assert run.steps == 2 and run.stopped == "completed" and run.model_dir == tmp_path / "run" / "model"
    assert (results["method"], results["optimizer"], results["split"], results["steps"]) == (
        "graddiff", "sophia", "forget10", 2)
    assert results["lr"] == config.lr and results["config"] == config.to_dict()
    assert results["final_loss"] == run.log[-1]["loss"]
    win = [e["win_rate"] for e in run.log]
    assert results["mean_win_rate"] == pytest.approx(sum(win) / len(win))
    assert [p["step"] for p in results["progress"]] == [1, 2]
    assert all(0.0 < p["forget_probability"] < 1.0 for p in results["progress"])
    assert 0.0 <= results["forget_quality"] <= 1.0
    assert results["eval_config"]["conventions"]["truth_ratio"].startswith("geometric")  # the evaluation's

    quick, _ = suite.unlearn("graddiff", "adamw", "forget10", evaluate=False,
                             config=default_unlearn_config("graddiff", "adamw", steps=1, batch_size=2))
    assert quick["split"] == "forget10" and "forget_quality" not in quick
    assert quick["mean_win_rate"] is None and quick["progress"] == []
