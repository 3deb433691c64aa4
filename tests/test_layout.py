"""The repository layout keeps `platform/` a source root that never shadows the standard library."""

import ast
import subprocess
import sys

from conftest import REPO


def test_platform_is_not_a_package():
    assert (REPO / "platform" / "ember" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_gives_the_standard_library_from_the_repo_root():
    code = "import platform, ember; print(platform.__file__); print(platform.python_version()); print(ember.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    platform_file, version, ember_file = out.split("\n")[:3]
    assert platform_file.endswith("platform.py") and str(REPO) not in platform_file
    assert version.count(".") == 2
    assert ember_file.startswith(str(REPO / "platform" / "ember"))


def test_project_folders_exist():
    for folder in ("platform/ember", "jobs", "serve", "cluster", "benchmarks", "tests"):
        assert (REPO / folder).is_dir(), folder
    for name in ("pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (REPO / name).is_file(), name
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _ember_imports() -> dict[str, set[str]]:
    """Each module of platform/ember -> the ember modules it imports, at the top or inside a function alike (an
    import deferred into a function still ties the two modules together)."""
    root = REPO / "platform"
    modules = {}
    for path in (root / "ember").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from ember.data import shards` imports the module ember.data.shards; `from ember.x import f`, ember.x
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_package_has_no_import_cycle_and_nothing_imports_the_cli():
    graph = _ember_imports()
    assert len(graph) > 50 and "ember.train.trainer" in graph["ember.train.launch"] | set().union(*graph.values())
    assert _cycles(graph) == []
    assert not [name for name, imports in graph.items() if "ember.cli" in imports]
    # Nor between the planes: ember.data, ember.train, ... as wholes (a module directly in ember/ is its own plane).
    plane = {name: ".".join(name.split(".")[:2]) for name in graph}
    planes = {p: set() for p in plane.values()}
    for name, imports in graph.items():
        planes[plane[name]] |= {plane[m] for m in imports} - {plane[name]}
    assert len(planes) > 10 and _cycles(planes) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
