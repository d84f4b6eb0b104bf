"""The package's shape: modules form layers (no import circle), and functions fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_tune"
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}
LONGEST_FUNCTION = 60


def imported_modules(tree: ast.AST) -> set[str]:
    """The package's modules a module imports, at any level (function-local imports included:
    importing lazily hides a circle, it does not remove it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("lora_tune.")
            }
        elif isinstance(node, ast.ImportFrom) and (
            node.level == 1 or (node.module or "").startswith("lora_tune")
        ):
            found |= _targets(node)
    return found


def _targets(node: ast.ImportFrom) -> set[str]:
    """`from .x import y` and `from lora_tune.x import y` name x; `from . import y` names y when
    y is a module, else the package itself (__init__)."""
    parts = (node.module or "").split(".")
    inside = parts[1:] if node.level == 0 else [part for part in parts if part]
    if inside:
        return {inside[0]}
    return {alias.name if alias.name in MODULES else "__init__" for alias in node.names}


def import_graph() -> dict[str, set[str]]:
    return {
        name: imported_modules(ast.parse(path.read_text())) & MODULES.keys()
        for name, path in MODULES.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others, plus self-imports."""
    reach = {}
    for start, imported in graph.items():
        seen, todo = set(), list(imported)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        reach[start] = seen
    groups = {frozenset(m for m in reach[n] if n in reach[m]) | {n} for n in graph if n in reach[n]}
    return sorted(sorted(group) for group in groups)


def test_the_import_graph_reads_function_local_imports():
    tree = ast.parse(
        "def f():\n    from . import runs\n    from .recipe import load\n    import lora_tune.data\n"
        "from lora_tune import models\nfrom . import __version__\nimport torch\n"
    )
    assert imported_modules(tree) == {"runs", "recipe", "data", "models", "__init__"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [
        ["a", "b", "c"],
        ["e"],
    ]


def test_no_module_of_the_package_imports_itself_back():
    found = circles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(
        " <-> ".join(group) for group in found
    )


def long_functions() -> list[str]:
    found = []
    for name, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    found.append(f"{name}.py:{node.lineno} {node.name} ({length} lines)")
    return found


def test_every_function_fits_on_a_screen():
    found = long_functions()
    print("\n".join(found))
    assert not found, f"functions over {LONGEST_FUNCTION} lines:\n" + "\n".join(found)
