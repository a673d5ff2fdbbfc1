"""The layer map (docs/layers.md) holds for every import in the package.

The map's table is parsed from the doc, so the two cannot drift.  Every
import statement of every module in ``src/pydmabuf`` counts, wherever it
is (module level, inside a function, under ``if TYPE_CHECKING:``), and so
do the compiled core's imports of Python modules.  An import may go to the
same layer or down; runtime imports may not make a cycle; annotation-only
imports (under ``TYPE_CHECKING``) may not go up but do not count for
cycles (they never run), as the doc says.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PKG = SRC / "pydmabuf"
DOC = ROOT / "docs" / "layers.md"

# ------------------------------------------------------------------ the map


def _table() -> list[tuple[int, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|", line)
        if m:
            rows.append((int(m.group(1)), m.group(2)))
    return rows


TABLE = _table()


def layer_of(module: str) -> int | None:
    """The layer of ``module`` (dotted, relative to the package; the
    package itself is ``pydmabuf``), or None when the table lacks it."""
    for layer, name in TABLE:
        if name.endswith("*") and module.startswith(name[:-1]) or module == name:
            return layer
    return None


# ---------------------------------------------------------------- the imports


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts else "pydmabuf"


def _python_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node, with whether it sits under ``if TYPE_CHECKING:``."""

    def walk(node: ast.AST, annotation_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, annotation_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from walk(child, True)
            for child in node.orelse:
                yield from walk(child, annotation_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, annotation_only)

    yield from walk(tree, False)


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> Iterator[str]:
    """The package modules an import statement reaches (relative to the
    package; ``pydmabuf`` for a name taken through the package itself)."""

    def rel(dotted: str) -> str | None:
        if dotted == "pydmabuf":
            return "pydmabuf"
        if dotted.startswith("pydmabuf."):
            return dotted[len("pydmabuf."):]
        return None

    if isinstance(node, ast.Import):
        for alias in node.names:
            r = rel(alias.name)
            if r is not None:
                yield r
        return
    if node.level:  # relative: from the importer's own package
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        if importer == "pydmabuf":
            base = []
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        dotted = "pydmabuf" + "".join("." + p for p in base) + (("." + node.module) if node.module else "")
    else:
        dotted = node.module or ""
    r = rel(dotted)
    if r is None:
        return
    for alias in node.names:
        sub = alias.name if r == "pydmabuf" else f"{r}.{alias.name}"
        # A submodule (`from pydmabuf import checks`), or a name through the
        # module (or the package) that holds it.
        yield sub if sub in known else r


_CORE_IMPORT = re.compile(r"^\s*(?:from\s+(pydmabuf(?:\.\w+)*)\s+import\s+(.+)|import\s+(pydmabuf(?:\.\w+)*))")


def _core_edges(known: set[str]) -> Iterator[tuple[str, str, bool, str]]:
    """The compiled modules' imports of package modules, read from their
    Cython sources (a regex: Cython is not Python)."""
    # The core is several extension modules (pydmabuf._core_base, ...,
    # re-exported by pydmabuf._core): one layer, one node "_core".
    sources = [("_core", p) for p in [*sorted(SRC.glob("_core*.pyx")), *sorted(SRC.glob("_core_*.pxi"))]]
    sources.append(("_calibrate", SRC / "_calibrate.pyx"))
    sources.append(("_floors", SRC / "_floors.pyx"))
    sources.append(("_dma_api", SRC / "_dma_api.pyx"))
    sources.append(("_dmabuf_api", SRC / "_dmabuf_api.pyx"))

    def node(target: str) -> str:
        return "_core" if target.startswith("_core") else target

    for mod, path in sources:
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = _CORE_IMPORT.match(line)
            if not m:
                continue
            where = f"{path.name}:{n}"
            if m.group(3):
                yield mod, node(m.group(3).removeprefix("pydmabuf.")) if m.group(3) != "pydmabuf" else "pydmabuf", \
                    False, where
                continue
            module = m.group(1)
            names = [x.strip().split(" as ")[0] for x in m.group(2).strip("() \\").split(",") if x.strip()]
            base = "pydmabuf" if module == "pydmabuf" else module.removeprefix("pydmabuf.")
            for name in names:
                sub = node(name) if base == "pydmabuf" else f"{base}.{name}"
                yield mod, sub if sub in known else node(base), False, where


@functools.lru_cache(maxsize=None)
def _all_edges() -> tuple[tuple[str, str, bool, str], ...]:
    return tuple(_read_edges())


def edges() -> list[tuple[str, str, bool, str]]:
    """(importer, imported, annotation_only, where) for every import of a
    package module, self-imports left out (read once per test run)."""
    return list(_all_edges())


def _read_edges() -> list[tuple[str, str, bool, str]]:
    mods = _python_modules()
    known = set(mods) | {"_core", "_calibrate", "_floors", "_dma_api", "_dmabuf_api"}
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, annotation_only in _imports(tree):
            for target in _targets(name, path.name == "__init__.py", node, known):
                if target != name:
                    out.append((name, target, annotation_only, f"{path.relative_to(SRC)}:{node.lineno}"))
    out += [e for e in _core_edges(known) if e[0] != e[1]]
    return out


# ----------------------------------------------------------------- the checks


def _sccs(nodes: set[str], graph: dict[str, set[str]]) -> dict[str, int]:
    """Tarjan: the strongly connected component of every node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    comp: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on.discard(w)
                comp[w] = index[v]
                if w == v:
                    break

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comp


def violations(all_edges: list[tuple[str, str, bool, str]]) -> dict[tuple[str, str], str]:
    """Every edge that breaks the map: (importer, imported) -> why."""
    bad: dict[tuple[str, str], str] = {}
    for a, b, annotation_only, where in all_edges:
        la, lb = layer_of(a), layer_of(b)
        if la is not None and lb is not None and lb > la:
            kind = "annotation-only import" if annotation_only else "import"
            bad.setdefault((a, b), f"upward {kind}: {a} (layer {la}) -> {b} (layer {lb}) at {where}")
    runtime = [(a, b, where) for a, b, annotation_only, where in all_edges if not annotation_only]
    graph: dict[str, set[str]] = {}
    for a, b, _ in runtime:
        graph.setdefault(a, set()).add(b)
    nodes = set(graph) | {b for _, b, _ in runtime}
    comp = _sccs(nodes, graph)
    for a, b, where in runtime:
        if comp[a] == comp[b]:
            members = sorted(n for n in nodes if comp[n] == comp[a])
            bad.setdefault((a, b), f"cycle {' <-> '.join(members)}: {a} -> {b} at {where}")
    return bad


# ------------------------------------------------------------------- tests


def test_the_table_parses_and_names_each_module_once():
    names = [name for _, name in TABLE]
    assert len(TABLE) > 30, "docs/layers.md: the layer table was not found"
    assert len(names) == len(set(names)), "a module is listed twice in docs/layers.md"
    assert layer_of("pydmabuf") == max(layer for layer, _ in TABLE), "the package must be the top layer"


def test_every_module_is_in_the_layer_map():
    missing = sorted(m for m in [*_python_modules(), "_core", "_calibrate"] if layer_of(m) is None)
    assert not missing, f"modules missing from docs/layers.md: {missing}"


def test_no_upward_import_and_no_import_cycle():
    bad = sorted(violations(edges()).values())
    assert not bad, "the layer map is broken:\n" + "\n".join(bad)


def test_the_checker_sees_what_it_must():
    """The parser finds the kinds of import the rules are about."""
    found = {(a, b): (annotation_only, where) for a, b, annotation_only, where in edges()}
    assert found[("machine", "_spec")][0] is False  # module level
    assert found[("_spec", "machine")][0] is True  # under TYPE_CHECKING
    assert ("_core", "errors") in found  # the core's own imports
    assert ("pydmabuf", "machine") in found  # the package's re-exports
    assert layer_of("bench_cells") == layer_of("bench") and layer_of("dmabuf_attach") == layer_of("dmabuf")
    assert layer_of("a_module_nobody_listed") is None
    tree = ast.parse("def f():\n    from pydmabuf import IommuDomain, checks\n")
    (node, annotation_only), = _imports(tree)
    assert annotation_only is False
    assert sorted(_targets("dma", False, node, {"checks"})) == ["checks", "pydmabuf"]
    up = violations([("dma", "pydmabuf", False, "x.py:1"), ("iommu", "dma", True, "y.py:2"),
                     ("device", "pci", False, "a"), ("pci", "device", False, "b"),
                     ("swiotlb", "device", True, "c"), ("device", "swiotlb", False, "d")])
    assert "upward import" in up[("dma", "pydmabuf")]
    assert "upward annotation-only import" in up[("iommu", "dma")]
    assert "cycle" in up[("device", "pci")] and "cycle" in up[("pci", "device")]
    assert ("swiotlb", "device") not in up and ("device", "swiotlb") not in up
