"""The layer rules of docs/architecture.md, checked on every import in stamen/ (read with ``ast``).

The table "Layers" in the architecture document lists, per package (or module), which other
layers it may import. This test fails on an import that the table does not allow, on a module
that no row of the table covers, and on any import circle between modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stamen"
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, name: str | None) -> str:
    """``from module import name``: the submodule if ``name`` is one, else the module."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def imports_of(module: str) -> set[str]:
    """Every stamen module that ``module`` imports (at the top or inside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "stamen")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "stamen":
                found.update(_resolve(base, alias.name) for alias in node.names)
    return {m for m in found if m != module}


def _dotted(path: str) -> str:
    """``stamen/server`` -> ``stamen.server``; ``stamen/__init__.py`` -> ``stamen``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def layer_table() -> dict[str, set[str]]:
    """The doc's layer table: layer name (a module or package path, dotted) -> layers it may import."""
    text = DOC.read_text()
    section = text.split("### Layers", 1)[1].split("\n#", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = [_dotted(n) for n in re.findall(r"`([^`]+)`", cells[0])]
        allowed = {_dotted(n) for n in re.findall(r"`([^`]+)`", cells[-1])}
        for name in names:
            table[name] = allowed
    return table


def layer_of(module: str, table: dict[str, set[str]]) -> str | None:
    """The most specific row of the table that covers ``module`` (the root package's row covers
    ``stamen/__init__.py`` only)."""
    candidates = [name for name in table if module == name or ("." in name and module.startswith(name + "."))]
    return max(candidates, key=len, default=None)


TABLE = layer_table()


def test_the_table_is_read_and_covers_every_module():
    assert {"stamen.models", "stamen.wire", "stamen.dht", "stamen.rpc", "stamen.server", "stamen.client"} <= set(TABLE)
    uncovered = [m for m in MODULES if layer_of(m, TABLE) is None]
    assert not uncovered, f"modules outside every layer of docs/architecture.md: {uncovered}"
    for name, allowed in TABLE.items():
        unknown = {a for a in allowed if a != "*" and a not in TABLE}
        assert not unknown, f"row {name} allows layers the table does not define: {unknown}"


def forbidden(module: str, imported: set[str]) -> list[str]:
    """The imports of ``module`` that its row of the table does not allow."""
    own = layer_of(module, TABLE)
    if own is None:
        return [f"{module} itself: no row of the layer table covers it"]
    allowed = TABLE[own]
    if "*" in allowed:
        return []
    return sorted(f"{m} (layer {layer_of(m, TABLE)})" for m in imported if layer_of(m, TABLE) not in allowed | {own})


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_table(module):
    bad = forbidden(module, imports_of(module))
    assert not bad, f"{module} (layer {layer_of(module, TABLE)}) may import only " \
                    f"{sorted(TABLE[layer_of(module, TABLE)])}, but imports {bad}"


def test_no_import_circles():
    graph = {m: imports_of(m) & MODULES.keys() for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_forbidden_imports():
    """The checker itself: the imports that used to break the layers are caught."""
    assert forbidden("stamen.client.session", {"stamen.server.handler"})
    assert forbidden("stamen.server.server", {"stamen.client.swarm"})
    assert forbidden("stamen.dht.health", {"stamen.client.routing"})
    assert forbidden("stamen.models.llama", {"stamen.rpc.inputs"})
    assert forbidden("stamen.wire.messages", {"stamen.server.backend"})
    assert not forbidden("stamen.client.session", {"stamen.rpc.inference", "stamen.wire.messages"})
    assert imports_of("stamen.client.session") >= {"stamen.rpc.inference", "stamen.trace"}
