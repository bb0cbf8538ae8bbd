"""No import circles in edgekd: every import statement counts, those inside functions too.

A function-local import still runs the imported module, so a circle hidden inside a function
is a circle all the same: it only waits for the first call to bite, and it makes two rooms one.
The graph is read from the source (``ast``) of every module of the installed layout
(``edgekd/``, ``distill/``, ``export/``, ``runtime/``, ``profiles/``, ``plan/`` as
``edgekd.*``); ``from edgekd.a import b`` counts as importing ``edgekd.a.b`` and the package
``edgekd.a`` itself, so a submodule reaching back through its package's name is a circle; a
name a package loads lazily (``edgekd.models``' ``_NAMES``) counts as its submodule.

The second rule keeps function-local imports honest: an import inside a function is there only
to keep a heavy or optional package (torch, onnxruntime, llama_cpp, ...) out of the modules that
do not need it, or, in the command layer, to load a stage only when its command runs
(``edgekd --help`` loads none). One that keeps nothing out belongs at the top. The third keeps
the floors (docs/development.md): no module imports from a floor above its own.
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


# Optional extras, and core packages that take tens of milliseconds or more to import.
HEAVY = frozenset(
    {
        "torch", "transformers", "accelerate", "deepspeed", "tokenizers", "huggingface_hub",
        "onnx", "onnxruntime", "onnxscript", "optimum", "llama_cpp", "tensorrt", "polygraphy",
        "pynvml", "matplotlib", "gguf", "easy_vqa", "numpy", "PIL", "jinja2", "pydantic", "yaml",
    }
)  # fmt: skip
LOADS_TORCH = ("safetensors.torch",)  # a light package's module that imports torch


def heavy_unit(target: str) -> str | None:
    """What importing ``target`` loads that HEAVY names: the package and the first level below
    it (``transformers.trainer_utils`` is more than ``import transformers`` loads), or None."""
    if target.startswith(LOADS_TORCH):
        return "torch"
    parts = target.split(".")
    return ".".join(parts[:2]) if parts[0] in HEAVY else None


def covered(unit: str, loaded: set[str]) -> bool:
    """Whether ``unit`` is loaded already: it, or a module below it, is in ``loaded``."""
    return any(c == unit or c.startswith(unit + ".") for c in loaded)


# Local on purpose, for another reason than weight.
LOCAL_BY_DESIGN = {
    ("edgekd.runtime.ggml_cpu", "fcntl"): "POSIX only; the loader also ships in the wheel",
}
# A command loads the stage it runs when it runs: `edgekd --help` loads no stage at all.
COMMAND_LAYER = "edgekd.cli"
STAGES = ("edgekd.distill", "edgekd.export", "edgekd.runtime", "edgekd.plan", "edgekd.models",
          "edgekd.data", "edgekd.profiles", "edgekd.evaluate")  # fmt: skip


def by_design(importer: str, targets: list[str]) -> bool:
    """Whether a local import is there for another reason than weight (see above)."""
    if any((importer, t.split(".")[0]) in LOCAL_BY_DESIGN for t in targets):
        return True
    in_command_layer = importer == COMMAND_LAYER or importer.startswith(COMMAND_LAYER + ".")
    module = targets[0]  # the statement's module (``from X import a``: X)
    return in_command_layer and any(module == s or module.startswith(s + ".") for s in STAGES)


def lazy_names(found: dict[str, Path]) -> dict[str, str]:
    """``package.name`` -> ``package.module`` for the names a package's ``_NAMES`` loads lazily."""
    out = {}
    for package, path in found.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_NAMES":
                for attr, module in ast.literal_eval(node.value).items():
                    out[f"{package}.{attr}"] = f"{package}.{module}"
    return out


def _statement_targets(name: str, path: Path, node: ast.stmt, lazy: dict[str, str]) -> list[str]:
    """Dotted names one import statement of module ``name`` (at ``path``) loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    members = [f"{base}.{alias.name}" for alias in node.names]
    return [base] + [lazy.get(m, m) for m in members]


def _known(target: str, known: set[str]) -> str:
    """The module ``target`` is, or (``from pkg import name``) its package; '' if not edgekd."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target


def imports(name: str, path: Path, lazy: dict[str, str]) -> tuple[list, list]:
    """Module ``name``'s import statements: (at import time, inside functions). Imports under
    ``if TYPE_CHECKING:`` are left out: they never run."""
    top: list[ast.stmt] = []
    local: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                (local if in_function else top).append(child)
            deeper = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, in_function or deeper)

    visit(ast.parse(path.read_text()), False)
    return top, local


