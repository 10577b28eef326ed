"""The retraining DAG end to end with `dag.test()`: real Airflow, real SeaweedFS, real MLflow.

One small subset of ../shared/data/leukemia goes through four runs, in order (each test
builds on the state the previous one left, like a lab's week):
1. first run: a model version is registered and holds @champion;
2. same data again: the run completes with training skipped and nothing else moved;
3. a corrupt file and a few new images arrive: the corrupt one is quarantined, a candidate
   is trained and registered;
4. a candidate that cannot pass the gate (impossible floors, as run params) leaves
   @champion where it was and becomes @challenger.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATASET = "leukemia"
DAG_ID = f"hemaflow_retrain_{DATASET}"
PER_CLASS = 16  # first upload; later runs add a few more of each class
# Tiny and fast: a 32x32 input, a narrow 2-block network, one epoch, floors at zero for run 1-3.
FAST_ENV = {
    "IMAGE_SIZE": "32",
    "TRAIN_INPUT_SIZE": "32",
    "EPOCHS": "1",
    "BATCH_SIZE": "16",
    "MODEL_WIDTH": "8",
    "MODEL_DEPTH": "2",
    "CANARY_COUNT": "2",
    "TRAIN_TIME_BUDGET_S": "120",
    "GATE_MIN_BALANCED_ACCURACY": "0",
    "GATE_MIN_SENSITIVITY": "0",
    "GATE_MIN_ACCURACY": "0",
    "GATE_MARGIN": "0",
    "SERVING_ADMIN_API_KEYS": "dag-test-admin-key",
    "SERVING_URL": "http://127.0.0.1:9",  # nothing listens: notify must tolerate it
    "TRANSFER_WORKERS": "4",
}
IMPOSSIBLE_GATE = {"gate_min_balanced_accuracy": 1.0, "gate_min_sensitivity": 1.0, "gate_min_accuracy": 1.0,
                   "gate_margin": 1.0}


def _images(root: Path, folder: str, start: int, count: int) -> list[Path]:
    return sorted(p for p in (root / folder).iterdir() if p.is_file())[start:start + count]


def _upload(s3, bucket: str, spec, root: Path, start: int, count: int) -> int:
    n = 0
    for folder in spec.class_folders:
        for path in _images(root, folder, start, count):
            s3.put_object(Bucket=bucket, Key=spec.key_for(folder, path.name), Body=path.read_bytes())
            n += 1
    return n


@pytest.fixture(scope="module")
def retrain(local_stack, airflow_db, dagbag):
    """Runs the retraining DAG with dag.test(); returns (dag_run, task states, run summary)."""
    from mlflow.artifacts import load_dict
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_stack.mlflow_tracking_uri)
    dag = dagbag.dags[DAG_ID]

    def run(conf: dict | None = None):
        dag_run = dag.test(run_conf=conf or {})
        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
        found = client.search_runs(
            [client.get_experiment_by_name(f"{local_stack.model_name_prefix}-pipeline-runs").experiment_id],
            filter_string=f"tags.`hemaflow.dag_run_id` = '{dag_run.run_id}'",
        ) if states.get("report") == "success" else []
        summary = load_dict(f"runs:/{found[0].info.run_id}/run_summary.json") if found else None
        return dag_run, states, summary

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**FAST_ENV, "MLFLOW_TRACKING_URI": local_stack.mlflow_tracking_uri}.items():
            mp.setenv(key, value)
        yield run


@pytest.fixture(scope="module")
def data(local_stack):
    from contracts.dataset_spec import load_spec

    root = shared_dataset(DATASET)
    spec = load_spec(DATASET)
    return {"root": root, "spec": spec, "bucket": local_stack.s3_bucket}


def _alias_version(settings, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        return str(client.get_model_version_by_alias(settings.model_name(DATASET), alias).version)
    except MlflowException:
        return None


STATE = {}


def test_first_run_registers_a_champion(retrain, data, s3, local_stack):
    uploaded = _upload(s3, data["bucket"], data["spec"], data["root"], 0, PER_CLASS)
    assert uploaded == PER_CLASS * len(data["spec"].class_folders)
    dag_run, states, summary = retrain()
    assert str(dag_run.state) == "success", states
    for task_id in ("ingest", "validate", "preprocess", "train", "evaluate", "gate", "promote",
                    "notify_serving", "report"):
        assert states[task_id] == "success", (task_id, states)
    assert states["keep_champion"] == "skipped"
    champion = _alias_version(local_stack, "champion")
    assert champion is not None
    assert summary["trained"] and summary["promoted"] and summary["candidate_version"] == champion
    assert summary["champion_version"] == champion
    assert summary["ingested"]["new"] == uploaded
    assert summary["serving_notified"] is False  # nothing listens on SERVING_URL; the run still succeeded
    STATE["champion"] = champion
    STATE["dataset_version"] = summary["dataset_version"]


def test_unchanged_rerun_skips_training(retrain, local_stack):
    assert "champion" in STATE, "depends on test_first_run_registers_a_champion"
    dag_run, states, summary = retrain()
    assert str(dag_run.state) == "success", states
    assert states["train"] == "skipped"
    for task_id in ("evaluate", "gate", "promote", "keep_champion", "notify_serving"):
        assert states[task_id] == "skipped", (task_id, states)
    assert states["report"] == "success"
    assert summary["trained"] is False and summary["outcome"].startswith("nothing to do")
    assert summary["ingested"]["new"] == 0 and summary["dataset_created"] is False
    assert summary["dataset_version"] == STATE["dataset_version"]
    assert _alias_version(local_stack, "champion") == STATE["champion"]


def test_corrupt_image_is_quarantined_and_new_images_train_a_candidate(retrain, data, s3, local_stack):
    assert "champion" in STATE, "depends on test_first_run_registers_a_champion"
    spec, bucket = data["spec"], data["bucket"]
    added = _upload(s3, bucket, spec, data["root"], PER_CLASS, 2)
    corrupt_key = spec.key_for(spec.class_folders[0], "corrupt-scan.jpg")
    s3.put_object(Bucket=bucket, Key=corrupt_key, Body=b"\xff\xd8\xff\xe0 this is not a JPEG " * 20)
    dag_run, states, summary = retrain()
    assert str(dag_run.state) == "success", states
    assert summary["ingested"]["new"] == added + 1
    assert summary["quarantined"] >= 1
    quarantined = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"quarantine/{DATASET}/")
                   .get("Contents", [])]
    assert any(k.endswith("corrupt-scan.jpg") for k in quarantined), quarantined
    assert any(k.endswith("corrupt-scan.jpg.reason.json") for k in quarantined), quarantined
    assert states["train"] == "success" and summary["trained"] is True
    assert summary["dataset_version"] != STATE["dataset_version"]
    assert summary["candidate_version"] not in (None, STATE["champion"])
    STATE["champion"] = _alias_version(local_stack, "champion")  # promoted or not, the gate decided


def test_candidate_failing_the_gate_leaves_champion_untouched(retrain, data, s3, local_stack):
    assert "champion" in STATE, "depends on test_first_run_registers_a_champion"
    champion_before = STATE["champion"]
    _upload(s3, data["bucket"], data["spec"], data["root"], PER_CLASS + 2, 1)
    dag_run, states, summary = retrain(IMPOSSIBLE_GATE)
    assert str(dag_run.state) == "success", states
    assert states["train"] == "success" and states["gate"] == "success"
    assert states["promote"] == "skipped" and states["notify_serving"] == "skipped"
    assert states["keep_champion"] == "success"
    assert summary["gate_passed"] is False and summary["promoted"] is False
    assert "@champion unchanged" in summary["outcome"]
    assert summary["params"]["gate_margin"] == 1.0
    assert _alias_version(local_stack, "champion") == champion_before == str(summary["champion_version"])
    assert _alias_version(local_stack, "challenger") == summary["candidate_version"]


def test_too_many_bad_images_fail_the_run_at_validate_without_retry(retrain, local_stack):
    """The corrupt file is still in the bucket: with a 0.1% bad-image limit validation must stop the run."""
    assert "champion" in STATE, "depends on test_first_run_registers_a_champion"
    champion_before = _alias_version(local_stack, "champion")
    dag_run, states, summary = retrain({"max_bad_fraction": 0.001})
    assert str(dag_run.state) == "failed", states
    assert states["ingest"] == "success" and states["validate"] == "failed"
    assert states["train"] == "upstream_failed" and states["report"] == "upstream_failed"
    validate_ti = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "validate")
    assert validate_ti.try_number == 1  # a data problem is not retried
    assert summary is None
    assert _alias_version(local_stack, "champion") == champion_before
