"""The package's structure: names loaded by string resolve, the import graph has no cycle,
modules and classes stay small. Read from the source with `ast`; nothing here builds an engine.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "lorasync"
MAX_MODULE_LINES, MAX_CLASS_LINES = 400, 250
# A dotted name in lorasync, optionally `module:attribute` (entry points, reward functions).
DOTTED = re.compile(r"\blorasync(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(dotted: str) -> object:
    """The object a dotted name (`a.b.c` or `a.b:c`) names; ImportError or AttributeError if none."""
    if ":" in dotted:
        module, attr = dotted.split(":")
        return getattr(importlib.import_module(module), attr)
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
        name = ".".join(parts[:i])
        if not _is_module(name):
            continue
        obj = importlib.import_module(name)
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {dotted!r}")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is not a package
        return False


# --- (a) every name loaded by string resolves ---------------------------------------------------


def declared_entry_points() -> dict[str, str]:
    """pyproject's console scripts and vLLM plugins: what pip installs, what vLLM loads."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        **{f"console_scripts:{k}": v for k, v in project["scripts"].items()},
        **{f"{group}:{k}": v for group, eps in project["entry-points"].items() for k, v in eps.items()},
    }


def string_constants() -> Iterator[tuple[str, str]]:
    """(where, dotted name) for every lorasync dotted name in a string of the package's source,
    docstrings included (they point readers at these names)."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in DOTTED.findall(node.value):
                    yield f"{name}:{node.lineno}", match.rstrip(".")


def test_entry_points_resolve_and_match_what_is_installed():
    declared = declared_entry_points()
    assert declared["console_scripts:lorasync"] == "lorasync.commands.cli:main"
    assert declared["vllm.general_plugins:lorasync"] == "lorasync.server.serve.receiver:register"
    for key, value in declared.items():
        assert callable(resolve(value)), key
        group, name = key.split(":")
        installed = {e.name: e.value for e in entry_points(group=group)}
        # vLLM and pip read the installed metadata: a stale install loads names that moved
        assert installed.get(name) == value, f"{key}: installed {installed.get(name)!r}; pip install -e ."


def test_the_backend_vllm_builds_and_the_middleware_resolve():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from lorasync.server import BACKEND
    from lorasync.server.serve.guard import TokenGuard
    from lorasync.server.serve.launch import MIDDLEWARE
    from lorasync.server.serve.receiver import LoraTransferEngine, register

    assert resolve(MIDDLEWARE) is TokenGuard
    register()
    register()  # vLLM may call plugins again in one process
    assert WeightTransferEngineFactory._registry[BACKEND]() is LoraTransferEngine


def test_every_dotted_name_in_the_source_resolves():
    from lorasync.server.serve.launch import MIDDLEWARE

    found = list(string_constants())
    assert MIDDLEWARE in {dotted for _, dotted in found}  # the scan sees the names vLLM loads
    broken = []
    for where, dotted in found:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as err:
            broken.append(f"{where}: {dotted} ({type(err).__name__}: {err})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_import_only_what_exists(path):
    """Examples import lorasync inside functions (vLLM spawns workers): read, not run."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorasync"):
            for alias in node.names:
                resolve(f"{node.module}:{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lorasync"):
                    importlib.import_module(alias.name)


# --- (b) no import cycle ------------------------------------------------------------------------


