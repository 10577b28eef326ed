"""The in-process Airflow of the DAG tests: a private AIRFLOW_HOME with SQLite, the repo's DAGs.

Airflow reads its configuration when it is first imported, so `tests/dags/conftest.py` imports
this module (which sets the environment) at collection time, before any test imports Airflow.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO_ROOT / "dags"

AIRFLOW_HOME_DIR = Path(tempfile.mkdtemp(prefix="hemaflow-airflow-test-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME_DIR, True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME_DIR),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME_DIR / 'airflow.db'}",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}
os.environ.update(AIRFLOW_ENV)
