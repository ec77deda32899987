"""``soulkit data / evaluate / unlearn / demo`` end to end on a tiny benchmark scale.

Every command gets ``--cache-dir`` under ``tmp_path`` (the default cache is never touched) and runs on
one torch thread; the whole file takes well under a minute on 2 CPU cores.
"""

import hashlib
import json
from pathlib import Path

import pytest

from soulkit.cli import build_parser, main
from soulkit.unlearn import suite as suite_mod
from soulkit.unlearn.data import AuthorBenchmark
from soulkit.unlearn.evaluate import EvalConfig
from soulkit.unlearn.models import (
    ModelConfig,
    TrainRecipe,
    build_model,
    load_model,
    save_model,
    train_tokenizer,
)
from soulkit.unlearn.suite import Scale, UnlearningSuite

TINY = Scale(
    5, 3,
    TrainRecipe(model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96),
                vocab_size=400, pretrain_epochs=2, finetune_max_epochs=4, check_every=2, target_rouge=0.99,
                batch_size=16),
    EvalConfig(max_eval_examples=20, max_new_tokens=12, show_progress=False),
    "test scale: 5 authors x 3 QA",
)
RESULT_FIELDS = ("forget_quality", "ks_statistic", "model_utility", "forget_rouge", "retain_rouge",
                 "forget_truth_ratio", "mia_auc", "privleak", "method", "optimizer", "split", "seed", "lr")


@pytest.fixture(autouse=True)
def _tiny_scale(monkeypatch):
    monkeypatch.setitem(suite_mod.SCALES, "tiny", TINY)


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


def _bench(cache: Path) -> list[str]:
    return ["--scale", "tiny", "--cache-dir", str(cache), "--no-progress"]


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("soulkit"), lines[0]
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def _hash_dir(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "forget-harder"], "unknown method 'forget-harder'"),
        (["--method", "ga", "--optimizer", "sgd"], "unknown optimizer 'sgd'"),
        (["--method", "ga", "--optimizer", "adamw", "--rho", "0.05"],
         "--rho is not a setting of --optimizer adamw; add --optimizer sophia"),
        (["--method", "ga", "--optimizer", "adamw", "--hessian-interval", "5"], "add --optimizer sophia"),
        (["--method", "ga", "--optimizer", "adamw", "--rho", "0.05", "--hessian-interval", "5"],
         "--rho and --hessian-interval are not a setting of --optimizer adamw; add --optimizer sophia"),
        (["--method", "ga", "--estimator", "exact"], "UnlearnConfig.estimator must be one of ('gnb', 'hutchinson')"),
        (["--method", "ga", "--split", "forget200"], "forget200"),
        (["--method", "ga", "--split", "retain90"], "retain90"),
        (["--method", "ga", "--gamma", "0.5"], "gamma"),
        (["--method", "ga", "--truth-ratio", "harmonic"],
         "--truth-ratio must be one of geometric, arithmetic, got 'harmonic'"),
        (["--method", "ga", "--eval-examples", "0"], "--eval-examples must be 'all' or an int >= 1, got '0'"),
        (["--method", "ga", "--eval-examples", "some"], "--eval-examples must be 'all' or an int >= 1, got 'some'"),
        (["--method", "ga", "--eval-subset", "random"], "--eval-subset must be one of seeded, first, got 'random'"),
        (["--method", "ga", "--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1, got 0"),
        (["--method", "ga", "--parallel", "ddp"], "--parallel ddp needs several processes: start the command with "
                                                  "torchrun --nproc-per-node N -m soulkit unlearn"),
        (["--method", "ga", "--parallel", "tp"], "--parallel must be one of ddp, fsdp2, got 'tp'"),
    ],
)
def test_unlearn_argument_errors(extra, needle, tmp_path, cache, capsys):
    out = tmp_path / "out"
    assert main(["unlearn", *extra, *_bench(cache), "--out", str(out)]) == 1
    assert needle in _one_line_error(capsys)
    assert not (out / "results.json").exists() and not (out / "model").exists()
    assert not (cache / "models").exists() or not any((cache / "models").rglob("finetuned")), \
        "an argument error must not train the benchmark's models"


def test_unknown_scale(tmp_path, cache, capsys):
    assert main(["unlearn", "--method", "ga", "--scale", "huge", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "o")]) == 1
    line = _one_line_error(capsys)
    assert "unknown scale 'huge'" in line and "tiny" in line
    assert main(["evaluate", str(tmp_path), "--scale", "huge", "--cache-dir", str(cache)]) == 1
    assert "unknown scale 'huge'" in _one_line_error(capsys)
    assert main(["data", "--out", str(tmp_path / "d"), "--scale", "huge"]) == 1
    assert "unknown scale 'huge'" in _one_line_error(capsys)
    assert not (tmp_path / "d").exists()


