"""The tree's layers, kept true: engines below the server, the server's layers in the order data flows
(http → service → cluster → sessions → conversation → media: the model APIs' work and the cluster's
placing and routing of sessions sit between HTTP and the sessions and never serve HTTP themselves), test
support out of the server, NATS only for a cluster, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engines", "media_server")
# What the server's layers may use of the engines: their interfaces, the registry, avatars, audio helpers,
# and the knowledge bases' library.
ENGINE_INTERFACES = {"engines", "engines.base", "engines.registry", "engines.avatar", "engines.audio", "engines.knowledge"}
# Each layer may import the layers after it, never those before it. The model APIs' work (service) uses
# the conversation's pieces (chunker, deadlines), never a session; the cluster places and routes sessions.
SERVER_LAYERS = (
    "media_server.http",
    "media_server.service",
    "media_server.cluster",
    "media_server.sessions",
    "media_server.conversation",
    "media_server.media",
)
LIVE_SERVER = (*SERVER_LAYERS, "media_server.runtime", "media_server.config", "media_server.metrics", "media_server.threads")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (``from a import b`` counts as a.b when b is a module), skipping TYPE_CHECKING
    blocks; with ``top_level_only``, also skipping imports inside functions (done when called)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


MODULES = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def project_imports(module: str, top_level_only: bool = False) -> set[str]:
    return {name for name in imports_of(MODULES[module], top_level_only) if name in MODULES}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_engines_never_import_the_server() -> None:
    offenders = {m: sorted(i for i in project_imports(m) if within(i, "media_server")) for m in MODULES}
    assert {m: i for m, i in offenders.items() if within(m, "engines") and i} == {}


@pytest.mark.parametrize("layer", SERVER_LAYERS)
def test_server_layers_use_only_the_engine_interfaces(layer: str) -> None:
    offenders = {
        module: sorted(i for i in project_imports(module) if within(i, "engines") and i not in ENGINE_INTERFACES)
        for module in MODULES
        if within(module, layer)
    }
    assert {m: i for m, i in offenders.items() if i} == {}


@pytest.mark.parametrize("position", range(len(SERVER_LAYERS)))
def test_server_layers_import_only_downwards(position: int) -> None:
    layer, upper = SERVER_LAYERS[position], SERVER_LAYERS[:position]
    offenders = {
        module: sorted(i for i in project_imports(module) if any(within(i, above) for above in upper))
        for module in MODULES
        if within(module, layer)
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_live_server_never_imports_test_support() -> None:
    offenders = {
        module: sorted(i for i in project_imports(module) if within(i, "media_server.testing"))
        for module in MODULES
        if any(within(module, package) for package in LIVE_SERVER)
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles() -> None:
    graph = {module: project_imports(module, top_level_only=True) - {module} for module in MODULES}
    done: set[str] = set()

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            if (found := cycle_from(imported, [*path, module])) is not None:
                return found
        done.add(module)
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module, [])) is not None]
    assert cycles == []


def test_one_machine_alone_never_imports_nats() -> None:
    """``make run`` needs no NATS: the server, its CLI and the HTTP app import it only for a cluster."""
    check = "import sys, media_server.cli.main, media_server.http.app; print('nats' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"
