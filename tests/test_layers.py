"""The layering rule of DESIGN.md: imports only point down (kernels <- optim <- influence <- unlearn)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "soulkit"
# what each layer must not import (absolute "soulkit.X" or relative "..X")
FORBIDDEN = {
    "kernels": {"optim", "influence", "unlearn", "demos", "cli"},
    "optim": {"influence", "unlearn", "demos", "cli"},
    "influence": {"unlearn", "demos", "cli"},
    "unlearn": {"demos", "cli"},
}


def _imported_subpackages(path: pathlib.Path, layer: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("soulkit."):
                found.add(node.module.split(".")[1])
            elif node.level >= 2:  # ..X from inside soulkit/<layer>/
                target = (node.module or "").split(".")[0]
                if target:
                    found.add(target)
                else:
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("soulkit."):
                    found.add(alias.name.split(".")[1])
    return found


CASES = [(layer, f) for layer in FORBIDDEN if (ROOT / layer).is_dir() for f in sorted((ROOT / layer).rglob("*.py"))]


@pytest.mark.parametrize("layer, path", CASES, ids=[f"{lay}/{p.name}" for lay, p in CASES])
def test_imports_point_down(layer, path):
    bad = _imported_subpackages(path, layer) & FORBIDDEN[layer]
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {sorted(bad)}, above its layer '{layer}'"
