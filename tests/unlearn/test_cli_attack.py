"""``soulkit attack`` on the tiny test scale of test_cli_unlearn.py: every bad input is one line, exit 1,
nothing written; relearn, quantize and few-shot runs write results.json with the retrain control and
never modify the attacked model directory. The benchmark's models are trained once per module."""

import json
from pathlib import Path

import pytest

from soulkit.cli import build_parser, main
from soulkit.unlearn import suite as suite_mod
from soulkit.unlearn.attacks import AttackConfig, run_attack, split_forget_halves
from soulkit.unlearn.probes import neighbour_authors, phrasing_probes, related_records
from soulkit.unlearn.suite import UnlearningSuite

from .test_cli_unlearn import TINY, _hash_dir, _one_line_error, _tiny_scale  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("attack-cache")


@pytest.fixture(scope="module")
def finetuned(cache) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(suite_mod.SCALES, "tiny", TINY)
        return UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False).finetuned_dir()


def _bench(cache: Path) -> list[str]:
    return ["--scale", "tiny", "--cache-dir", str(cache), "--no-progress"]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--attack", "melt"], "unknown attack 'melt'; choose one of relearn, quantize, phrasings, multihop, "
                               "neighbours, sequential, few-shot"),
        (["--attack", "phrasings", "--seed", "1"], "--seed is not a setting of --attack phrasings"),
        (["--attack", "neighbours", "--steps", "5"], "--steps is not a setting of --attack neighbours"),
        (["--attack", "multihop", "--seed", "-1"], "--seed must be an int >= 0, got -1"),
        # the tiny scale's forget05 author has no book title in its QA to ask through (nothing is trained)
        (["--attack", "multihop"], "no multihop probe for forget05: no forget author has a book title"),
        (["--attack", "relearn", "--relearn-data", "wiki"], "unknown --relearn-data 'wiki'; choose one of "
                                                             "forget-half, related"),
        (["--attack", "quantize", "--relearn-data", "related"], "--relearn-data is not a setting of --attack quantize"),
        (["--attack", "sequential", "--requests", "0"], "--requests must be an int >= 1, got 0"),
        (["--attack", "sequential", "--method", "forget-it"], "unknown --method 'forget-it'; choose one of ga,"),
        (["--attack", "sequential", "--optimizer", "lion"], "unknown --optimizer 'lion'; choose one of adamw, sophia, "
                                                            "soul-released, signum"),
        (["--attack", "relearn", "--optimizer", "signum"], "unknown --optimizer 'signum'; choose one of adamw, sophia"),
        (["--attack", "relearn", "--requests", "2"], "--requests is not a setting of --attack relearn"),
        (["--attack", "quantize", "--method", "npo"], "--method is not a setting of --attack quantize"),
        # the tiny scale's forget05 holds one author
        (["--attack", "sequential", "--split", "forget05"], "4 sequential requests of 1 author(s) need 4 forget "
                                                            "authors, forget05 has 1"),
        (["--attack", "relearn", "--steps", "10,0,50"], "--steps takes relearning budgets, ints >= 1"),
        (["--attack", "relearn", "--steps", "-5"], "--steps takes relearning budgets, ints >= 1"),
        (["--attack", "relearn", "--steps", "ten"], "--steps takes relearning budgets, ints >= 1"),
        (["--attack", "quantize", "--bits", "3"], "--bits must be 4 or 8, got '3'"),
        (["--attack", "quantize", "--bits", "16"], "--bits must be 4 or 8, got '16'"),
        (["--attack", "quantize", "--bits", "four"], "--bits must be 4 or 8, got 'four'"),
        (["--attack", "quantize", "--group-size", "0"], "--group-size must be an int >= 1, got 0"),
        (["--attack", "quantize", "--group-size", "8", "--per-tensor"], "--per-tensor and --group-size exclude"),
        (["--attack", "quantize", "--steps", "10"], "--steps is not a setting of --attack quantize"),
        (["--attack", "relearn", "--bits", "8"], "--bits is not a setting of --attack relearn"),
        (["--attack", "relearn", "--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--attack", "relearn", "--optimizer", "sgd"], "unknown --optimizer 'sgd'; choose one of adamw, sophia"),
        (["--attack", "relearn", "--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
        (["--attack", "few-shot", "--shots", "0"], "--shots must be an int >= 1, got 0"),
        (["--attack", "quantize", "--split", "forget200"], "forget200"),
        (["--attack", "quantize", "--eval-examples", "0"], "--eval-examples must be 'all' or an int >= 1"),
    ],
)
def test_attack_argument_errors(extra, needle, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert main(["attack", *extra, *_bench(cache), "--out", str(out)]) == 1
    assert needle in _one_line_error(capsys)
    assert not out.exists()
    assert not (cache / "models").exists(), "an argument error must not train the benchmark's models"


def test_attack_names_are_all_in_the_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "attack" in sub.choices
    sub.choices["attack"].format_help()
    attack = next(a for a in sub.choices["attack"]._actions if a.dest == "attack")
    for name in ("relearn", "quantize", "phrasings", "multihop", "neighbours", "sequential", "few-shot"):
        assert name in attack.help


def test_model_dir_without_safetensors_and_missing(tmp_path, capsys):
    cache = tmp_path / "cache"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "pytorch_model.bin").write_bytes(b"not read")
    out = tmp_path / "out"
    assert main(["attack", str(bare), "--attack", "quantize", *_bench(cache), "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert f"model directory {bare} holds no .safetensors weights" in line
    assert main(["attack", str(tmp_path / "nope"), "--attack", "quantize", *_bench(cache), "--out", str(out)]) == 1
    assert f"model directory {tmp_path / 'nope'} does not exist" in _one_line_error(capsys)
    assert not out.exists() and not (cache / "models").exists()
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_out_with_results_is_refused(tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["attack", "--attack", "relearn", *_bench(cache), "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert "already holds results (results.json)" in line and "--overwrite" in line
    assert (out / "results.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert not (cache / "models").exists()


def test_out_inside_the_model_dir_is_refused(tmp_path, finetuned, cache, capsys):
    before = _hash_dir(finetuned)
    assert main(["attack", str(finetuned), "--attack", "quantize", *_bench(cache), "--out", str(finetuned)]) == 1
    assert "which an attack never modifies" in _one_line_error(capsys)
    assert _hash_dir(finetuned) == before


# ------------------------------------------------------------------------------------------ runs
def test_quantize_writes_results_and_leaves_the_model_alone(tmp_path, finetuned, cache, capsys):
    before = _hash_dir(finetuned)
    out = tmp_path / "q"
    argv = ["attack", str(finetuned), "--attack", "quantize", "--bits", "4", "--split", "forget10",
            *_bench(cache), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "wrote" in captured.out
    res = json.loads((out / "results.json").read_text())
    assert res["attack"] == "quantize" and res["split"] == "forget10"
    assert res["settings"] == {"attack": "quantize", "bits": 4, "group_size": None, "per_channel": True}
    for part in (res["before"], res["after"], res["control"]["before"], res["control"]["after"]):
        assert 0.0 <= part["forget_rouge"] <= 1.0 and part["model_utility"] is not None
    for part in (res["before"], res["after"], res["control"]["after"]):
        assert 0.0 <= part["forget_quality"] <= 1.0
    assert res["control_model_dir"].endswith("retrain-forget10-seed1")
    rec = res["recovery"]["forget_rouge"]
    assert rec["excess"] == pytest.approx(res["after"]["forget_rouge"] - res["control"]["after"]["forget_rouge"])
    assert res["change"]["forget_rouge"] == pytest.approx(res["after"]["forget_rouge"] - res["before"]["forget_rouge"])
    assert res["options"]["attack"] == "quantize" and res["options"]["bits"] == "4"
    assert _hash_dir(finetuned) == before

    # again without --overwrite: refused, results untouched; with it: replaced
    assert main(argv) == 1
    assert "already holds results" in _one_line_error(capsys)
    assert json.loads((out / "results.json").read_text()) == res
    bits = argv.index("--bits") + 1
    assert main([*argv[:bits], "8", *argv[bits + 1:], "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((out / "results.json").read_text())["settings"]["bits"] == 8
    assert _hash_dir(finetuned) == before


def test_relearn_default_model_with_the_retrain_control(tmp_path, finetuned, cache, capsys):
    before = _hash_dir(finetuned)
    out = tmp_path / "r"
    assert main(["attack", "--attack", "relearn", "--steps", "2,1", "--lr", "3e-3", "--batch-size", "2",
                 "--split", "forget10", *_bench(cache), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["model_dir"] == str(finetuned) and res["model_stage"] == "finetuned"
    assert res["settings"]["steps"] == [1, 2] and res["settings"]["lr"] == 3e-3
    assert sorted(res["after"]) == ["1", "2"] and sorted(res["control"]["after"]) == ["1", "2"]
    assert len(res["losses"]) == 2 and len(res["control"]["losses"]) == 2
    # evaluated on the held-out half only, the attack half is not evaluated
    forget, _ = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False).benchmark.split("forget10")
    attack_half, held_out = split_forget_halves(forget, 0)
    assert res["attack_set"] == [r.question for r in attack_half]
    assert res["eval_questions"] == len(held_out) == res["before"]["n_examples"]["forget"]
    assert res["control"]["before"]["n_examples"]["forget"] == len(held_out)
    for b in ("1", "2"):
        rec = res["recovery"][b]["forget_rouge"]
        assert rec["attacked"] == res["after"][b]["forget_rouge"]
        assert rec["control"] == res["control"]["after"][b]["forget_rouge"]
        assert rec["excess"] == pytest.approx(rec["attacked"] - rec["control"])
        assert 0.0 <= res["after"][b]["forget_quality"] <= 1.0
    assert _hash_dir(finetuned) == before


def test_relearn_on_related_text(tmp_path, finetuned, cache, capsys):
    out = tmp_path / "rel"
    assert main(["attack", "--attack", "relearn", "--relearn-data", "related", "--steps", "2", "--lr", "3e-3",
                 "--batch-size", "4", "--split", "forget10", *_bench(cache), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    suite = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False)
    forget, _ = suite.benchmark.split("forget10")
    related = related_records(suite.benchmark, suite.benchmark.forget_authors("forget10"))
    assert res["settings"]["relearn_data"] == "related" and res["attack_data"] == "related"
    assert res["attack_set"] == [r.question for r in related]
    # evaluated on the same held-out half as relearning on the forget half, so the two compare directly
    assert res["eval_questions"] == len(split_forget_halves(forget, 0)[1]) == res["after"]["2"]["n_examples"]["forget"]
    rec = res["recovery"]["2"]["forget_probability"]
    assert rec["excess"] == pytest.approx(rec["attacked"] - rec["control"])


def test_few_shot_probe_that_does_not_fit_is_one_line(tmp_path, finetuned, cache, capsys):
    # the tiny scale's context (96 positions) holds no shot; the probe itself is tested in test_attacks.py
    out = tmp_path / "f"
    assert main(["attack", "--attack", "few-shot", "--shots", "1", "--split", "forget10", *_bench(cache),
                 "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert "few-shot prompts with 1 shot(s) do not fit" in line and "use fewer shots" in line
    assert not out.exists()


def test_run_attack_api_does_not_write(tmp_path, finetuned, cache):
    suite = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False)
    suite.reference("forget10")  # the model cache's own files (retrain, its cached evaluation) exist already
    listing = sorted(p for p in cache.rglob("*"))
    res = run_attack(suite, "forget10", AttackConfig("quantize", bits=8, group_size=8))
    assert res["settings"]["group_size"] == 8 and res["model_dir"] == str(finetuned)
    assert sorted(p for p in cache.rglob("*")) == listing
    with pytest.raises(TypeError, match="AttackConfig"):
        run_attack(suite, "forget10", {"attack": "quantize"})
    with pytest.raises(ValueError, match="forget0"):
        run_attack(suite, "forget0", AttackConfig("quantize"))


# ------------------------------------------------------------------------------------------ probes
def test_phrasings_probe_reports_both_ends(tmp_path, finetuned, cache, capsys):
    before = _hash_dir(finetuned)
    out = tmp_path / "p"
    assert main(["attack", str(finetuned), "--attack", "phrasings", "--split", "forget10", *_bench(cache),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "| trained questions | probes |" in captured.out
    res = json.loads((out / "results.json").read_text())
    suite = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False)
    forget, _ = suite.benchmark.split("forget10")
    probes = phrasing_probes(suite.benchmark, forget)
    assert res["probe_set"] == [{"question": p.question, "source": p.extra["source"], "probe": p.extra["probe"]}
                                for p in probes]
    assert res["sets"] == {"trained": len(forget), "probe": len(probes)}
    sc = res["scores"]
    assert sc["finetuned"] == sc["model"]  # the model attacked is the finetuned one: scored once
    for who in ("model", "retrain"):
        for name in ("trained", "probe"):
            assert 0.0 <= sc[who][name]["rouge"] <= 1.0 and 0.0 < sc[who][name]["probability"] <= 1.0
    assert set(sc["model"]["probe"]["by_kind"]) == {"unused", "novel"}
    assert res["before"]["forget_rouge"] == sc["model"]["trained"]["rouge"]
    assert res["after"]["forget_probability"] == sc["model"]["probe"]["probability"]
    assert res["control"]["after"]["forget_rouge"] == sc["retrain"]["probe"]["rouge"]
    assert res["margin"]["probe"]["rouge"] == pytest.approx(sc["finetuned"]["probe"]["rouge"]
                                                            - sc["retrain"]["probe"]["rouge"])
    assert res["recovery"]["forget_rouge"]["excess"] == pytest.approx(res["margin"]["probe"]["rouge"])
    assert 0.0 <= res["evaluation"]["forget_quality"] <= 1.0 and res["summary"]["model"]["model_utility"] is not None
    assert _hash_dir(finetuned) == before


def test_neighbours_probe_without_neighbours_says_so(tmp_path, finetuned, cache, capsys):
    out = tmp_path / "n"
    assert main(["attack", "--attack", "neighbours", "--split", "forget10", *_bench(cache), "--out", str(out)]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert res["neighbours"]["n_neighbours"] == 0 and "no retain author of forget10 shares" in res["note"]
    assert list(res["sets"]) == ["others"] and res["sets"]["others"] == 12
    assert res["after"]["other_retain_rouge"] == res["scores"]["model"]["others"]["rouge"]
    assert res["before"] == res["after"]  # the finetuned model attacked: nothing changed


def test_neighbours_probe_with_a_neighbour(finetuned, cache):
    suite = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False)
    nb = neighbour_authors(suite.benchmark, "forget40")
    assert nb == {"Carl Forsgren": ["genre"]}  # the tiny scale's one neighbour (seed 0)
    res = run_attack(suite, "forget40", AttackConfig("neighbours"))
    assert res["neighbours"]["by_attribute"]["genre"] == ["Carl Forsgren"]
    assert res["neighbours"]["by_attribute"]["award"] == [] and res["neighbours"]["n_retain_authors"] == 3
    assert res["sets"] == {"neighbours": 3, "others": 6}  # Carl's genre question is not among his 3 QA
    for key in ("neighbour_rouge", "other_retain_rouge", "neighbour_probability"):
        assert 0.0 <= res["after"][key] <= 1.0 and key in res["control"]["after"]


# ------------------------------------------------------------------------------------------ sequential
@pytest.mark.slow  # ~14 s: two unlearning runs and four evaluations
def test_sequential_requests_one_after_another(tmp_path, finetuned, cache, capsys):
    before = _hash_dir(finetuned)
    out = tmp_path / "s"
    assert main(["attack", "--attack", "sequential", "--requests", "2", "--method", "ga", "--lr", "3e-3",
                 "--split", "forget40", *_bench(cache), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "after request 2" in captured.out
    res = json.loads((out / "results.json").read_text())
    assert res["requests"] == [["Meta Schmidt"], ["Santiago Rangel"]] and res["request_questions"] == [3, 3]
    assert res["settings"] == {"attack": "sequential", "method": "ga", "optimizer": "adamw", "lr": 3e-3,
                               "requests": 2, "seed": 0}
    assert res["unlearn_config"]["lr"] == 3e-3 and [r["request"] for r in res["runs"]] == [1, 2]
    assert all(r["stopped"] == "completed" and r["steps"] >= 1 for r in res["runs"])
    # the forget set after request j is the authors forgotten so far; the retrain is evaluated on the same set
    assert res["before"]["n_examples"]["forget"] == 6
    assert [res["after"][j]["n_examples"]["forget"] for j in ("1", "2")] == [3, 6]
    assert [res["control"]["after"][j]["n_examples"]["forget"] for j in ("1", "2")] == [3, 6]
    for j in ("1", "2"):
        assert 0.0 <= res["after"][j]["forget_quality"] <= 1.0
    # every request's own scores after 0, 1, 2 requests: gradient ascent drives each one down when it is unlearned
    per = res["per_request"]
    assert sorted(per) == ["0", "1", "2"] and all(len(per[k]) == 2 for k in per)
    assert per["1"][0]["probability"] < 0.5 * per["0"][0]["probability"]
    assert per["2"][1]["probability"] < 0.5 * per["1"][1]["probability"]
    assert _hash_dir(finetuned) == before


def _untimed(d):
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items() if not k.endswith("_seconds")}
    return d


def test_run_attack_cache_computes_the_control_once_and_changes_nothing(finetuned, cache, monkeypatch):
    from soulkit.unlearn import attacks

    suite = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False)
    other = suite.retrained_dir("forget10", seed=2)  # a second attacked model
    configs = [AttackConfig("relearn", steps=(1, 2), seed=3), AttackConfig("phrasings")]
    plain = {(c.attack, m): run_attack(suite, "forget10", c, model_dir=m) for c in configs for m in (finetuned, other)}
    calls = []
    real = attacks.relearn_budgets
    monkeypatch.setattr(attacks, "relearn_budgets", lambda m, *a, **k: calls.append(k.get("desc")) or real(m, *a, **k))
    memo: dict = {}
    for c in configs:
        for m in (finetuned, other):
            res = run_attack(suite, "forget10", c, model_dir=m, cache=memo)
            ref = plain[(c.attack, m)]
            for k in ("before", "after", "control", "recovery"):
                assert _untimed(res[k]) == _untimed(ref[k]), (c.attack, m, k)
            res["control"]["after"].clear()  # what a caller does with its copy does not reach the cache
    assert calls == ["relearn model", "relearn retrain", "relearn model"]  # the control relearnt once
    assert len(memo) == 4  # relearn: reference + control; phrasings: the retrain's and the finetuned model's scores