def test_missing_model_dirs(tmp_path, cache, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["unlearn", "--method", "npo", "--model", str(missing), *_bench(cache),
                 "--out", str(tmp_path / "o")]) == 1
    assert f"model directory {missing} does not exist" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    assert main(["evaluate", str(missing), *_bench(cache), "--out", str(tmp_path / "e")]) == 1
    assert f"model directory {missing} does not exist" in _one_line_error(capsys)
    assert not (tmp_path / "e").exists()


def test_out_with_results_is_refused(tmp_path, cache, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["unlearn", "--method", "ga", *_bench(cache), "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert "already holds results (results.json)" in line and "--overwrite" in line
    assert (out / "results.json").read_text() == "{}"  # untouched
    # evaluate refuses before evaluating (a non-model directory is never loaded)
    assert main(["evaluate", str(tmp_path), *_bench(cache), "--out", str(out)]) == 1
    assert "already holds results (results.json)" in _one_line_error(capsys)
    assert (out / "results.json").read_text() == "{}"


def test_foreign_tokenizer_is_rejected(tmp_path, cache, capsys):
    texts = ["The quick brown fox jumps over the lazy dog.", "Lorem ipsum dolor sit amet, consectetur.",
             "Pack my box with five dozen liquor jugs."] * 5
    tok = train_tokenizer(texts, vocab_size=320, min_frequency=1)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_positions=96), tok, seed=0)
    foreign = save_model(model, tok, tmp_path / "foreign")
    capsys.readouterr()  # transformers' own output while saving
    out = tmp_path / "out"
    argv = ["unlearn", "--method", "graddiff", "--model", str(foreign), *_bench(cache), "--out", str(out)]
    assert main([*argv, "--steps", "1"]) == 1
    assert "tokenizer does not match the benchmark's tokenizer" in _one_line_error(capsys)
    assert not (out / "model").exists() and not (out / "results.json").exists()
    assert not any((cache / "models").rglob("finetuned")), "the benchmark's models were not needed"


def test_demo_stage_names(tmp_path, capsys):
    assert main(["demo", "--only", "nosuchstage", "--out", str(tmp_path)]) == 1
    line = _one_line_error(capsys)
    assert "unknown demo stage nosuchstage" in line and "unlearn" in line
    assert main(["demo", "--only", "unlearn,nosuchstage", "--out", str(tmp_path)]) == 1
    assert "unknown demo stage nosuchstage" in _one_line_error(capsys)
    assert not any(tmp_path.iterdir())

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    only = next(a for a in sub.choices["demo"]._actions if a.dest == "only")
    assert "unlearn" in only.help and "train" in only.help
    assert {"data", "evaluate", "unlearn", "demo"} <= set(sub.choices)
    assert parser.parse_args(["demo", "--only", "unlearn"]).only == "unlearn"


# ------------------------------------------------------------------------------------------ data
def test_data_roundtrip_and_refusal(tmp_path, cache, capsys):
    d = tmp_path / "bench"
    assert main(["data", "--out", str(d), "--authors", "5", "--qa-per-author", "3", "--seed", "1"]) == 0
    assert "wrote 5 authors x 3 QA (15 pairs)" in capsys.readouterr().out
    bench = AuthorBenchmark.load(d)
    assert len(bench.authors) == 5 and len(bench.qa) == 15 and bench.qa_per_author == 3
    meta = (d / "meta.json").read_text()

    assert main(["data", "--out", str(d), "--authors", "6"]) == 1
    assert "already holds results" in _one_line_error(capsys)
    assert (d / "meta.json").read_text() == meta
    assert len(AuthorBenchmark.load(d).authors) == 5

    # --data is read (and its splits validated) by unlearn and evaluate
    out = tmp_path / "out"
    assert main(["unlearn", "--method", "ga", "--data", str(d), "--split", "forget0",
                 "--cache-dir", str(cache), "--out", str(out), "--no-progress"]) == 1
    assert "forget0" in _one_line_error(capsys)
    assert main(["unlearn", "--method", "ga", "--data", str(d), "--model", str(tmp_path / "nope"),
                 "--cache-dir", str(cache), "--out", str(out), "--no-progress"]) == 1
    assert "does not exist" in _one_line_error(capsys)  # the data loaded fine and the split was accepted
    assert main(["unlearn", "--method", "ga", "--data", str(tmp_path / "no-bench"), "--cache-dir", str(cache),
                 "--out", str(out), "--no-progress"]) == 1
    assert "not a saved AuthorBenchmark" in _one_line_error(capsys)
    assert not out.exists()

    assert main(["data", "--out", str(d), "--authors", "6", "--qa-per-author", "3", "--overwrite"]) == 0
    capsys.readouterr()
    assert len(AuthorBenchmark.load(d).authors) == 6


