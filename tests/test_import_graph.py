"""The packages' import graph has no cycle, counting imports inside functions too.

A cycle makes import order matter, hides which layer owns what, and breaks as soon as one of its
imports moves to module level. The layering this protects: kernels <- models <- methods <- config
<- checkpoint <- train <- prepare <- commands, with data/ reading data only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth of the file (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from engine.data import latents` imports the module engine.data.latents.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # Importing a.b.c runs a/__init__ and a/b/__init__ first; a module's own enclosing packages
            # are already being imported when it runs, so they are not edges.
            pieces = target.split(".")
            for depth in range(1, len(pieces) + 1):
                candidate = ".".join(pieces[:depth])
                if candidate in known and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engine_and_kernels_have_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_depend_only_on_torch_and_kernels():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("engine.models"):
            outside = {m for m in imports if not m.startswith(("engine.models", "kernels"))}
            assert outside <= {"engine"}, f"{module} imports {sorted(outside)}"


def test_data_only_reads_data():
    """data/ never reaches up into training, methods, preparation or the config."""
    graph = import_graph()
    allowed = ("engine.data", "engine.pictures", "engine.options", "engine.safe_files")
    for module, imports in graph.items():
        if module.startswith("engine.data"):
            outside = {m for m in imports if not m.startswith(allowed) and m != "engine"}
            assert not outside, f"{module} imports {sorted(outside)}"
