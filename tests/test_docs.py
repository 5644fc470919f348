"""The documentation names what exists: every module has its row in docs/architecture.md, every
row names a module, and the README's two commands exist (CI runs the test one).

The rule for a module's row: in docs/architecture.md's "## Every module" chapter, each
`### ` section names its package(s) in backticks in its heading (`### \\`sync/\\`: ...`; the
top-level modules are under `### Top level`), and a table row's first cell names the module in
backticks, as `generation.py` where the section holds one package, or as `train/generation.py`;
in a section of one package, `client/engine.py` is that package's subfolder (`server/client/engine.py`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "lorasync"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"


def needs_row(path: Path) -> bool:
    """Every module needs a row, but an `__init__.py` only where it holds more than a docstring
    and imports (a function, a class, a constant)."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return any(not isinstance(node, (ast.Import, ast.ImportFrom)) for node in body)


def modules() -> set[str]:
    """The modules that need a row, as paths relative to src/lorasync (`train/generation.py`)."""
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if needs_row(path)
    }


def documented(text: str) -> tuple[set[str], list[str]]:
    """The modules the "Every module" chapter has rows for, and the problems: a bare file name
    in a section of several packages, a path outside the section's packages."""
    chapter = text.split("\n## Every module", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    problems: list[str] = []
    for section in chapter.split("\n### ")[1:]:
        heading, _, body = section.partition("\n")
        packages = re.findall(r"`([a-z_]+)/`", heading)
        if heading.strip().lower() == "top level":
            packages = [""]
        for line in body.splitlines():
            if not line.startswith("|"):
                continue
            first = line.split("|")[1]
            for name in re.findall(r"`([\w/]+\.py)`", first):
                package, _, _ = name.rpartition("/")
                if "/" in name and len(packages) == 1 and packages[0] and not name.startswith(f"{packages[0]}/"):
                    found.add(f"{packages[0]}/{name}")  # a subfolder of the section's package
                elif "/" in name:
                    if package not in packages:
                        problems.append(f"{name} is under the section {heading!r}")
                    found.add(name)
                elif len(packages) == 1:
                    found.add(f"{packages[0]}/{name}" if packages[0] else name)
                else:
                    problems.append(f"{name} in {heading!r}: name its package (`pkg/{name}`)")
    return found, problems


def test_every_module_has_a_row_in_architecture():
    found, problems = documented(ARCHITECTURE.read_text())
    missing = sorted(modules() - found)
    assert not problems, problems
    assert not missing, f"docs/architecture.md has no row for: {missing}"


def test_every_row_of_architecture_names_a_module():
    found, _ = documented(ARCHITECTURE.read_text())
    gone = sorted(name for name in found if not (PACKAGE / name).is_file())
    assert not gone, f"docs/architecture.md has rows for modules that do not exist: {gone}"


def test_the_rule_sees_a_removed_row():
    text = ARCHITECTURE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `generation.py` |"))
    found, _ = documented(text.replace(row + "\n", ""))
    assert "train/generation.py" in modules() - found


def test_readme_commands_exist_and_ci_runs_the_test_one():
    readme = README.read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme, f"README.md does not show `bash {script}`"
        assert (ROOT / script).is_file(), script
    assert "lorasync demo" in (ROOT / "scripts" / "demo.sh").read_text()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_resolve():
    readme = README.read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert links
    broken = [link for link in links if not (ROOT / link).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
