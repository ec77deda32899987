"""Record the machine a benchmark ran on (every result file carries it).

    from soulkit.bench.machine import machine_info, machine_line
    info = machine_info()        # dict, JSON-serialisable
    print(machine_line(info))    # "Intel(R) Xeon(R) ... , 2 cores (2 usable), torch 2.13.0+cpu, no GPU"

Only local facts are read (``/proc/cpuinfo``, ``os``, ``platform``, ``torch``); nothing is sent anywhere.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from .._env import cpu_model, library_versions

__all__ = ["machine_info", "machine_line", "cpu_model", "loopback_interface"]


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch threads, Python/torch versions, the versions of the model stack
    (``libraries``: transformers, tokenizers, Faker; None where not installed), and the GPU(s) if any."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        gpus = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
            info["cuda"] = torch.version.cuda
        info["gpus"] = gpus
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
        info["gpus"] = []
    # the packages a cached benchmark model depends on besides torch: a model rebuilt under other versions of
    # these (tokenizer training, weight initialisation) need not equal one built before
    info["libraries"] = library_versions()
    try:
        load = os.getloadavg()
        info["load_avg_1_5_15"] = [round(x, 2) for x in load]
    except (AttributeError, OSError):
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One human-readable line for a markdown result file."""
    info = machine_info() if info is None else info
    cores = f"{info.get('cpu_count')} cores"
    if info.get("usable_cores") not in (None, info.get("cpu_count")):
        cores += f" ({info['usable_cores']} usable)"
    gpus = info.get("gpus") or []
    gpu = ", ".join(g["name"] for g in gpus) if gpus else "no GPU"
    threads = f", {info['torch_threads']} torch threads" if info.get("torch_threads") else ""
    libs = "".join(f", {k} {v}" for k, v in (info.get("libraries") or {}).items() if v)
    return (f"{info.get('cpu_model')}, {cores}{threads}; torch {info.get('torch')}{libs}, Python {info.get('python')}; "
            f"{gpu}")


def loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` or ``lo0``), for ``GLOO_SOCKET_IFNAME`` when gloo ranks on
    one machine must not look for another interface; ``None`` if there is none."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


if __name__ == "__main__":  # pragma: no cover
    print(machine_line())
