"""The shape of the code: no import circle (imports for type checking and inside functions
counted), a config that imports nothing of the project but its errors, the loop imported by the
workflow alone, and no function longer than a screen or two."""

import ast
from pathlib import Path

import selfsup

ROOT = Path(selfsup.__file__).parent


def _module(path: Path) -> str:
    return ".".join(("selfsup", *path.relative_to(ROOT).with_suffix("").parts)
                    ).removesuffix(".__init__")


def imports(source: str, name: str, modules: set[str]) -> set[str]:
    """The selfsup modules a module's source imports, anywhere in it (``if TYPE_CHECKING``
    blocks and function bodies included); ``from package import module`` counts the module,
    and ``selfsup.a.b`` counts ``selfsup.a`` too, except a package the module is in."""
    deps = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfsup"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            deps |= subs if subs and len(subs) == len(node.names) else {node.module, *subs}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("selfsup")}
    # importing selfsup.a.b runs selfsup.a first (unless it is a package of the importer's own)
    deps |= {d.rsplit(".", k)[0] for d in deps for k in range(1, d.count("."))}
    return {d for d in deps if d != name and not name.startswith(d + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(p.read_text(), name, set(paths)) for name, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path back to itself for every module on a circle."""
    found = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    found.append(path + [start])
                    stack = []
                    break
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    return found


def test_the_cycle_check_sees_type_checking_and_function_imports():
    a = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from selfsup.b import B\n"
    b = "def f():\n    from selfsup import a\n"
    graph = {"selfsup.a": imports(a, "selfsup.a", {"selfsup.a", "selfsup.b"}),
             "selfsup.b": imports(b, "selfsup.b", {"selfsup.a", "selfsup.b"})}
    assert graph == {"selfsup.a": {"selfsup.b"}, "selfsup.b": {"selfsup.a"}}
    assert cycles(graph)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_config_imports_nothing_of_the_project_but_its_errors():
    assert import_graph()["selfsup.config"] == {"selfsup.errors"}


def test_only_the_workflow_imports_the_loop():
    graph = import_graph()
    users = {m for m, deps in graph.items() if not m.startswith("selfsup.train")
             and any(d == "selfsup.train" or d.startswith("selfsup.train.") for d in deps)}
    assert users == {"selfsup.workflow"}


def test_no_function_is_longer_than_100_lines():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in ROOT.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > 100]
    assert not long, long
