"""run_training_demo: the summary, table and md/json/png files of a tiny run."""

import json

from soulkit.demos import run_training_demo as exported


def test_summary_and_outputs(tiny_run):
    result, out = tiny_run
    rows = {r["label"]: r for r in result.summary}
    assert rows["adamw"]["reference"] and rows["adamw"]["steps_to_target"] is not None
    assert rows["adamw"]["target"] == result.arms[0].val_loss[-1]
    assert rows["sophia"]["win_rate_mean"] is not None and rows["sophia-hbc"]["win_rate_mean"] is not None
    assert "| adamw |" in result.table and "| sophia |" in result.table and "| sophia-hbc |" in result.table
    # the bias-corrected h is larger early on, so fewer coordinates are clipped than in the published setting
    assert rows["sophia-hbc"]["win_rate_mean"] > rows["sophia"]["win_rate_mean"]
    for ext in ("md", "json", "png"):
        path = out / f"train_lm.{ext}"
        assert path.is_file() and path.stat().st_size > 0
        assert result.paths[ext] == str(path)
    data = json.loads((out / "train_lm.json").read_text())
    assert data["config"]["steps"] == 12
    assert [a["spec"]["kind"] for a in data["arms"]] == ["adamw", "sophia", "sophia"]
    assert [a["spec"]["hessian_bias_correction"] for a in data["arms"]] == [False, False, True]
    assert data["arms"][1]["val_loss"] == result.arms[1].val_loss
    assert (out / "train_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sophia |" in (out / "train_lm.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_exported_from_soulkit_demos():
    from soulkit.demos.lm.run import run_training_demo

    assert exported is run_training_demo
