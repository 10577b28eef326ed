"""`make demo` without data explains what to do and starts nothing; its Airflow stays on loopback."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.settings import PROJECT_ROOT, get_settings


def test_demo_without_data_explains_folder_per_class_layout_and_starts_nothing(tmp_path):
    env = {**os.environ, "HEMAFLOW_ENV_FILE": "", "HEMAFLOW_HOME": str(tmp_path / "home"),
           "HEMAFLOW_SHARED_DATA": str(tmp_path / "no-shared-data")}
    env.pop("DATA_DIR", None)
    done = subprocess.run([sys.executable, "-m", "scripts.demo", "up"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    for expected in ("DATA_DIR", "Benign/", "(normal)", "Early/", "(abnormal)", "make demo DATA_DIR="):
        assert expected in done.stderr, expected
    assert not (tmp_path / "home" / "stack" / "run").exists()  # no service was started


def test_demo_with_a_missing_data_dir_is_a_clear_error(tmp_path):
    env = {**os.environ, "HEMAFLOW_ENV_FILE": "", "HEMAFLOW_HOME": str(tmp_path / "home"),
           "DATA_DIR": str(tmp_path / "nope")}
    done = subprocess.run([sys.executable, "-m", "scripts.demo", "up"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "is not a folder" in done.stderr


def test_demo_airflow_is_loopback_only_with_low_parallelism_and_repo_dags(tmp_path):
    from scripts.demo import airflow_env

    s = get_settings(hemaflow_home=tmp_path, airflow_port=18080)
    env = airflow_env(s)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 2
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(PROJECT_ROOT / "dags")
    assert env["AIRFLOW_HOME"].startswith(str(tmp_path)) and env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
