"""The allowed import directions between HemaFlow's packages (ARCHITECTURE.md), enforced.

Every `import` and `from ... import` is read with `ast`, at module level and inside functions
alike, so a function-level import cannot hide a dependency. A violation names file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from contracts.settings import PROJECT_ROOT

# package -> what of ours it may import (a package name allows all of it; a dotted name one module).
ALLOWED: dict[str, frozenset[str]] = {
    "contracts": frozenset(),
    "pipeline": frozenset({"contracts"}),
    "training": frozenset({"contracts", "pipeline.storage"}),  # S3 access and processed-version download only
    "serving": frozenset({"contracts"}),
    # A workflow on top of the data stages and the registry (the champion bundle), never serving.
    "screening": frozenset({"contracts", "pipeline", "training"}),
    "ops": frozenset({"contracts", "pipeline"}),
}
# Entry points may import any package: they wire the others together.
ENTRY_POINTS = frozenset({"dags", "scripts", "benchmarks", "tests"})
# A package's command line (`__main__.py`, `cli_stages.py`) wires packages together: it may also reach
# the operations (`python -m pipeline stack up`, `secrets init`) and the screening workflow
# (`python -m pipeline submit`).
MAIN_MODULE_EXTRA = frozenset({"ops", "screening"})
COMMAND_LINE_MODULES = frozenset({"__main__.py", "cli_stages.py"})
# The kernel must import without these (serving's image has none of them; DAG parsing stays light).
KERNEL_FORBIDDEN = frozenset({"tensorflow", "keras", "mlflow", "boto3", "botocore", "airflow",
                              "great_expectations", "fastapi"})


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from ops import stack` imports ops.stack: check the submodule, not just the package.
            found += [(node.lineno, f"{node.module}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def _allows(allowed: frozenset[str], module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def violations(root: Path) -> list[str]:
    """Every import that breaks the directions, as 'file:line: message'."""
    ours = set(ALLOWED) | ENTRY_POINTS
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            extra = MAIN_MODULE_EXTRA if path.name in COMMAND_LINE_MODULES else frozenset()
            for line, module, top in _imports(path):
                target = module.split(".")[0]
                if target in ours and target != package and not _allows(allowed | extra, module):
                    found.append(f"{rel}:{line}: {package} must not import {module} "
                                 f"(allowed: {', '.join(sorted(allowed | extra)) or 'nothing of ours'})")
                elif package == "contracts" and top and target in KERNEL_FORBIDDEN:
                    found.append(f"{rel}:{line}: contracts imports {target} at module level "
                                 "(the kernel must import without it: import it inside the function)")
    return found


def test_every_package_follows_the_allowed_import_directions():
    found = violations(PROJECT_ROOT)
    assert not found, "import directions broken (see ARCHITECTURE.md):\n" + "\n".join(found)


def test_every_top_level_package_has_a_rule():
    packages = {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")} | {"dags"}
    missing = sorted(packages - set(ALLOWED) - ENTRY_POINTS)
    assert not missing, f"packages without import rules in {__file__} and ARCHITECTURE.md: {missing}"


def test_a_violation_is_reported_with_file_and_line_even_inside_a_function(tmp_path):
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "cam.py").write_text("import os\n\n\ndef f():\n    from training.model import build\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "up.py").write_text("from ops import stack\n")
    (tmp_path / "pipeline" / "__main__.py").write_text("from ops import stack\n")  # a command line may
    (tmp_path / "contracts").mkdir()
    (tmp_path / "contracts" / "m.py").write_text("import mlflow\n\n\ndef g():\n    import boto3\n")
    assert violations(tmp_path) == [
        "contracts/m.py:1: contracts imports mlflow at module level (the kernel must import without it: "
        "import it inside the function)",
        "pipeline/up.py:1: pipeline must not import ops.stack (allowed: contracts)",
        "serving/cam.py:5: serving must not import training.model.build (allowed: contracts)",
    ]


def test_readme_and_architecture_name_every_package_of_the_tree():
    packages = {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")} | {"dags"}
    for doc in ("README.md", "ARCHITECTURE.md"):
        text = (PROJECT_ROOT / doc).read_text()
        missing = sorted(p for p in packages if f"`{p}/`" not in text)
        assert not missing, f"{doc} does not describe the packages {missing}"
