"""Layering: dependencies point one way (pipelines -> components -> core) and no project module imports itself back.

Read from the source with ``ast`` (nothing is imported), every import counted: module level, inside functions and
under ``if TYPE_CHECKING:``. Fails on
* any import cycle between project modules (``editinfinity.*`` in ``core/``, ``components.*``, ``pipelines.*``),
* any ``kfp`` import in core (the library must work without kfp installed),
* any import of ``components``/``pipelines`` from core, or of ``pipelines`` from ``components``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (source root, top-level package) of every project package.
PACKAGES = ((ROOT / "core", "editinfinity"), (ROOT, "components"), (ROOT, "pipelines"))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(packages: Iterable[tuple[Path, str]] = PACKAGES) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` of the project packages."""
    mods: dict[str, Path] = {}
    for root, top in packages:
        for path in sorted((root / top).rglob("*.py")):
            mods[_module_name(root, path)] = path
    return mods


def imports_of(name: str, path: Path, known: Iterable[str] = ()) -> set[str]:
    """Absolute names this module imports, relative ones resolved; ``known``: the project's module names (to tell
    ``from pkg import submodule`` from ``from module import name``)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` names the module (as ``import pkg.mod`` does); other names, the package.
            names = [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
            submodules = [n for n in names if n in known]
            out.update(submodules)
            if len(submodules) < len(node.names):
                out.add(module)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (itself excluded)."""
    return {name: {m for m in imports_of(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return f"{len(comp)} modules: " + "; ".join(edges)


def _top(name: str) -> str:
    return name.partition(".")[0]


def test_no_import_cycles_between_project_modules():
    graph = import_graph(project_modules())
    found = cycles(graph)
    assert not found, "import cycles (break each by moving the shared piece down a layer):\n" + "\n".join(
        _describe(c, graph) for c in found)


def test_core_never_imports_kfp_components_or_pipelines():
    bad = []
    for name, path in project_modules().items():
        if _top(name) != "editinfinity":
            continue
        for target in sorted(imports_of(name, path)):
            if _top(target) in ("kfp", "kfp_server_api", "components", "pipelines"):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "core must not depend on the Kubeflow layer:\n" + "\n".join(bad)


def test_components_never_import_pipelines():
    bad = [f"{path.relative_to(ROOT)} imports {target}" for name, path in project_modules().items()
           if _top(name) == "components" for target in sorted(imports_of(name, path)) if _top(target) == "pipelines"]
    assert not bad, "components sit below pipelines:\n" + "\n".join(bad)


def test_the_checks_see_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, and a relative ``from .. import``."""
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n    return c\n")
    (pkg / "c.py").write_text("import demo.a\n")
    (pkg / "d.py").write_text("from demo import c\n")
    graph = import_graph(project_modules([(tmp_path, "demo")]))
    assert graph["demo.sub.b"] == {"demo.c"} and graph["demo.d"] == {"demo.c"} and graph["demo.a"] == {"demo.sub.b"}
    assert cycles(graph) == [["demo.a", "demo.c", "demo.sub.b"]]
