"""The one timing helper of the benchmarks: arms timed in alternating rounds, ratios as paired medians.

A shared VM drifts (steal time, other jobs), so no arm is timed in a block of its own: every round
calls each arm once, in turn, and a ratio between two arms is the median of their per-round
ratios. On the CPU each call can start from a cold last-level cache (a buffer is rewritten first,
as ``triton.testing.do_bench`` does on GPUs), so that an arm following another on the same tensors
does not find them cached; on CUDA calls are timed with events.

    times = time_rounds({"a": fn_a, "b": fn_b}, reps=9, warmup=2)
    paired_ratio(times, "a", "b")     # median of a_i / b_i
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["paired_iqr", "paired_ratio", "time_call", "time_rounds"]

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


def time_rounds(
    arms: Mapping[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    cold_cache: bool = True,
    between: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Per arm, the seconds of each of ``reps`` calls, the arms called in turn once per round.

    ``warmup`` untimed rounds come first. ``cold_cache`` rewrites a :data:`FLUSH_BYTES` buffer before
    every timed call; ``between``, if given, runs (untimed) before every call too (e.g. to reset state).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if cold_cache else None
    for _ in range(warmup):
        for fn in arms.values():
            if between is not None:
                between()
            fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            if between is not None:
                between()
            if flush is not None:
                flush.zero_()
            times[name].append(time_call(fn, device))
    return times


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
