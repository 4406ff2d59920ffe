"""The product's import graph: no circle, and no import from a lower floor to a higher one.

Every module of ``winnow/`` and of ``operators/`` (which installs as ``winnow_airflow``) is parsed
with ``ast``; nothing is imported. What counts as an import, wherever it stands in the module:

- ``import x`` and ``from x import y``, at the top, inside functions (lazy imports) and under
  ``if TYPE_CHECKING:`` (a type in a signature is a dependency of the design all the same);
- ``importlib.import_module("x")`` with a literal name. A non-literal name is a dynamic import
  the graph cannot see: it fails the test, except in the one loader the registry has (below);
- the stage registry's ``"module:attribute"`` strings. The registry (``winnow.registry``) is on
  the ground floor, yet it names the compute, config factory and unit reader of every stage,
  which live two floors up. It holds those strings as data: a DAG file reads the registry at
  parse time and imports none of them, and importing the registry imports nothing of the
  product. A string becomes an import only when someone calls the loader of its field
  (``spec.load_compute()``, ``spec.load_config()``, ``spec.load_units()``), in that caller's
  call stack: so each string is an edge from every module that calls its field's loader (found
  here by parsing, not listed by hand) to the string's module. That is where the dependency
  really is. Were the store (storage floor) to ask the registry for a stage's config, it would
  fail here exactly as if it had imported the stage module itself.

Package ``__init__`` modules are nodes of their own (``winnow.rowgroups``) with the imports they
make; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> the import name it installs as.
PACKAGES = {"winnow": "winnow", "operators": "winnow_airflow"}

#: The floors, lowest first. A module may import only from its own floor or lower ones.
FLOOR_NAMES = ("ground", "storage and plan", "runner", "data and stages", "pipeline", "entry points", "airflow")
#: Module or package -> floor. A package covers its submodules; the bare ``winnow`` is its
#: ``__init__`` only. A module no entry covers fails ``test_every_module_has_a_floor``.
FLOORS: dict[str, int] = {
    # ground: errors, schemas, the filter and stage declarations, the results of a run, where a
    # run executes, run keys, test fault specs.
    "winnow": 0,
    "winnow.exceptions": 0,
    "winnow.checks": 0,
    "winnow.schemas": 0,
    "winnow.filters": 0,
    "winnow.results": 0,
    "winnow.registry": 0,
    "winnow.execution": 0,
    "winnow.runkey": 0,
    "winnow.faults": 0,
    # storage and plan: the fs layer, the commit store and fingerprints, the plan, the lease,
    # failure records, and the stage contract (a task holds a plan and opens the store).
    "winnow.rowgroups": 1,
    # runner: Ray connect, request sizes, the row-group and unit runners on one chassis.
    "winnow.ray": 2,
    # data and stages: the index, shard reads, sample data; every stage's compute.
    "winnow.data": 3,
    "winnow.stages": 3,
    "winnow.corpus": 3,
    # pipeline: the run as engine calls, and the dataset card its report step writes.
    "winnow.pipeline": 4,
    "winnow.card": 4,
    # entry points: the Ray Job entry, the read side for people (report), the weights fetch.
    "winnow.job": 5,
    "winnow.report": 5,
    "winnow.models": 5,
    # the Airflow side.
    "winnow_airflow": 6,
}

#: ``StageSpec`` field holding ``"module:attribute"`` strings -> the method that loads them.
REGISTRY_LOADERS = {"compute": "load_compute", "config": "load_config", "units": "load_units"}
REGISTRY_MODULE = "winnow.registry"
#: Positional order of ``StageSpec``'s first fields (``compute`` is the second).
STAGE_SPEC_POSITIONAL = ("name", "compute")
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    how: str  # "import", "lazy import", "type-only import", "import_module", or "registry ..."


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        root = REPO / folder
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _product(name: str) -> bool:
    return name.split(".")[0] in PACKAGES.values()


def _resolve(module: str, imported: str | None = None) -> str:
    """The product module an import reaches: ``pkg.name`` when ``name`` is a submodule."""
    if imported and f"{module}.{imported}" in MODULES:
        return f"{module}.{imported}"
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]  # ``import winnow.x.y`` of a module that is not there
    return module


def _absolute(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = source if MODULES[source].name == "__init__.py" else source.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module")


class _Walker(ast.NodeVisitor):
    """Collects one module's imports, knowing whether each is lazy or type-only."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.edges: list[Edge] = []
        self.dynamic: list[int] = []  # lines of import_module calls with a non-literal name
        self.loader_calls: list[tuple[str, int]] = []  # (registry loader method, line)
        self._depth = 0
        self._type_only = 0

    def _how(self) -> str:
        return "type-only import" if self._type_only else ("lazy import" if self._depth else "import")

    def _add(self, target: str, line: int, how: str) -> None:
        if _product(target):
            self.edges.append(Edge(self.source, target, line, how))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            self._type_only += 1
            for child in node.body:
                self.visit(child)
            self._type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(_resolve(alias.name), node.lineno, self._how())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = _absolute(self.source, node)
        if module == "__future__":
            return
        for alias in node.names:
            self._add(_resolve(module, alias.name), node.lineno, self._how())

    def visit_Call(self, node: ast.Call) -> None:
        if _is_import_module(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(_resolve(arg.value), node.lineno, "import_module")
            else:
                self.dynamic.append(node.lineno)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in REGISTRY_LOADERS.values():
            self.loader_calls.append((f.attr, node.lineno))
        self.generic_visit(node)


def _walk() -> dict[str, _Walker]:
    walkers = {}
    for name, tree in TREES.items():
        w = _Walker(name)
        w.visit(tree)
        walkers[name] = w
    return walkers


WALKERS = _walk()


def registry_targets() -> dict[str, list[str]]:
    """The registry's ``"module:attribute"`` strings, by the ``StageSpec`` field holding them."""
    out: dict[str, list[str]] = {field: [] for field in REGISTRY_LOADERS}
    tree = TREES.get(REGISTRY_MODULE)
    if tree is None:
        return out
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "StageSpec"):
            continue
        values = {field: arg for field, arg in zip(STAGE_SPEC_POSITIONAL, node.args)}
        values.update({kw.arg: kw.value for kw in node.keywords if kw.arg})
        for field in REGISTRY_LOADERS:
            value = values.get(field)
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and TARGET.match(value.value):
                out[field].append(value.value)
    return out