def imported(
    name: str, path: Path, known: set[str], lazy: dict[str, str] | None = None
) -> set[str]:
    """The edgekd modules ``name`` (at ``path``) imports anywhere in its body."""
    lazy = lazy or {}
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _statement_targets(name, path, node, lazy):
                module = _known(target, known)
                if module and module != name:
                    edges.add(module)
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
    lazy = lazy_names(found)
    graph = {name: imported(name, path, set(found), lazy) for name, path in found.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the graph was read
    # a package and one of its own submodules importing each other is the package pattern
    found_circles = [
        " <-> ".join(c)
        for c in circles(graph)
        if not (len(c) == 2 and (c[0].startswith(c[1] + ".") or c[1].startswith(c[0] + ".")))
    ]
    assert found_circles == [], "import circles: " + "; ".join(found_circles)


def heavy_at_import(found: dict[str, Path], lazy: dict[str, str]) -> dict[str, set[str]]:
    """Per module: the HEAVY packages importing it loads (its top-level imports, transitively,
    and its parent packages')."""
    known = set(found)
    edges: dict[str, set[str]] = {}
    own: dict[str, set[str]] = {}
    for name, path in found.items():
        edges[name], own[name] = set(), set()
        for node in imports(name, path, lazy)[0]:
            for target in _statement_targets(name, path, node, lazy):
                if unit := heavy_unit(target):
                    own[name].add(unit)
                module = _known(target, known)
                if module and module != name:
                    edges[name].add(module)
        parts = name.split(".")
        edges[name] |= {".".join(parts[:i]) for i in range(1, len(parts))} & known
    out = {}
    for name in found:
        seen, todo, heavy = set(), [name], set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                heavy |= own[module]
                todo += edges[module]
        out[name] = heavy
    return out


def test_the_heavy_closure_follows_lazy_names(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('_NAMES = {"Model": "model"}')
    (tmp_path / "pkg" / "model.py").write_text("import torch")
    (tmp_path / "pkg" / "light.py").write_text("from pkg import Model")
    found = {m: tmp_path / "pkg" / f for m, f in (("pkg", "__init__.py"), ("pkg.model", "model.py"),
             ("pkg.light", "light.py"))}  # fmt: skip
    heavy = heavy_at_import(found, lazy_names(found))
    assert heavy == {"pkg": set(), "pkg.model": {"torch"}, "pkg.light": {"torch"}}


def test_a_submodule_of_a_heavy_package_is_its_own_weight():
    assert heavy_unit("transformers.trainer_utils.x") == "transformers.trainer_utils"
    assert heavy_unit("safetensors.torch") == "torch" and heavy_unit("safetensors") is None
    assert covered("torch", {"torch.nn"}) and not covered("torch.profiler", {"torch"})


def test_function_local_imports_keep_something_heavy_out():
    """An import inside a function must load a HEAVY package its module does not load already;
    anything else goes at the top of the module."""
    found = modules()
    lazy = lazy_names(found)
    heavy = heavy_at_import(found, lazy)
    known = set(found)
    needless = []
    for name, path in sorted(found.items()):
        for node in imports(name, path, lazy)[1]:
            targets = _statement_targets(name, path, node, lazy)
            loads = {unit for t in targets if (unit := heavy_unit(t))}
            for target in targets:
                module = _known(target, known)
                if module and module != name:
                    loads |= heavy[module]
            kept_out = {unit for unit in loads if not covered(unit, heavy[name])}
            if not kept_out and not by_design(name, targets):
                needless.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert needless == [], "imports that keep nothing heavy out, move them up:\n" + "\n".join(
        needless
    )


def test_the_benchmarks_import_names_that_exist():
    """benchmarks/ is not run by the suite; a name it imports from edgekd must still exist."""
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgekd")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    assert missing == []


# Floors, from the ground up (docs/development.md); a module imports from its floor or below.
FLOORS = (
    ("edgekd.errors", "edgekd.io", "edgekd.outputs", "edgekd.registry", "edgekd.envinfo",
     "edgekd.targets", "edgekd.artifact", "edgekd.chat", "edgekd.images", "edgekd.models.dims"),
    ("edgekd.models", "edgekd.data", "edgekd.profiles"),
    ("edgekd.distill", "edgekd.export", "edgekd.runtime", "edgekd.plan", "edgekd.evaluate"),
    ("edgekd.cli", "edgekd.__main__"),
)  # fmt: skip
UPWARD_BY_DESIGN = {
    # the recipe schema validates method names and weights against the method registry, a
    # module that imports nothing of edgekd but edgekd.registry
    ("edgekd.profiles.recipe", "edgekd.distill"),
    ("edgekd.profiles.recipe", "edgekd.distill.methods"),
}


def floor_of(module: str) -> int:
    """The floor of ``module``: the one naming it or its nearest package (the longest match)."""
    if module == "edgekd":  # the top package itself holds only its version
        return 0
    best = (-1, 0)
    for level, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best[0]:
                best = (len(name), level)
    assert best[0] > 0, f"{module} is on no floor: add it to FLOORS"
    return best[1]


def test_every_module_imports_from_its_floor_or_below():
    found = modules()
    lazy = lazy_names(found)
    upward = [
        f"{name} -> {target}"
        for name, path in sorted(found.items())
        for target in sorted(imported(name, path, set(found), lazy))
        if floor_of(target) > floor_of(name) and (name, target) not in UPWARD_BY_DESIGN
    ]
    assert upward == [], "imports from a higher floor: " + "; ".join(upward)
    assert floor_of("edgekd.models.dims") == 0 and floor_of("edgekd.models.vlm") == 1
