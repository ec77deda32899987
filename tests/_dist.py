"""Multi-process tests on the CPU: ranks spawned with ``torch.multiprocessing``, gloo on the loopback
interface, rendezvous through a file (no port to pick), and a teardown that cannot crash a finished rank.

A worker module defines its scenarios as functions ``body(rank, world) -> dict`` of plain tensors and
lists, and a module-level ``main(rank, world, scenarios, out_dir)`` that calls :func:`run_rank` with them
(spawn pickles ``main`` by name). The test calls :func:`launch` (or uses it in a module fixture: starting
ranks that import torch costs far more than small scenarios, so one launch runs them all).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch

from soulkit.bench.machine import loopback_interface

WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 90.0  # a guard against hung collectives; a launch takes ~15-30 s

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def run_rank(rank: int, world: int, scenarios: Sequence[str], out_dir: str,
             bodies: Mapping[str, Callable[[int, int], dict]]) -> None:
    """Body of one rank: run ``scenarios`` one after the other in one process group, writing each result
    to ``OUT_DIR/<scenario>_rank<r>.pt`` (whole or absent), with a barrier after each.

    After a clean run the rank leaves with ``os._exit(0)``: gloo's worker threads can still hold
    references when the interpreter is torn down, and that teardown has aborted a rank (SIGABRT,
    "terminate called without an active exception") once in CI after every result was written. A
    failure inside a scenario still raises, and a fatal signal prints every thread's Python stack
    (faulthandler) so that a crash can be told apart from the exit-time one."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    # Triton kernels run under the interpreter without a GPU; set before soulkit.kernels is imported
    # (tests/conftest.py does the same for the test process, whose environment the ranks inherit).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Rendezvous through a file (no port to pick) and keep gloo on the loopback interface: the
    # sandbox's hostname may not resolve, and nothing outside this machine is needed.
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := loopback_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo
    store = Path(out_dir) / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            result = bodies[scenario](rank, world)
            target = Path(out_dir) / f"{scenario}_rank{rank}.pt"
            torch.save(result, target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)  # a result file is whole or absent
            dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch_once(main: Callable, scenarios: Sequence[str], out_dir: Path, world: int) -> dict[str, list[dict]]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(main, args=(world, list(scenarios), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    expected = [out_dir / f"{s}_rank{r}.pt" for s in scenarios for r in range(world)]
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the ranks did not finish {list(scenarios)} within {LAUNCH_TIMEOUT_S:.0f} s")
    except mp.ProcessExitedException as exc:
        # Every result is written before the last barrier, so a rank that dies after all of them
        # exist died in the process-group teardown (torch/gloo, not soulkit): the results stand.
        if exc.signal_name is None or not all(p.exists() for p in expected):
            raise
        warnings.warn(f"a rank died in process-group teardown after writing every result: {exc}", stacklevel=1)
    finally:
        for proc in ctx.processes:  # only the ranks started above
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return {s: [torch.load(out_dir / f"{s}_rank{r}.pt", weights_only=True) for r in range(world)]
            for s in scenarios}


def launch(main: Callable, scenarios: Sequence[str], tmp_path_factory, world: int = WORLD_SIZE,
           ) -> dict[str, list[dict]]:
    """Run ``scenarios`` on ``world`` spawned ranks (``main(rank, world, scenarios, out_dir)``); return each
    scenario's per-rank results. A rank killed by a signal (not a Python error: those raise
    ``ProcessRaisedException``) gets the whole launch rerun once; a defect that crashes deterministically
    still fails the second launch."""
    import torch.multiprocessing as mp

    try:
        return _launch_once(main, scenarios, tmp_path_factory.mktemp("dist"), world)
    except mp.ProcessExitedException as exc:
        if exc.signal_name is None:
            raise
        warnings.warn(f"relaunching the ranks once after a crash: {exc}", stacklevel=1)
        return _launch_once(main, scenarios, tmp_path_factory.mktemp("dist_retry"), world)
