"""`make demo` without data explains what to do and starts nothing; its Airflow stays on loopback."""

from __future__ import annotations

import os
import subprocess
import sys

from contracts.settings import PROJECT_ROOT, get_settings


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
    from ops.airflow_local import site_env
    from scripts.demo_airflow import airflow_site

    s = get_settings(hemaflow_home=tmp_path, airflow_port=18080)
    env = site_env(airflow_site(s, "admin-key"))
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor" and int(env["AIRFLOW__CORE__PARALLELISM"]) <= 2
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(PROJECT_ROOT / "dags")
    assert env["AIRFLOW_HOME"].startswith(str(tmp_path)) and env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["SERVING_ADMIN_API_KEYS"] == "admin-key"


def test_demo_airflow_secrets_are_random_per_install_and_owner_only(tmp_path):
    from ops.airflow_local import site_env, site_secrets
    from scripts.demo_airflow import airflow_site

    first = site_env(airflow_site(get_settings(hemaflow_home=tmp_path / "a"), "k"))
    second = site_env(airflow_site(get_settings(hemaflow_home=tmp_path / "b"), "k"))
    assert first["AIRFLOW__API_AUTH__JWT_SECRET"] != second["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert len(first["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 40
    assert first == site_env(airflow_site(get_settings(hemaflow_home=tmp_path / "a"), "k"))  # stable per install
    secrets_file = tmp_path / "a" / "airflow" / "site-secrets.json"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    assert site_secrets(tmp_path / "a" / "airflow")["admin_password"] not in str(first)


def _ti(task_id: str, state: str, end: str, duration: float = 1.0, try_number: int = 1) -> dict:
    return {"task_id": task_id, "state": state, "end_date": end, "duration": duration, "try_number": try_number}


def test_demo_progress_says_skipped_for_a_skipped_task_and_done_for_a_successful_one(tmp_path):
    from scripts.demo_airflow import RunProgress

    progress = RunProgress(tmp_path)
    run = {"dag_id": "hemaflow_retrain_leukemia", "dag_run_id": "r1"}
    first = [_ti("train", "skipped", "2026-12-02T01:00:01Z", 0.9), _ti("report", "running", None)]
    assert progress.feed(run, first) == ["  . train skipped (0.9s)"]
    later = [first[0], _ti("report", "success", "2026-12-02T01:00:05Z", 2.5)]
    assert progress.feed(run, later) == ["  . report done (2.5s)"]  # each task once
    assert progress.feed(run, later + [_ti("report", "success", "2026-12-02T01:00:09Z", 1.0, 2)]) == [
        "  . report done (1.0s)"]  # a retry is a new line


def test_demo_champion_metrics_show_rates_to_4_decimals_and_the_test_count_as_an_integer():
    from scripts.demo import format_metrics

    assert format_metrics({"test_balanced_accuracy": 0.97844028, "test_n": 401.0}) == (
        "test_balanced_accuracy=0.9784, test_n=401")


def test_demo_champion_headline_is_the_figures_as_served_tta_when_it_is_on():
    from scripts.demo import served_headline

    metrics = {"test_sensitivity": 0.9881, "test_specificity": 1.0, "test_n": 401.0,
               "tta_test_sensitivity": 0.9911, "tta_test_specificity": 0.9844, "tta_threshold": 0.545}
    assert served_headline(metrics, tta=True) == (
        "as served, 8-view TTA", {"test_sensitivity": 0.9911, "test_specificity": 0.9844, "test_n": 401.0})
    assert served_headline(metrics, tta=False) == (
        "as served, no TTA", {"test_sensitivity": 0.9881, "test_specificity": 1.0, "test_n": 401.0})
    # a champion trained before TTA figures were logged: its plain figures, and the label says so
    assert served_headline({"test_sensitivity": 0.97, "test_n": 10.0}, tta=True) == (
        "without TTA (none logged)", {"test_sensitivity": 0.97, "test_n": 10.0})


def test_demo_progress_echoes_each_training_epoch_from_the_task_log_once(tmp_path):
    from scripts.demo_airflow import RunProgress

    progress = RunProgress(tmp_path)
    run = {"dag_id": "hemaflow_retrain_leukemia", "dag_run_id": "r1"}
    log = tmp_path / "logs" / "dag_id=hemaflow_retrain_leukemia" / "run_id=r1" / "task_id=train" / "attempt=1.log"
    log.parent.mkdir(parents=True)
    log.write_text('{"timestamp":"2026-12-02T01:13:53Z","level":"info","event":"epoch 3/30 accuracy=0.9000 '
                   'loss=0.2000 val_accuracy=0.8000 val_loss=0.3000","logger":"training"}\n'
                   '{"event":"reached the epoch boundary of the scheduler"}\n')
    running = [_ti("train", "running", None)]
    assert progress.feed(run, running) == [
        "      epoch 3/30 accuracy=0.9000 loss=0.2000 val_accuracy=0.8000 val_loss=0.3000"]
    assert progress.feed(run, running) == []


def test_demo_holds_back_a_flat_batch_that_never_reaches_the_training_tree(tmp_path):
    from scripts.demo_data import hold_back
    from tests.fixtures.data import make_image_tree

    data = make_image_tree(tmp_path / "data", {"Benign": 6, "Early": 5, "Pre": 1}, size=(8, 8))
    train, batch = hold_back(get_settings(hemaflow_home=tmp_path / "home"), data, "leukemia", count=7)
    held = sorted(p.resolve() for p in batch.iterdir())
    kept = sorted(p.resolve() for p in train.rglob("*") if p.is_file())
    assert len(held) == 7 and all(p.parent == batch for p in batch.iterdir())  # flat: no class name in a path
    assert not set(held) & set(kept) and len(held) + len(kept) == 12
    assert {p.parent.name for p in held} == {"Benign", "Early"}  # taken in turn; a 1-image class keeps its image
    assert sorted(p.name for p in (train / "Pre").iterdir()) == ["Pre_0000.png"]
    again = hold_back(get_settings(hemaflow_home=tmp_path / "home"), data, "leukemia", count=7)
    assert sorted(p.resolve() for p in again[1].iterdir()) == held  # the same batch every time


def test_demo_serving_holds_its_own_identities_not_the_pipelines(tmp_path):
    """The demo's serving process, started from an environment holding every per-install secret,
    sees its own (MLflow reader, scoped S3 identity, reviewer keys) and none of the pipeline's."""
    import json

    from contracts.credentials import generate_missing
    from scripts.demo import serving_env

    generated = generate_missing({})
    env = {**os.environ, **generated, "HEMAFLOW_ENV_FILE": "", "HEMAFLOW_HOME": str(tmp_path / "home")}
    env.update(serving_env(get_settings(), "admin-key-0123456789abcdef"))
    code = ("import json; from contracts.settings import get_settings; s = get_settings(); print(json.dumps({"
            "'s3': s.serving_s3_secret_access_key.get_secret_value(), 'admin_s3': s.aws_secret_access_key.get_secret_value(),"
            "'mlflow': s.serving_mlflow_password.get_secret_value(), 'writer': s.mlflow_tracking_password.get_secret_value(),"
            "'signing': s.bundle_signing_key.get_secret_value()}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    seen = json.loads(done.stdout)
    assert seen["s3"] == generated["SERVING_S3_SECRET_ACCESS_KEY"]
    assert seen["mlflow"] == generated["SERVING_MLFLOW_PASSWORD"]
    assert seen["admin_s3"] == seen["writer"] == seen["signing"] == ""
