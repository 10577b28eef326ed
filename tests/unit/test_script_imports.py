"""Every project name that `benchmarks/` and `scripts/` import, at module level or inside a function,
still exists: these files run outside the test suite, and a moved function broke two benchmarks at
their first use before.

Checked statically (AST), so the heavy imports inside functions are resolved without running them;
only the project's own modules are imported, not TensorFlow's (they import it lazily)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("benchmarks", "contracts", "ops", "pipeline", "scripts", "screening", "serving", "training")
CHECKED_FOLDERS = ("benchmarks", "scripts")


def _project_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from <project module> import name` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PROJECT_PACKAGES:
                found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


def _missing_names(path: Path) -> list[str]:
    """`file:line: what is missing` for each project import of the file that does not resolve."""
    missing = []
    for line, module, name in _project_imports(path):
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing.append(f"{path.name}:{line}: no module {module} ({exc.name})")
            continue
        if name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")  # `from package import submodule`
            except ModuleNotFoundError:
                missing.append(f"{path.name}:{line}: {module} has no {name}")
    return missing


SCRIPTS = sorted(p for folder in CHECKED_FOLDERS for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_imported_project_name_exists(path: Path):
    missing = _missing_names(path)
    assert not missing, "\n".join(missing)


def test_the_check_reports_a_moved_name_inside_a_function(tmp_path: Path):
    """The case that broke two benchmarks: a function-level import of a name that moved away."""
    script = tmp_path / "bench.py"
    script.write_text("def main():\n    from training.gate import no_such_function\n"
                      "    from contracts.no_such_module import x\n    from contracts import settings\n")
    assert _missing_names(script) == ["bench.py:2: training.gate has no no_such_function",
                                      "bench.py:3: no module contracts.no_such_module (contracts.no_such_module)"]