# ------------------------------------------------------------------------------------------ happy path
def test_unlearn_evaluate_overwrite(tmp_path, cache, capsys):
    # the finetuned model comes from the cache the CLI uses; it must never be written to
    ft = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False).finetuned_dir()
    assert ft.is_dir() and cache in ft.parents
    before = _hash_dir(ft)

    out = tmp_path / "out"
    argv = ["unlearn", "--method", "graddiff", "--optimizer", "sophia", "--split", "forget10", *_bench(cache),
            "--out", str(out), "--steps", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "graddiff x sophia: 3 steps" in captured.out

    res = json.loads((out / "results.json").read_text())
    missing = [k for k in RESULT_FIELDS if k not in res]
    assert not missing, missing
    assert (res["method"], res["optimizer"], res["split"]) == ("graddiff", "sophia", "forget10")
    assert res["steps"] == 3
    assert res["seed"] == 0 and res["lr"] > 0
    assert 0.0 <= res["forget_quality"] <= 1.0 and 0.0 <= res["ks_statistic"] <= 1.0
    assert 0.0 <= res["forget_rouge"] <= 1.0 and 0.0 <= res["retain_rouge"] <= 1.0
    assert res["model_dir"] == str(out / "model")
    assert res["config"]["show_progress"] is False and res["config"]["steps"] == 3

    model, tok = load_model(out / "model")
    assert model.config.hidden_size == 32 and len(tok) <= model.get_input_embeddings().weight.shape[0]
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 3
    assert [json.loads(ln)["step"] for ln in log] == [1, 2, 3]
    assert _hash_dir(ft) == before, "the source model directory was modified"
    assert not (out / "checkpoint").exists()  # removed once the model is saved

    # evaluate the unlearned model (the retrain references are cached by now)
    out2 = tmp_path / "eval"
    assert main(["evaluate", str(out / "model"), "--split", "forget10", *_bench(cache),
                 "--out", str(out2)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    ev = json.loads((out2 / "results.json").read_text())
    assert 0.0 <= ev["forget_quality"] <= 1.0
    assert ev["split"] == "forget10" and ev["model_dir"] == str(out / "model")
    assert ev["forget_quality"] == pytest.approx(res["forget_quality"])  # same model, same references

    # the same command again: the run is complete, nothing is redone; other options are refused, naming them
    assert main(argv) == 0
    assert "holds this run's results already" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == res
    assert main([*argv[:-2], "--steps", "4"]) == 1
    line = _one_line_error(capsys)
    assert "other options (--steps 3 -> 4)" in line and "--overwrite" in line
    assert json.loads((out / "results.json").read_text()) == res
    # killed during the final evaluation (model written, no results): the same command evaluates the model
    (out / "results.json").unlink()
    model_mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "was written before the run was interrupted: evaluating it" in printed
    again = json.loads((out / "results.json").read_text())
    assert again["forget_quality"] == pytest.approx(res["forget_quality"]) and again["steps"] == 3
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime  # not trained again

    assert main([*argv, "--optimizer", "adamw", "--overwrite"]) == 0
    assert "graddiff x adamw: 3 steps" in capsys.readouterr().out
    res2 = json.loads((out / "results.json").read_text())
    assert res2["optimizer"] == "adamw" and res2["steps"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    load_model(out / "model")
    assert _hash_dir(ft) == before


def test_evaluate_on_qa_files_with_a_reference(tmp_path, capsys):
    """Any local model on TOFU-style files: first the retain model's results, then others against it."""
    from soulkit.unlearn.data import generate_benchmark, write_jsonl

    bench = generate_benchmark(5, qa_per_author=3, n_perturbed=3)
    forget, retain = bench.split("forget10")
    files = {"forget": forget, "retain": retain, "real-authors": bench.real_authors[:6],
             "world-facts": bench.world_facts[:6], "holdout": bench.holdout[:3]}
    argv = []
    for name, recs in files.items():
        write_jsonl(tmp_path / f"{name}.jsonl", recs)
        argv += [f"--{name}", str(tmp_path / f"{name}.jsonl")]
    tok = train_tokenizer([r.question + " " + r.answer for r in bench.qa], vocab_size=400, min_frequency=1)
    model_dir = save_model(build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96),
                                       tok), tok, tmp_path / "retain-model")
    assert main(["evaluate", str(model_dir), *argv, "--out", str(tmp_path / "ref"), "--no-progress"]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref["forget_quality"] is None and len(ref["raw"]["forget_truth_stat"]) == len(forget)
    assert main(["evaluate", str(model_dir), *argv, "--reference", str(tmp_path / "ref" / "results.json"),
                 "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["forget_quality"] == pytest.approx(1.0) and again["ks_statistic"] == pytest.approx(0.0)
    capsys.readouterr()
    assert main(["evaluate", str(model_dir), "--forget", str(tmp_path / "forget.jsonl"), "--out",
                 str(tmp_path / "x")]) != 0
    assert "--retain" in _one_line_error(capsys)
    # QA files default to the references' settings; the flags change them and results.json says so
    assert ref["config"]["max_eval_examples"] is None and ref["config"]["max_new_tokens"] == 200
    assert ref["config"]["truth_ratio"] == "geometric" and ref["n_examples"]["forget"] == len(forget)
    assert ref["config"]["conventions"]["questions"].startswith("all questions")
    assert main(["evaluate", str(model_dir), *argv, "--out", str(tmp_path / "ari"), "--no-progress",
                 "--truth-ratio", "arithmetic", "--eval-examples", "2", "--eval-subset", "first",
                 "--max-new-tokens", "3"]) == 0
    ari = json.loads((tmp_path / "ari" / "results.json").read_text())
    assert (ari["config"]["truth_ratio"], ari["config"]["max_eval_examples"], ari["config"]["subset"],
            ari["config"]["max_new_tokens"]) == ("arithmetic", 2, "first", 3)
    assert ari["n_examples"] == {"forget": 2, "retain": 2, "real_authors": 2, "world_facts": 2, "holdout": 2}
    for argv_bad, needle in [(["--truth-ratio", "mean"], "--truth-ratio must be one of geometric, arithmetic"),
                             (["--eval-examples", "-1"], "--eval-examples must be 'all' or an int >= 1")]:
        capsys.readouterr()
        assert main(["evaluate", str(model_dir), *argv, "--out", str(tmp_path / "bad"), *argv_bad]) == 1
        assert needle in _one_line_error(capsys)
        assert not (tmp_path / "bad").exists()


def test_unlearn_eval_every_records_progress(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["unlearn", "--method", "npo", "--optimizer", "adamw", "--split", "forget10", *_bench(cache),
                 "--out", str(out), "--steps", "2", "--eval-every", "1", "--eval-examples", "2",
                 "--eval-subset", "first"]) == 0
    progress = json.loads((out / "results.json").read_text())["progress"]
    res = json.loads((out / "results.json").read_text())
    # the evaluation flags reach the evaluation (and its retrain references, else forget quality would refuse
    # a reference evaluated on other questions)
    assert (res["eval_config"]["max_eval_examples"], res["eval_config"]["subset"]) == (2, "first")
    assert res["eval_config"]["conventions"]["questions"].startswith("the first 2")
    assert set(res["n_examples"].values()) == {2} and res["forget_quality"] is not None
    assert [p["step"] for p in progress] == [1, 2]  # every step; the last one is the final evaluation
    assert all(0.0 < p["forget_probability"] <= 1.0 and 0.0 < p["retain_probability"] <= 1.0 for p in progress)


# the checkout on sys.path, not tests/ itself: tests/kernels would shadow the ``kernels`` package transformers imports
_CLI_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
from soulkit.unlearn import suite
from tests.unlearn.test_cli_unlearn import TINY
suite.SCALES["tiny"] = TINY
from soulkit.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_killed_unlearn_run_resumes_with_the_same_command(tmp_path, cache):
    import os
    import subprocess
    import sys

    from .._kill import kill_when

    UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False).finetuned_dir()  # models cached first
    script = tmp_path / "cli.py"
    script.write_text(_CLI_SCRIPT.format(root=str(Path(__file__).resolve().parents[2])))
    out = tmp_path / "out"
    argv = [sys.executable, str(script), "unlearn", "--method", "ga", "--split", "forget10", *_bench(cache),
            "--out", str(out), "--steps", "30", "--checkpoint-every", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    info = out / "checkpoint" / "trainer.json"
    kill_when(argv, lambda: info.exists() and json.loads(info.read_text()).get("step", 0) >= 4, env=env,
              timeout=240, poll=0.05)
    killed_at = json.loads(info.read_text())["step"]
    assert 4 <= killed_at < 30 and not (out / "results.json").exists()

    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming the run" in res.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 30
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31)), "the resumed log has gaps or repeats"
    assert not (out / "checkpoint").exists()
