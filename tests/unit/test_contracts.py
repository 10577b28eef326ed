"""The shared kernel stays light: importing every `contracts` module pulls in no heavy library and
no other HemaFlow package (the serving image and DAG parsing rely on it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import contracts

HEAVY = ("tensorflow", "keras", "mlflow", "boto3", "botocore", "airflow", "great_expectations", "ai_edge_litert")
OTHER_PACKAGES = ("pipeline", "training", "serving", "dags", "ops")


def test_every_contracts_module_imports_without_heavy_libraries_or_other_packages():
    modules = sorted(f"contracts.{m.name}" for m in pkgutil.iter_modules(contracts.__path__))
    assert "contracts.settings" in modules and "contracts.imaging" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not loaded & set(OTHER_PACKAGES), sorted(loaded & set(OTHER_PACKAGES))
