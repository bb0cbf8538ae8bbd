"""No import circles in edgekd: every import statement counts, those inside functions too.

A function-local import still runs the imported module, so a circle hidden inside a function
is a circle all the same: it only waits for the first call to bite, and it makes two rooms one.
The graph is read from the source (``ast``) of every module of the installed layout
(``edgekd/``, ``distill/``, ``export/``, ``runtime/``, ``profiles/``, ``plan/`` as
``edgekd.*``); ``from edgekd.a import b`` counts as importing ``edgekd.a.b`` and the package
``edgekd.a`` itself, so a submodule reaching back through its package's name is a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {
    "edgekd": "edgekd",
    "distill": "edgekd.distill",
    "export": "edgekd.export",
    "runtime": "edgekd.runtime",
    "profiles": "edgekd.profiles",
    "plan": "edgekd.plan",
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in LAYOUT.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join([package, *[p for p in parts if p != "__init__"]])] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The edgekd modules ``name`` (at ``path``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    edges = set()
    for target in names:  # the module itself, or (``from pkg import name``) its package
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_module_of_edgekd_imports_itself_in_a_circle():
    found = modules()
    graph = {name: imported(name, path, set(found)) for name, path in found.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the graph was read
    # a package and one of its own submodules importing each other is the package pattern
    found_circles = [
        " <-> ".join(c)
        for c in circles(graph)
        if not (len(c) == 2 and (c[0].startswith(c[1] + ".") or c[1].startswith(c[0] + ".")))
    ]
    assert found_circles == [], "import circles: " + "; ".join(found_circles)
