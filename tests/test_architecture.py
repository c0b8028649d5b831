"""The package's layering: no import cycles anywhere in src/fedzip, counting imports inside functions too.

A cycle hidden behind a function-level import still ties two layers together (config -> methods -> config
was one); the registry (``fedzip.registry``) is how a lower layer finds a method without importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "fedzip").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the fedzip modules it imports (importing a.b.c also runs a and a.b)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    # a module's own parent packages are already running when it is imported
                    if dep in mods and dep != mod and not mod.startswith(dep + "."):
                        graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_src():
    graph = import_graph()
    assert "fedzip.methods.fedbiot" in graph and "fedzip.config" in graph["fedzip.methods.fedbiot"]
    assert cycles(graph) == []


def test_registry_imports_no_fedzip_module():
    assert import_graph()["fedzip.registry"] == set()


RUN_FILES = ("metrics.jsonl", "ledger.jsonl", "summary.json", "config.yaml", "method.json", "partition.json",
             "server_private.jsonl", "run.json", "report.html", "autoencoder_gate.json", "flower_traffic.json")


def test_only_the_run_directory_module_names_its_files():
    """One module knows the run directory's layout; it sits below every other layer (imports none of them)."""
    assert import_graph()["fedzip.rundir"] == set()
    for path in (SRC / "fedzip").rglob("*.py"):
        if path.name == "rundir.py":
            continue
        named = [f for f in RUN_FILES if f'"{f}"' in path.read_text()]
        assert not named, f"{path.relative_to(SRC)} spells out {named}: use fedzip.rundir.RunDir"


PROTOCOL_MODULES = {"fedzip.methods.base", "fedzip.methods.state"}  # what every method implements, not a method


def _engine_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in (SRC / "fedzip" / "engine").glob("*.py")}


def test_the_engine_names_no_method():
    from fedzip.registry import method_names

    for name, text in _engine_sources().items():
        words = {node.value for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str)}
        words |= {node.id for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Name)}
        assert not words & set(method_names()), name
        module = "fedzip.engine" + ("" if name == "__init__.py" else "." + name[:-3])
        imported = {target for target in import_graph()[module] if target.startswith("fedzip.methods.")}
        assert imported <= PROTOCOL_MODULES, name  # no method's module: methods come through the registry


def test_the_engine_reads_only_the_method_protocol():
    """Every attribute the engine reads off a method (``method.x``, ``method_cls.x``) is the base class's."""
    from fedzip.methods import Method

    protocol = {n for n in dir(Method) if not n.startswith("__")} | {"cfg", "rt", "opts"}
    holders = {"method", "method_cls", "client_method"}
    for name, text in _engine_sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute):
                base = node.value
                holder = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
                if holder in holders:
                    assert node.attr in protocol, f"{name}: {holder}.{node.attr} is not in the method protocol"
