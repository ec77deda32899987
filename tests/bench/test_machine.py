"""The machine record of every results file names the versions a cached model depends on."""

from __future__ import annotations

from importlib.metadata import version

from soulkit._env import library_versions, package_version
from soulkit.bench.machine import machine_info, machine_line
from soulkit.unlearn.models import built_with


def test_model_stack_versions_recorded_and_printed():
    info = machine_info()
    assert info["libraries"]["transformers"] == version("transformers")
    assert info["libraries"]["tokenizers"] == version("tokenizers")
    line = machine_line({"cpu_model": "cpu", "cpu_count": 2, "torch": "2.0", "python": "3.11",
                         "libraries": {"transformers": "5.0", "faker": None}})
    assert line == "cpu, 2 cores; torch 2.0, transformers 5.0, Python 3.11; no GPU"  # uninstalled ones left out
    assert "transformers" not in machine_line({"cpu_model": "cpu", "cpu_count": 2})  # an old record prints as before


def test_versions_of_missing_packages_are_none_and_built_with_names_the_cpu():
    import torch

    assert package_version("no-such-distribution-soulkit") is None
    assert library_versions(("torch", "no-such-distribution-soulkit")) == {
        "torch": version("torch"), "no-such-distribution-soulkit": None}
    record = built_with()
    assert record["torch"] == torch.__version__ and record["transformers"] == version("transformers")
    assert record["cpu"] and record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
