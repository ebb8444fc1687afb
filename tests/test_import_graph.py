"""The first-party import graph (``tolaria`` and ``bench``) has no cycle.

Every ``import`` statement counts, at module level and inside functions (a lazy import is still
an edge: it runs when the function does), except those under ``if TYPE_CHECKING:``. An edge
goes to the module whose code the import runs:

- ``import a.b.c`` and ``from a.b.c import name`` run ``a.b.c``, and first the ``__init__`` of
  each package on the way that does not also contain the importer (those are already running);
- ``from pkg import sub`` where ``sub`` is a submodule (``sub.py``, a package, a ``.pyi`` stub of a
  compiled module) is an edge to ``pkg.sub``;
- ``from pkg import name`` for a name ``pkg/__init__.py`` re-exports from a submodule is an edge to
  that defining submodule (followed through chains of re-exports); any other name is an edge to
  ``pkg`` itself;
- relative imports are resolved against the importer's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("tolaria", "bench")

Graph = Mapping[str, Iterable[str]]


# ------------------------------------------------------------------------------------ modules
def module_files(root: Path, tops: Iterable[str]) -> dict[str, Path]:
    """Module name -> source file for every ``.py`` file under ``root/<top>``."""
    modules: dict[str, Path] = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if any(not part.isidentifier() for part in parts):
                continue  # not importable (a scratch file, a folder with a dash)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _is_submodule(package: str, name: str, modules: Mapping[str, Path]) -> bool:
    """``package.name`` is a module: a ``.py`` file, a package, or a compiled module (its stub)."""
    if f"{package}.{name}" in modules:
        return True
    if package not in modules or not _is_package(package, modules):
        return False
    folder = modules[package].parent
    return (
        (folder / f"{name}.pyi").exists()
        or any(folder.glob(f"{name}.*.so"))
        or any(folder.glob(f"{name}.*.pyd"))
    )


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth, except those under ``if TYPE_CHECKING:``
    (the ``else:`` branch of such an ``if`` does run, so it counts)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _package_of(module: str, modules: Mapping[str, Path]) -> str:
    """The package a module's relative imports are resolved against."""
    if module in modules and _is_package(module, modules):
        return module
    return module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, importer: str, modules: Mapping[str, Path]) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(importer, modules).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


