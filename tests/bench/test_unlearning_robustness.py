"""benchmarks/unlearning_robustness.py: --merge of a written results JSON, and the equal-forgetting comparison."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "unlearning_robustness.py"


@pytest.fixture(scope="module")
def robustness():
    saved = list(sys.path)  # the script puts benchmarks/ and the checkout on sys.path
    spec = importlib.util.spec_from_file_location("unlearning_robustness", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path[:] = saved
    return mod


def _row(model, seed, attack, split="forget10", scale="small", **extra):
    return {"model": model, "seed": seed, "attack": attack, "numbers": {"forget_rouge": 0.5}, "forget_quality": None,
            "model_utility": None, "forget_rouge": None, "attack_seconds": 3.0, "wall_seconds": 4.0,
            "machine": "m", "scale": scale, "split": split, **extra}


def test_written_json_becomes_the_partial_runs(robustness, tmp_path):
    rows = [_row("finetuned", None, "quantize-int4"), _row("npo x sophia", 2, "sequential"),
            _row("npo x sophia", 2, "phrasings", split="forget05"), _row("ga x adamw", 2, "multihop", scale="demo")]
    path = tmp_path / "unlearning_robustness.json"
    path.write_text(json.dumps(rows))
    runs = robustness.merged_runs(path, "small", "forget10")
    # the keys main() gives an end's attack and a sequential run; other splits and scales left out
    assert set(runs) == {"finetuned|None|forget10|quantize-int4", "npo x sophia|2|forget10|sequential"}
    assert robustness.run_key("finetuned", None, "forget10", "quantize-int4") in runs
    assert runs["npo x sophia|2|forget10|sequential"] == {
        "numbers": {"forget_rouge": 0.5}, "forget_quality": None, "model_utility": None, "forget_rouge": None,
        "attack_seconds": 3.0, "wall_seconds": 4.0}


def test_partial_file_is_taken_as_it_is_and_other_json_refused(robustness, tmp_path):
    partial = {"ga x adamw|1|forget10|few-shot": {"numbers": {}, "wall_seconds": 1.0}}
    (tmp_path / "p.json").write_text(json.dumps(partial))
    assert robustness.merged_runs(tmp_path / "p.json", "small", "forget10") == partial
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(SystemExit, match="neither a partial file"):
        robustness.merged_runs(tmp_path / "bad.json", "small", "forget10")


def test_sophia_offset_recovers_a_planted_offset_at_equal_forgetting(robustness):
    import numpy as np

    rng = np.random.default_rng(0)
    before = rng.uniform(0.05, 0.7, size=12)
    sophia = np.arange(12) % 2
    recovery = 0.2 + 0.4 * before - 0.1 * sophia  # Sophia recovers 0.1 less at any forgetting
    pts = [(float(b), float(r), int(s)) for b, r, s in zip(before, recovery, sophia)]
    fit = robustness.sophia_offset(pts)
    assert fit["n"] == 12 and abs(fit["sophia"] + 0.1) < 1e-9 and abs(fit["slope"] - 0.4) < 1e-9
    assert fit["sophia_se"] < 1e-6  # an exact fit leaves no residual
    noisy = [(b, r + float(e), s) for (b, r, s), e in zip(pts, rng.normal(0, 0.05, size=12))]
    assert robustness.sophia_offset(noisy)["sophia_se"] > 0.005
    assert robustness.sophia_offset([p for p in pts if p[2] == 0]) is None  # one optimizer: nothing to compare


def test_points_pair_each_attack_with_the_models_forgetting_before_it(robustness):
    rows = [_row("npo x sophia", 1, "quantize-int8"), _row("npo x sophia", 1, "relearn-forget-half"),
            _row("finetuned", None, "quantize-int8"), _row("finetuned", None, "relearn-forget-half"),
            _row("ga x adamw", 1, "relearn-forget-half")]  # no int8 row: no forgetting to pair with
    rows[0]["numbers"] = {"forget_rouge_before": 0.3, "model_utility": 0.8}
    rows[1]["numbers"] = {"rouge_excess_50": 0.4}
    assert robustness._points(rows, "relearn-forget-half", "rouge_excess_50") == [(0.3, 0.4, 1)]  # ends left out


def test_model_set_line_reads_the_cached_fine_tune_without_building_it(robustness, tmp_path):
    class Zoo:  # what model_set_line reads of a ModelZoo
        key, root = "abc", tmp_path

    assert robustness.model_set_line(Zoo()) == "Models: zoo key `abc` (no fine-tune cached here)."
    assert not (tmp_path / "finetuned").exists()
    (tmp_path / "finetuned").mkdir()
    meta = {"train": {"epochs": 30}, "rouge_checks": [{"epoch": 30, "rouge": 0.96927}],
            "built_with": {"cpu": "AMD EPYC", "transformers": "5.25.0"}}
    (tmp_path / "finetuned" / "soulkit_model.json").write_text(json.dumps(meta))
    assert robustness.model_set_line(Zoo()) == ("Models: zoo key `abc`; the fine-tune ran 30 epochs (probe ROUGE "
                                                "0.9693), built on AMD EPYC with transformers 5.25.0.")