def import_graph() -> list[Edge]:
    """Every edge of the product's import graph (see the module docstring)."""
    edges = [e for w in WALKERS.values() for e in w.edges]
    targets = registry_targets()
    loader_field = {method: field for field, method in REGISTRY_LOADERS.items()}
    for w in WALKERS.values():
        for method, line in w.loader_calls:
            field = loader_field[method]
            for target in targets[field]:
                module = target.split(":")[0]
                edges.append(Edge(w.source, _resolve(module), line, f"registry {field} {target!r} via .{method}()"))
    return list(dict.fromkeys(edges))  # one per (module, target, line, how): ``from x import a, b`` is one import


def floor_of(module: str) -> int | None:
    if module in FLOORS:
        return FLOORS[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):  # a package covers its submodules; bare "winnow" does not
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    if parts[0] == "winnow_airflow":
        return FLOORS["winnow_airflow"]
    return None


def _floor(n: int) -> str:
    return f"{FLOOR_NAMES[n]} ({n})"


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle per strongly connected component that has one (Tarjan, then a path inside)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
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
            components.append(comp)

    for v in sorted(set(graph) | {e.target for e in edges}):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in graph.get(start, {}):
            continue
        # Shortest way back to ``start`` inside the component (breadth first).
        prev: dict[str, Edge] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph.get(v, {}).items()):
                    if w == start:
                        found = e
                        break
                    if w in members and w not in prev:
                        prev[w] = e
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[0].source != start:
            path.insert(0, prev[path[0].source])
        cycles.append(path)
    return cycles


def describe(edge: Edge) -> str:
    return f"{edge.source}:{edge.line} -> {edge.target} ({edge.how})"


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in MODULES if floor_of(m) is None)
    assert not unplaced, f"modules on no floor (place each in FLOORS of {__file__}): {unplaced}"


def test_dynamic_imports_are_accounted_for():
    """A dynamic import the graph cannot follow hides an edge: only the registry's loader may
    have one, and its strings are edges from their loaders' callers."""
    hidden = [f"{name}:{line}" for name, w in WALKERS.items() for line in w.dynamic if name != REGISTRY_MODULE]
    assert not hidden, f"importlib.import_module with a non-literal name (an import this test cannot see): {hidden}"
    targets = registry_targets()
    assert all(targets.values()), f"{REGISTRY_MODULE} names no {[f for f, t in targets.items() if not t]} targets"
    for field, names in targets.items():
        missing = sorted({t for t in names if t.split(":")[0] not in MODULES})
        assert not missing, f"registry {field} strings naming no module of the product: {missing}"


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    text = "\n".join("circle: " + "  ".join(describe(e) for e in cycle) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import circle(s):\n{text}"


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = []
    for e in import_graph():
        low, high = floor_of(e.source), floor_of(e.target)
        if low is not None and high is not None and high > low:
            upward.append(f"{describe(e)}: from {_floor(low)} up to {_floor(high)}")
    assert not upward, f"{len(upward)} import(s) from a lower floor to a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("loader", sorted(REGISTRY_LOADERS.values()))
def test_registry_loaders_are_defined_by_the_registry_alone(loader):
    """The loaders are how registry strings become edges: a same-named method elsewhere would
    make this test attribute registry imports to the wrong callers."""
    defined = sorted(name for name, tree in TREES.items() for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef) and node.name == loader)
    assert defined == [REGISTRY_MODULE], defined
