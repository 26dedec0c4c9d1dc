"""The package's layers, read from its source: no import cycle at run time, and no layer that
reaches across (docs/architecture.md).

Imports made at run time are those at a module's top level (and in its top-level ``try``/``if``
blocks), except under ``if TYPE_CHECKING:``; imports inside functions run later, on demand, and
are what keeps tooling out of the server's import path, so they are not edges here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "roomcast"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> set[str]:
    """The roomcast modules ``path`` imports when it is imported."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                found.add(target)
                # "from roomcast.x import y" may name the module roomcast.x.y
                found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in runtime_imports(path) if t in modules and t != name}
        # Importing roomcast.a.b runs roomcast/a/__init__.py first.
        for target in list(targets):
            parent = target.rpartition(".")[0]
            while parent and parent != name and not name.startswith(parent + "."):
                targets.add(parent)
                parent = parent.rpartition(".")[0]
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := walk(target)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node)) is not None:
            return cycle
    return None


def test_the_checker_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_at_run_time() -> None:
    edges = graph()
    assert "roomcast.core.node" in edges  # the walk found the package
    assert find_cycle(edges) is None


def test_leaf_modules_import_nothing_of_roomcast() -> None:
    edges = graph()
    for leaf in ("roomcast.version", "roomcast.counters", "roomcast.closecodes"):
        assert edges[leaf] == set(), leaf


#: The wire formats; the core knows only their common interface (roomcast.codecs.Codec).
CODECS = ("roomcast.codecs.roomcast_json", "roomcast.codecs.guide")

#: What each layer may not import at run time (docs/architecture.md).
FORBIDDEN = {
    # The application core: no wire format of its own, no endpoint, no transport detail.
    "roomcast.core.node": ("roomcast.http", "roomcast.transport", *CODECS, "metrics"),
    "roomcast.core.hub": ("roomcast.http", "roomcast.transport", *CODECS, "metrics"),
    "roomcast.core.recovery": ("roomcast.http", "roomcast.transport", *CODECS),
    "roomcast.core.session": ("roomcast.http", "roomcast.transport", *CODECS),
    # Brokers store and carry bytes: no codec, no core, no endpoint, no exporter.
    "roomcast.brokers.base": ("roomcast.codecs", "roomcast.core", "roomcast.http", "metrics"),
    "roomcast.brokers.memory": ("roomcast.codecs", "roomcast.core", "roomcast.http", "metrics"),
    "roomcast.brokers.redis": ("roomcast.codecs", "roomcast.core", "roomcast.http", "metrics"),
    # Codecs are sans-I/O: no core, no endpoint, no transport.
    "roomcast.codecs.roomcast_json": ("roomcast.core", "roomcast.http", "roomcast.transport"),
    "roomcast.codecs.guide": ("roomcast.core", "roomcast.http", "roomcast.transport"),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_layers_do_not_reach_across(module: str) -> None:
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    imported = runtime_imports(path)
    assert imported, module
    crossing = sorted(
        target
        for target in imported
        if target.startswith("roomcast")
        and any(
            target.startswith(bad) if bad.startswith("roomcast") else target.endswith("." + bad)
            for bad in FORBIDDEN[module]
        )
    )
    assert crossing == [], f"{module} imports {crossing}"


def test_the_core_does_not_branch_on_the_transport() -> None:
    """The hub and the node hand frames to outboxes; only the outbox knows how a transport
    takes them (roomcast's frames or plain ASGI)."""
    for name in ("hub.py", "node.py", "session.py", "recovery.py"):
        text = (PACKAGE / "core" / name).read_text()
        for word in (".fast", "build_frame", "FRAMES_EXTENSION", "websocket.send"):
            assert word not in text, f"core/{name} mentions {word}"
