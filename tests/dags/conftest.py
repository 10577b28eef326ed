"""Fixtures for the in-process DAG tests (`dag.test()`, DagBag); see tests/dags/airflow_home.py.

Importing airflow_home here sets Airflow's environment at collection time, before any test
module imports Airflow. Tests that run Airflow as deployed are in tests/airflow/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dags.airflow_home import AIRFLOW_HOME_DIR, AIRFLOW_ENV, DAGS_DIR  # noqa: F401 - sets the env


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (what `dag.test()` needs); returns AIRFLOW_HOME."""
    airflow = Path(sys.executable).parent / "airflow"
    proc = subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **AIRFLOW_ENV},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return AIRFLOW_HOME_DIR


@pytest.fixture(scope="module")
def dagbag():
    """The DAGs parsed now: per module, so that a module using the test stack parses them after
    `local_stack` has set its environment (bucket name, endpoints)."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))
