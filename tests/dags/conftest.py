"""Airflow for the DAG tests: a private AIRFLOW_HOME with SQLite, DAGs from the repo's dags/.

Airflow reads its configuration when it is first imported, so the environment is set here,
at collection time, before any test module imports it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO_ROOT / "dags"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="hemaflow-airflow-test-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # asset events queue only unpaused DAGs
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}
os.environ.update(AIRFLOW_ENV)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (what `dag.test()` needs); returns AIRFLOW_HOME."""
    airflow = Path(sys.executable).parent / "airflow"
    proc = subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **AIRFLOW_ENV},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return _AIRFLOW_HOME


@pytest.fixture(scope="module")
def dagbag():
    """The DAGs parsed now: per module, so that a module using the test stack parses them after
    `local_stack` has set its environment (bucket name, endpoints)."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))
