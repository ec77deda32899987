"""benchmarks/unlearning_robustness.py --merge: a written results JSON gives back the keys of its runs."""

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
