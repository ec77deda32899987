"""The benchmarks' timing helper lives in the package: :mod:`soulkit.bench.timing` (re-exported here)."""

from soulkit.bench.timing import *  # noqa: F401,F403
from soulkit.bench.timing import __all__  # noqa: F401
