"""No import cycles among the modules of encx_async.

The graph is read from the source with ``ast``: every ``import`` counts,
including those inside functions (a lazy import only hides a cycle), except
those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import encx_async

PACKAGE = Path(encx_async.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets: set[str | None] = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                # "from pkg import module" needs the module; "from pkg import name" the package.
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in known else owner(source))
        graph[module] = {target for target in targets if target and target != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    graph = import_graph()
    # from_regions imports the KMS provider inside the method.
    assert "encx_async.providers._kms" in graph["encx_async.providers._multi_region"]
    # _telemetry names Crypto for the type checker only.
    assert "encx_async._crypto" not in graph["encx_async._telemetry"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_import_cycles() -> None:
    assert [sorted(cycle) for cycle in cycles(import_graph())] == []


def test_multi_region_special_cases_no_provider() -> None:
    graph = import_graph()
    multi_region = [
        "encx_async.providers._breaker",
        "encx_async.providers._mode_every_region",
        "encx_async.providers._mode_replicas",
        "encx_async.providers._multi_region",
        "encx_async.providers._regions",
    ]
    for module in multi_region:
        assert "encx_async.providers.local" not in graph[module], module
    # What it needs of a provider is a capability (a protocol), never a provider's name.
    from encx_async.providers._replication import ReplicatesByRegion, ReplicatesIntoServices
    from encx_async.providers.aws import KMSService
    from encx_async.providers.local import LocalKMSService

    assert isinstance(LocalKMSService(), ReplicatesIntoServices)
    assert not isinstance(KMSService(), ReplicatesIntoServices)
    assert isinstance(KMSService(), ReplicatesByRegion)