def _lazy_reexports(tree: ast.Module) -> set[int]:
    """ids of nodes inside a module-level `__getattr__` (PEP 562): a package's lazy re-export of
    a name from its own submodule, run only when the name is asked for, after the package is
    loaded; it cannot make an import cycle."""
    return {
        id(n) for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for n in ast.walk(node)
    }


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, at module level or inside functions. `from a.b import
    c` imports a.b.c if that is a module, else a.b; importing a module imports its packages."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree) | _lazy_reexports(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    edges = set()
    for target in targets:
        parts = target.split(".")
        edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # its packages too
    return {t for t in edges if t in known and t != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        return err.args[1]
    return None


def test_the_import_graph_is_read_right():
    graph = import_graph()
    assert "lorasync.sync.base" in graph["lorasync.sync.weight_sync"]
    assert "lorasync.recipes.demo" in graph["lorasync.commands.cli"]  # imported inside a function
    assert "lorasync.engines.worker" in graph["lorasync.engines.colocated"]  # `from pkg import module`
    assert "lorasync.server" in graph["lorasync.server.serve.guard"]  # a package's __init__
    assert not any(m.startswith("vllm") for deps in graph.values() for m in deps)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, from the bottom up: each folder (or top-level module) imports only from its own
# layer and those below it, inside functions too. docs/architecture.md names the same order.
LAYERS = (
    ("machine", "served_model"),
    ("sync",),
    ("models",),
    ("engines",),
    ("server",),
    ("backend",),
    ("environments",),
    ("tasks",),
    ("train",),
    ("integrations",),
    ("recipes",),
    ("bench",),
    ("commands",),
    ("__main__",),
)


def layer(module: str) -> int:
    """The layer of a module (`lorasync.sync.plan` -> that of `sync`)."""
    top = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: its folder {top!r} is in no layer of LAYERS; add it there and in docs/architecture.md")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import of a module from a higher layer."""
    return sorted(
        f"{name} -> {dep}" for name, deps in graph.items() if name != "lorasync"
        for dep in deps if layer(dep) > layer(name)
    )


def test_folders_import_only_downward():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_sees_an_upward_import_even_inside_a_function():
    graph = import_graph()
    assert upward_imports(graph | {"lorasync.sync.plan": {"lorasync.train.config"}}) == [
        "lorasync.sync.plan -> lorasync.train.config"
    ]
    assert "lorasync.backend.open" in graph["lorasync.tasks.eval"]  # lazy, and downward


def test_the_docs_name_the_layers_in_this_order():
    order = " < ".join(", ".join(f"`{n}`" for n in names) for names in LAYERS)
    assert order in (ROOT / "docs" / "architecture.md").read_text()


# --- (c) small modules and classes ------------------------------------------------------------------


def test_no_module_or_class_is_too_long():
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {len(text.splitlines())} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_long.append(f"class {name}.{node.name}: {lines} lines > {MAX_CLASS_LINES}")
    assert not too_long, "\n".join(too_long)


# --- (d) tests mirror the package -----------------------------------------------------------------

TESTS = ROOT / "tests"
# Modules with logic whose tests are not in the file of their name, and why.
TESTED_ELSEWHERE = {
    # a benchmark's module-scoped run (a server, a CLI run of vLLM) feeds these tests: a file
    # of their own would start it again (~30 s each in CI)
    "bench/server.py": "tests/bench/test_sync.py",
    "bench/verdict_cases.py": "tests/bench/test_verdict.py",
    "bench/verdict_report.py": "tests/bench/test_verdict.py",
    # packages whose __init__ holds one small thing, tested where it is used
    "engines/__init__.py": "tests/engines/test_install.py",
    "server/client/__init__.py": "tests/server/client/test_engine.py",
    "server/transports/__init__.py": "tests/server/client/test_update.py",
}


def has_logic(path: Path) -> bool:
    """A module defines a function or a class (constants and docstrings need no test file)."""
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)


def mirror(path: Path) -> Path:
    """The test file of a module: src/lorasync/a/b.py -> tests/a/test_b.py."""
    rel = path.relative_to(PACKAGE)
    return TESTS / rel.parent / f"test_{rel.stem}.py"


def untested_modules() -> list[str]:
    """Modules with logic and no test file of their name, nor an entry in TESTED_ELSEWHERE."""
    return sorted(
        path.relative_to(PACKAGE).as_posix() for path in modules().values()
        if has_logic(path) and not mirror(path).is_file()
        and path.relative_to(PACKAGE).as_posix() not in TESTED_ELSEWHERE
    )


def test_every_module_with_logic_has_a_test_file_of_its_name():
    assert untested_modules() == [], "add tests/<folder>/test_<module>.py (or say where in TESTED_ELSEWHERE)"


def test_every_exemption_names_a_module_with_logic_and_a_test_file_that_imports_it():
    for module, test_file in TESTED_ELSEWHERE.items():
        path = PACKAGE / module
        assert path.is_file() and has_logic(path) and not mirror(path).is_file(), module
        dotted = module_name(path)
        assert dotted in (ROOT / test_file).read_text() or dotted.rpartition(".")[0] in (ROOT / test_file).read_text(), (
            f"{test_file} does not name {dotted}"
        )


def test_the_mirror_rule_sees_a_missing_test_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TESTS", tmp_path)
    assert "sync/plan.py" in untested_modules()
