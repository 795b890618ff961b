"""The package's layering, checked from the source: which folder may import which.

Imports are read with ``ast`` (nothing is executed), lazy imports inside functions included,
``if TYPE_CHECKING:`` blocks excluded (they never run).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import carpool

ROOT = Path(carpool.__file__).parent


def _unit(module: str) -> str:
    """``carpool.engine.core`` -> ``engine``; ``carpool.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "carpool"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (absolute names, carpool's and third-party roots)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        found: set[str] = set()

        def visit(node: ast.AST, found: set[str] = found, name: str = name) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for sub in child.orelse:
                        visit(sub)
                    continue
                if isinstance(child, ast.Import):
                    found.update(a.name for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    found.add(child.module)
                    found.update(f"{child.module}.{a.name}" for a in child.names)
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
        graph[name] = found
    return graph


def _carpool_deps(module: str) -> set[str]:
    return {m for m in imports()[module] if m in imports() and m != module}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_carpool_deps(m))
    return seen


def _in(unit: str) -> list[str]:
    return [m for m in imports() if _unit(m) == unit and m != "carpool"]


def test_engine_imports_nothing_from_the_front_ends():
    bad = {
        (m, d)
        for m in _in("engine")
        for d in _carpool_deps(m)
        if _unit(d) in ("server", "replicas", "entrypoints", "integrations", "bench", "cli")
    }
    assert not bad, f"engine/ reaches into a front end: {sorted(bad)}"


def test_scheduling_and_kv_cache_import_no_torch():
    for unit in ("scheduling", "kv_cache"):
        for m in _in(unit):
            torchy = sorted(
                f"{d} imports {t}"
                for d in _closure(m)
                for t in imports()[d]
                if t == "torch" or t.startswith("torch.")
            )
            assert not torchy, f"{m} pulls in torch: {torchy}"


def test_no_import_cycle_between_folders():
    edges: dict[str, set[str]] = {}
    for m in imports():
        if m == "carpool":  # the package facade re-exports the public surface
            continue
        for d in _carpool_deps(m):
            if d != "carpool" and _unit(d) != _unit(m):
                edges.setdefault(_unit(m), set()).add(_unit(d))

    def path_back(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for u in sorted(edges) if (c := path_back(u)) is not None]
    assert not cycles, f"folder-level import cycles: {cycles}"


def test_the_checker_sees_imports():
    # Guards the tests above against passing vacuously (a parser that finds nothing).
    assert "carpool.engine.llm_engine" in _carpool_deps("carpool.engine.core")
    assert "torch" in imports()["carpool.worker.model_runner"]
    assert any(_unit(d) == "engine" for d in _carpool_deps("carpool.server.serving"))