# ------------------------------------------------------------------------------------ resolving
class Resolver:
    """Turns import statements into first-party module names (see the module docstring)."""

    def __init__(self, modules: Mapping[str, Path], tops: Iterable[str]) -> None:
        self.modules = modules
        self.tops = tuple(tops)
        self._trees: dict[str, ast.Module] = {}

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.modules[module]
            self._trees[module] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return self._trees[module]

    def first_party(self, name: str) -> bool:
        return name.split(".")[0] in self.tops

    def _existing_prefix(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a known module (``a.b.attr`` -> ``a.b``)."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules:
                return candidate
        return None

    def defining_module(self, package: str, name: str, seen: frozenset[str] = frozenset()) -> str:
        """Where ``from package import name`` finds ``name``: the submodule ``package/__init__``
        re-exports it from (followed through further re-exports), else ``package``."""
        if package in seen or package not in self.modules or not _is_package(package, self.modules):
            return package
        for node in self.tree(package).body:  # the names an __init__ re-exports are top level
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(node, package, self.modules)
            for alias in node.names:
                if (alias.asname or alias.name) != name:
                    continue
                if _is_submodule(source, alias.name, self.modules):
                    return f"{source}.{alias.name}"
                found = self._existing_prefix(source)
                if found is None:
                    return package  # re-exported from a third-party module
                return self.defining_module(found, alias.name, seen | {package})
        return package

    def _with_parents(self, importer: str, target: str) -> set[str]:
        """``target`` and the package ``__init__``s that importing it runs first: those on its
        path that do not also contain ``importer``."""
        out = {target}
        parts = target.split(".")
        for end in range(1, len(parts)):
            package = ".".join(parts[:end])
            if importer == package or importer.startswith(package + "."):
                continue
            if package in self.modules:
                out.add(package)
        return out

    def targets(self, importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
        """The first-party modules one import statement of ``importer`` runs."""
        out: set[str] = set()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if self.first_party(alias.name) and (found := self._existing_prefix(alias.name)):
                    out |= self._with_parents(importer, found)
            return out
        source = _absolute(node, importer, self.modules)
        if not self.first_party(source):
            return out
        found = self._existing_prefix(source)
        if found is None:
            return out
        for alias in node.names:
            if alias.name == "*":
                out |= self._with_parents(importer, found)
            elif found == source and _is_submodule(source, alias.name, self.modules):
                out |= self._with_parents(importer, f"{source}.{alias.name}")
            else:
                out |= self._with_parents(importer, self.defining_module(found, alias.name))
        return out

    def imports_of(self, module: str) -> set[str]:
        """The first-party modules ``module`` imports (itself excluded; compiled modules, which
        have no source here, are left out too: they import nothing of ours)."""
        out: set[str] = set()
        for node in import_nodes(self.tree(module)):
            out |= self.targets(module, node)
        return {target for target in out if target != module and target in self.modules}


def build_graph(root: Path = REPO, tops: Iterable[str] = FIRST_PARTY) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports, for every module under ``root/<top>``."""
    tops = tuple(tops)
    resolver = Resolver(module_files(root, tops), tops)
    return {module: resolver.imports_of(module) for module in resolver.modules}


# ------------------------------------------------------------------------------------ cycles
def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    edges = {node: sorted(set(targets)) for node, targets in graph.items()}
    for targets in list(edges.values()):
        for target in targets:
            edges.setdefault(target, [])
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if position < len(edges[node]):
                work.append((node, position + 1))
                target = edges[node][position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def cycle_in(graph: Graph, component: Iterable[str]) -> list[str]:
    """One shortest cycle through the first (sorted) node of a strongly connected component,
    as a path that starts and ends on that node."""
    members = set(component)
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(set(graph.get(node, ()))):
                if target not in members:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise ValueError(f"{sorted(members)} is not a cycle")


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-import)."""
    cycles = []
    for component in strongly_connected(graph):
        if len(component) > 1 or component[0] in set(graph.get(component[0], ())):
            cycles.append(cycle_in(graph, component))
    return cycles


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


# ------------------------------------------------------------------------------------ tests
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "f"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    # Two cycles sharing a node are one component; the shortest cycle through its first node.
    assert find_cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"x"}}) == [["x", "y", "x"]]


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_graph_sees_lazy_relative_and_reexported_imports_but_not_type_checking_ones(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.defs import Thing\nfrom .sub import helper as util\n",
            "pkg/defs.py": "def make():\n    from pkg import user\n    return user\nclass Thing: ...\n",
            "pkg/user.py": "from pkg import Thing\nfrom . import defs\n",
            "pkg/typed.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.user import x\n"
                "else:\n    import pkg.sub\n"
            ),
            "pkg/sub/__init__.py": "from ..defs import Thing\n",
            "pkg/sub/helper.py": "from pkg import util\n",
            "other/__init__.py": "",
            "other/main.py": "import pkg.sub.helper\nimport json\n",
        },
    )
    graph = build_graph(tmp_path, ("pkg", "other"))
    assert graph["pkg"] == {"pkg.defs", "pkg.sub", "pkg.sub.helper"}
    assert graph["pkg.defs"] == {"pkg.user"}
    assert graph["pkg.user"] == {"pkg.defs"}  # `from pkg import Thing` is pkg.defs's Thing
    assert graph["pkg.typed"] == {"pkg.sub"}
    assert graph["pkg.sub"] == {"pkg.defs"}
    assert graph["pkg.sub.helper"] == set()  # `from pkg import util` is itself: no edge
    assert graph["other.main"] == {"pkg", "pkg.sub", "pkg.sub.helper"}
    assert find_cycles(graph) == [["pkg.defs", "pkg.user", "pkg.defs"]]


def test_first_party_imports_have_no_cycle() -> None:
    graph = build_graph()
    assert "tolaria.cli" in graph and "bench.runner" in graph  # the walk found the code
    assert "tolaria.governor" in graph["tolaria"]
    cycles = find_cycles(graph)
    if cycles:
        print("import cycles:\n" + describe(cycles))
    assert not cycles, "import cycles (module -> module it imports):\n" + describe(cycles)


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [("bench.runner", "tolaria.cli"), ("tolaria.demo.runner", "tolaria.demo.report")],
)
def test_the_two_broken_circles_stay_broken(importer: str, forbidden: str) -> None:
    assert forbidden not in build_graph()[importer]


def test_nothing_imports_the_command_line() -> None:
    graph = build_graph()
    importers = sorted(m for m, targets in graph.items() if "tolaria.cli" in targets)
    assert importers == ["tolaria.__main__"]
