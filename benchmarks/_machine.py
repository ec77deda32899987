"""The machine record lives in the package: :mod:`soulkit.bench.machine` (re-exported here)."""

from soulkit.bench.machine import *  # noqa: F401,F403
from soulkit.bench.machine import __all__  # noqa: F401
