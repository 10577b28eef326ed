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


# Lines as `airflow dags test` (Airflow 3.3) writes them, trimmed.
_TRAIN_SKIPPED_LINES = [
    "2026-11-22T01:26:46.835471Z [info ] [DAG TEST] starting task_id=train map_index=-1 [airflow.sdk.definitions.dag]",
    "2026-11-22T01:26:47.796013Z [info ] Skipping task. [task] reason='training skipped: same data, config, code'",
    "2026-11-22T01:26:47.807138Z [info ] Task instance state updated [airflow.api_fastapi] new_state=skipped "
    "rows_affected=1",
    "2026-11-22T01:26:47.821162Z [info ] [DAG TEST] end task task_id=train map_index=-1 [airflow.sdk.definitions.dag]",
]
_REPORT_SUCCESS_LINES = [
    "2026-11-22T01:26:49.851558Z [info ] [DAG TEST] starting task_id=report map_index=-1 [airflow.sdk]",
    "2026-11-22T01:26:50.800000Z [info ] Task instance state updated [airflow.api_fastapi] new_state=success "
    "rows_affected=1",
    "2026-11-22T01:26:50.820511Z [info ] [DAG TEST] end task task_id=report map_index=-1 [airflow.sdk]",
]


def test_demo_progress_says_skipped_for_a_skipped_task_and_done_for_a_successful_one():
    from scripts.demo import DagTestProgress

    progress = DagTestProgress()
    shown = [out for line in _TRAIN_SKIPPED_LINES + _REPORT_SUCCESS_LINES if (out := progress.feed(line))]
    assert shown == ["  . train skipped", "  . report done"]


def test_demo_champion_metrics_show_rates_to_4_decimals_and_the_test_count_as_an_integer():
    from scripts.demo import format_metrics

    assert format_metrics({"test_balanced_accuracy": 0.97844028, "test_n": 401.0}) == (
        "test_balanced_accuracy=0.9784, test_n=401")


def test_demo_progress_echoes_one_line_per_training_epoch():
    from scripts.demo import DagTestProgress

    progress = DagTestProgress()
    line = ("2026-11-22T01:13:53.398066Z [info     ] epoch 3/30 accuracy=0.9000 loss=0.2000 "
            "val_accuracy=0.8000 val_loss=0.3000 [training] loc=train.py:372")
    assert progress.feed(line) == "      epoch 3/30 accuracy=0.9000 loss=0.2000 val_accuracy=0.8000 val_loss=0.3000"
    assert progress.feed("[info] reached the epoch boundary of the scheduler") is None
