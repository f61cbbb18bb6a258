"""The architecture, checked: which package may import which, and no import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MAY_IMPORT = {
    "task": set(),
    "crypto": set(),
    "strategies.detection": {"task"},
    "strategies": {"task", "crypto", "strategies.detection"},
    "attacks": {"task", "strategies.detection.heatmaps", "strategies.detection.update_views"},
    "client_app": {"task", "attacks", "crypto"},
    "server_app": {"task", "strategies", "crypto"},
    "experiments": {"task", "strategies", "attacks", "client_app", "server_app"},
    "deploy": set(),
}
"""The project packages (or single modules) each package may use besides itself: a layered
graph, no cycle. A package's subpackage listed here is a layer of its own: the detection math
(``strategies.detection``) sits below the defenses and knows none of them. A defense knows no attack and does no I/O; the server's harness only forwards
messages (attacks run on clients); the one exception: an adaptive, white-box attack may use the
defense's heat-map function and its views of the updates. The experiment tools (sweep and
report), run on the operator's host, sit above the ServerApp: the sweep checks a grid's defense
and attack names before any cell runs, the report reuses the harness's metrics, and the
in-process federation the benchmarks and tests run (``experiments.federation``) uses the
ClientApp's seeding and probes as well as the ServerApp's defenses; no package lists them, so
nothing the ServerApp or the ClientApps run imports them."""


def _layer_of(name: str) -> str:
    """The layer a dotted module name belongs to: the longest listed package containing it."""
    return max((p for p in MAY_IMPORT if name == p or name.startswith(f"{p}.")), key=len)


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).glob("*.py"))


def _modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}" if path.stem != "__init__" else package: path
            for package in MAY_IMPORT for path in _files(package)}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Project modules ``path`` imports (at module level only: what runs at import time,
    leaving out ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if top_level_only:
        nodes = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] in MAY_IMPORT}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_layers_below_it(package):
    assert _files(package), f"no modules in {package}"
    for path in _files(package):
        for name in _imports(path, top_level_only=False):
            reach = MAY_IMPORT[package]
            allowed = _layer_of(name) == package or any(
                name == a or name.startswith(f"{a}.") for a in reach)
            assert allowed, (
                f"{path.relative_to(ROOT)} imports {name}: {package} may import "
                f"{sorted(reach)}")


def test_the_layers_form_no_cycle():
    done: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"cycle {' -> '.join((*path, package))}"
        for below in MAY_IMPORT[package]:
            visit(_layer_of(below), (*path, package))
        done.add(package)

    for package in MAY_IMPORT:
        visit(package, ())


def test_no_module_imports_itself_back_at_import_time():
    modules = _modules()
    graph = {m: {n for n in _imports(p, top_level_only=True) if n in modules and n != m}
             for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "open"
        for used in graph[module]:
            visit(used, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])



def test_no_package_may_import_the_experiment_tools():
    """The host tools' wider reach (the attacks' registry) stays out of the ServerApp and the
    ClientApps: no package's reach includes them, so the check above keeps them out."""
    for package, reach in MAY_IMPORT.items():
        assert not any(name.split(".")[0] == "experiments" for name in reach), package
