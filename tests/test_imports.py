"""The package's imports run one way: no cycle, and no module uses another's private names.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import
is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bbr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(
    module: str, text: str, modules: Mapping[str, str]
) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, private name used from it or None, line) for each use in `text`."""
    tree = ast.parse(text)
    is_package = f"{module}.__init__" in modules or any(m.startswith(module + ".") for m in modules)
    aliases: dict[str, str] = {}  # local name -> package module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, None, node.lineno
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, is_package)
            if source not in modules:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from bbr import server`: the module itself
                    yield sub, None, node.lineno
                    aliases[alias.asname or alias.name] = sub
                else:
                    yield source, alias.name if _private(alias.name) else None, node.lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = _dotted(node.value)
            if target is None:
                continue
            head, _, rest = target.partition(".")
            resolved = aliases.get(head, head) + ("." + rest if rest else "")
            if resolved in modules and resolved != module:
                yield resolved, node.attr, node.lineno


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def problems(modules: Mapping[str, str]) -> tuple[list[str], list[list[str]]]:
    """Private names used across modules, and the import cycles, in `modules`."""
    private: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, text in modules.items():
        for imported, name, line in imports(module, text, modules):
            if imported == module:
                continue
            if name is not None:
                private.append(f"{module}:{line} uses {imported}.{name}")
            # A submodule's package is imported first, but that is no dependency on it.
            if not module.startswith(imported + "."):
                graph[module].add(imported)
    return private, cycles(graph)


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_private_name_crosses_a_module_and_no_import_cycle() -> None:
    modules = sources()
    assert "bbr.server" in modules and "bbr.sources.files" in modules
    private, loops = problems(modules)
    assert private == []
    assert loops == []


def test_the_check_sees_private_names_and_cycles_lazy_ones_too() -> None:
    """The check above can fail: each kind of breach in a made-up package is found."""
    modules = {
        "pkg": "",
        "pkg.a": "from pkg.b import _hidden, shown\n",
        "pkg.b": "def f():\n    from pkg import c\n    return c._inner\n",
        "pkg.c": "import pkg.a\nfrom . import d\n",
        "pkg.d": "from pkg import __doc__\nimport pkg.e as e\nx = e._y\n",
        "pkg.e": "",
    }
    private, loops = problems(modules)
    assert private == [
        "pkg.a:1 uses pkg.b._hidden",
        "pkg.b:3 uses pkg.c._inner",
        "pkg.d:3 uses pkg.e._y",
    ]
    assert loops == [["pkg.a", "pkg.b", "pkg.c"]]


def test_server_and_supervisor_import_one_way() -> None:
    """bbr.cli picks bbr.workers or bbr.server; the server never imports the supervisor,
    and neither imports the CLI."""
    graph = {m: {i for i, _, _ in imports(m, t, sources())} for m, t in sources().items()}
    assert "bbr.workers" not in graph["bbr.server"]
    assert "bbr.cli" not in graph["bbr.server"] | graph["bbr.workers"]
    assert {"bbr.server", "bbr.workers", "bbr.config"} <= graph["bbr.cli"]
