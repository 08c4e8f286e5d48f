"""The package's modules import one another without a cycle: a step of a script (qlora/feeding.py) may use a lower
one (qlora/calibrate.py), never the other way round. Every import counts, also those inside functions (kept there
only to delay loading torch or transformers)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora"


def imported_modules(path: Path) -> set[str]:
    """The qlora modules that `path` imports anywhere in it (`from . import x`, `from .x import y`, `import qlora.x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("qlora.")}
    return {name for name in names if (PACKAGE / f"{name}.py").is_file()}


def graph() -> dict[str, set[str]]:
    return {path.stem: imported_modules(path) - {path.stem} for path in PACKAGE.glob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports as the list of modules on it (first and last the same), or None: a depth-first search."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, cycle", [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
                                          ({"a": {"b"}, "b": {"c"}, "c": set()}, None)])
def test_the_search_finds_a_cycle_where_there_is_one(edges, cycle):
    assert find_cycle(edges) == cycle


def test_a_function_level_import_counts(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .train import GROUPS\n    from . import calibrate\n")
    assert imported_modules(module) == {"train", "calibrate"}
