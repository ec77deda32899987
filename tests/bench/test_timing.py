"""The benchmarks' timing helper: alternating rounds, warm-up, paired ratios."""

from __future__ import annotations

import pytest

from soulkit.bench import timing


def test_rounds_alternate_the_arms_after_warmup(monkeypatch):
    calls = []
    arms = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.time_rounds(arms, reps=3, warmup=1, cold_cache=False)
    assert calls == list("abc") * 4  # one warm-up round, then three timed rounds, each arm once per round
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())
    with pytest.raises(ValueError, match="reps"):
        timing.time_rounds(arms, reps=0)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    times = {"a": [2.0, 10.0, 3.0, 4.0, 100.0], "b": [1.0, 5.0, 1.0, 2.0, 10.0]}
    assert timing.paired_ratio(times, "a", "b") == 2.0  # ratios 2, 2, 3, 2, 10
    low, high = timing.paired_iqr(times, "a", "b")
    assert low == 2.0 and high > 2.0
    assert timing.paired_iqr({"a": [1.0], "b": [1.0]}, "a", "b") is None
