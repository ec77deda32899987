"""The layering rule of DESIGN.md: imports only point down (kernels <- optim <- influence <- unlearn)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "soulkit"
# what each layer must not import (absolute "soulkit.X" or relative "..X")
FORBIDDEN = {
    "kernels": {"optim", "influence", "unlearn", "demos", "bench", "cli"},
    "optim": {"influence", "unlearn", "demos", "bench", "cli"},
    "influence": {"unlearn", "demos", "bench", "cli"},
    "unlearn": {"demos", "bench", "cli"},
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


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """soulkit module -> the soulkit modules it imports, at module level or inside functions."""
    files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("soulkit"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                graph[name].update(subs if subs and len(subs) == len(node.names) else [target])
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in files)
    return {k: {t for t in v if t in files and t != k} for k, v in graph.items()}


def test_no_import_cycles():
    """No module reaches itself through imports, lazy (function-level) imports included."""
    graph = _import_graph()
    assert graph["soulkit.kernels.dispatch"] >= {"soulkit.kernels.sophia"}  # the graph sees real edges
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
