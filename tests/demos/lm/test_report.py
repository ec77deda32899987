"""The report: summary rows and table from synthetic arms, curves plotted as PNG."""

import math

import pytest

from soulkit.demos.lm.config import OptimizerSpec, TrainConfig
from soulkit.demos.lm.loop import ArmResult
from soulkit.demos.lm.report import format_table, median_window_time, plot_curves, steps_to_reach, summarize


def test_steps_to_reach():
    arm = ArmResult(spec=OptimizerSpec("adamw", 1e-3), eval_steps=[0, 5, 10], val_loss=[5.0, 3.0, 2.0])
    assert steps_to_reach(arm, 3.0) == 5
    assert steps_to_reach(arm, 1.0) is None


def test_median_window_time():
    times = ([0.3] + [0.1] * 4) * 3
    assert median_window_time(times, 5) == pytest.approx(0.14)
    assert median_window_time([0.1, 0.5, 0.2], 5) == pytest.approx(0.2)  # fewer steps than a window: the median
    assert math.isnan(median_window_time([], 5))


def test_summary_of_synthetic_arms_including_a_diverged_one():
    cfg = TrainConfig(steps=20, eval_every=10)
    adamw = ArmResult(spec=OptimizerSpec("adamw", 1e-3), eval_steps=[0, 10, 20], val_loss=[5.5, 3.0, 2.5],
                      step_time=[0.1] * 20)
    sophia = ArmResult(spec=OptimizerSpec("sophia", 1e-3), eval_steps=[0, 10, 20], val_loss=[5.5, 2.4, 2.0],
                       step_time=([0.3] + [0.1] * 9) * 2, refresh_steps=[0, 10], win_rate=[0.2, 0.4])
    broken = ArmResult(spec=OptimizerSpec("sophia", 1.0, label="sophia-hot"), eval_steps=[0], val_loss=[5.5],
                       step_time=[0.1, 0.1], diverged_at=1)
    rows = {r["label"]: r for r in summarize([adamw, sophia, broken], cfg)}
    assert rows["adamw"]["target"] == 2.5
    assert rows["sophia"]["steps_to_target"] == 10 and rows["sophia"]["steps_ratio"] == 0.5
    assert rows["sophia"]["wall_ratio"] == pytest.approx(1.2 / 2.0)  # 10 steps incl. one refresh vs 20 steps
    assert rows["sophia"]["step_overhead"] == pytest.approx(0.2)  # one 0.3 s refresh per 10-step window
    assert rows["sophia"]["median_step_overhead"] == pytest.approx(0.0)
    assert rows["sophia"]["win_rate_mean"] == pytest.approx(0.3)
    assert rows["sophia-hot"]["steps_to_target"] is None and math.isnan(rows["sophia-hot"]["val_loss_final"])
    table = format_table(list(rows.values()))
    assert "diverged @1" in table and "10 (0.50x)" in table
    with pytest.raises(ValueError, match="reference 'nope' is not one of"):
        summarize([adamw, sophia], cfg, reference="nope")
    by_sophia = {r["label"]: r for r in summarize([adamw, sophia], cfg, reference="sophia")}
    assert by_sophia["sophia"]["reference"] and by_sophia["adamw"]["target"] == 2.0


def test_plot_curves_writes_a_png(tmp_path):
    adamw = ArmResult(spec=OptimizerSpec("adamw", 1e-3), eval_steps=[0, 2], val_loss=[5.5, 4.0], step_time=[0.1, 0.1])
    path = tmp_path / "sub" / "curves.png"
    plot_curves([adamw], path, title="t", target=4.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # written atomically, no temp file left
