"""The package's structure: no import cycles inside ``peftc``, no reaching into a compiled model's privates.

Both checks read the source (``ast`` and regular expressions) and import nothing.

Import edges: every ``import peftc.x``, ``from peftc.x import y``, ``from .x import y`` and
``from ..x import y`` anywhere in a module, function-level imports included (they run, just
later). Imports under ``if TYPE_CHECKING:`` are left out: they never execute, so they can't
make a cycle at run time. ``from .pkg import name`` is an edge to the submodule ``pkg.name``
when there is one, else to ``pkg`` itself (its ``__init__.py``); so a package's ``__init__``
importing its children gives edges down, and a child's ``from .. import name`` of a name
defined in ``__init__.py`` gives an edge up into it. The package ``__init__`` files Python runs
on the way to a submodule are not counted as edges: they are the importer's own ancestors
(``peftc/__init__.py`` would close a cycle with every module it imports) or docstring-only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx  # a dependency of torch, so always installed alongside it

ROOT = Path(__file__).resolve().parent.parent / "peftc"
PACKAGE = "peftc"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``peftc/`` (``__init__.py`` names the package)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # an else branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[nx.DiGraph, list[str]]:
    """The directed graph of intra-package imports, and the imports that name no module file."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    unresolved = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source != PACKAGE and not source.startswith(PACKAGE + "."):
                    continue  # outside the package
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                if target in modules:
                    if not graph.has_edge(name, target):  # name the first line that imports it
                        graph.add_edge(name, target, where=where)
                else:
                    unresolved.append(f"{where}: {target}")
    return graph, unresolved


def _describe_cycles(graph: nx.DiGraph, most: int = 10) -> list[str]:
    """Per tangle (a strongly connected group of modules): its modules, then its shortest cycles,
    each edge with the line that makes it."""
    out = []
    tangles = [sorted(c) for c in nx.strongly_connected_components(graph)
               if len(c) > 1 or graph.has_edge(next(iter(c)), next(iter(c)))]
    for group in sorted(tangles):
        out.append(f"tangle of {len(group)} modules: {', '.join(group)}")
        cycles = sorted(nx.simple_cycles(graph.subgraph(group)), key=lambda c: (len(c), c))
        for cycle in cycles[:most]:
            edges = list(zip(cycle, [*cycle[1:], cycle[0]], strict=True))
            lines = ", ".join(graph.edges[u, v]["where"] for u, v in edges)
            out.append(f"  {' -> '.join([*cycle, cycle[0]])}  ({lines})")
        if len(cycles) > most:
            out.append(f"  ... and {len(cycles) - most} more cycles")
    return out


def test_the_import_graph_resolves():
    graph, unresolved = import_graph()
    assert not unresolved, "imports that name no module under peftc/:\n" + "\n".join(unresolved)
    # a sanity check that the parser sees edges at all: the package surface imports its parts
    assert graph.has_edge("peftc", "peftc.adapters.lora") and graph.has_edge("peftc.testing", "peftc.testing.assertions")


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = _describe_cycles(graph)
    assert not cycles, "import cycles inside peftc:\n  " + "\n  ".join(cycles)


PRIVATE_REACH = re.compile(r"\bcm\._[a-z]|getattr\(cm, [\"']_")


def test_no_module_reads_a_compiled_models_privates():
    """Only the compiled model touches its own ``_`` attributes; everything else uses its public accessors."""
    hits = [f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}"
            for path in sorted(ROOT.rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_REACH.search(line)]
    assert not hits, "reads of a CompiledModel's private attributes:\n" + "\n".join(hits)
