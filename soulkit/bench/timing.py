"""The one timing helper of the benchmarks: arms timed in alternating rounds, ratios as paired medians.

A shared VM drifts (steal time, other jobs), so no arm is timed in a block of its own: every round
calls each arm once, in turn, and a ratio between two arms is the median of their per-round
ratios. On the CPU each call can start from a cold last-level cache (a buffer is rewritten first,
as ``triton.testing.do_bench`` does on GPUs), so that an arm following another on the same tensors
does not find them cached; on CUDA calls are timed with events.

    times = time_rounds({"a": fn_a, "b": fn_b}, reps=9, warmup=2)
    paired_ratio(times, "a", "b")     # median of a_i / b_i
    medians(times)                    # {"a": median seconds, "b": ...}
    result, seconds = time_result(fn) # one timed call that keeps what fn returns
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = ["medians", "paired_iqr", "paired_ratio", "time_call", "time_result", "time_rounds"]

#: Bytes rewritten before each call for a cold cache (larger than any last-level cache in sight).
FLUSH_BYTES = 256 << 20


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes (CUDA: between events, after a synchronisation)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_result(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, float]:
    """``(fn(), seconds)``: one call timed as :func:`time_call` times it, its return value kept."""
    box: list[T] = []
    seconds = time_call(lambda: box.append(fn()), device)
    return box[0], seconds


def time_rounds(
    arms: Mapping[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    cold_cache: bool = True,
    between: Callable[[], object] | None = None,
    rotate: bool = False,
    after_round: Callable[[int, Mapping[str, list[float]]], object] | None = None,
) -> dict[str, list[float]]:
    """Per arm, the seconds of each of ``reps`` calls, the arms called in turn once per round.

    ``warmup`` untimed rounds come first. ``cold_cache`` rewrites a :data:`FLUSH_BYTES` buffer before
    every timed call; ``between``, if given, runs (untimed) before every call too (e.g. to reset state).
    ``rotate``: round ``j`` (warm-up rounds counted) starts at arm ``j mod len(arms)``, so that no arm
    always runs last (for long arms whose neighbours leave the machine in a different state);
    ``after_round(i, times)``, if given, runs after each timed round ``i`` (e.g. to print progress).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if cold_cache else None
    names = list(arms)

    def order(j: int) -> list[str]:
        k = j % len(names) if rotate and names else 0
        return names[k:] + names[:k]

    for j in range(warmup):
        for name in order(j):
            if between is not None:
                between()
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(reps):
        for name in order(warmup + i):
            if between is not None:
                between()
            if flush is not None:
                flush.zero_()
            times[name].append(time_call(arms[name], device))
        if after_round is not None:
            after_round(i, times)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """Per arm, the median of its timed calls."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def paired_ratio(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)``."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def paired_iqr(times: Mapping[str, list[float]], a: str, b: str) -> tuple[float, float] | None:
    """25th and 75th percentiles of the per-round ratios ``a / b`` (``None`` below 4 rounds)."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    if len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]
