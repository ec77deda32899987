"""Facts about the running environment that any layer may record: the CPU model and package versions.

A model trained on another CPU or under other versions of the model stack need not be bit-identical to
one trained before (BLAS blocking, vector math paths, tokenizer training, weight initialisation), so
benchmark results and cached models record these.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

#: The packages besides torch a benchmark model depends on.
MODEL_STACK = ("transformers", "tokenizers", "faker")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``, else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None where it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def library_versions(names: tuple[str, ...] = MODEL_STACK) -> dict[str, str | None]:
    """``name -> version`` (None: not installed) of ``names``, the model stack by default."""
    return {name: package_version(name) for name in names}
