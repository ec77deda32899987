"""Start a command, SIGKILL it once a condition holds: how the resume tests simulate a crash."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_when(argv: Sequence[str], ready: Callable[[], bool], *, env: dict[str, str], timeout: float,
              cwd=None, poll: float = 0.02) -> None:
    """Run ``argv`` and kill it with SIGKILL as soon as ``ready()`` is true; fails if it ends first."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            break
        time.sleep(poll)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-1500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
