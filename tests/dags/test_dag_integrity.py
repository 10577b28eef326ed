"""The DAG files parse quickly and without errors, and every DAG is production-shaped."""

from __future__ import annotations

import subprocess
import sys
import time

from contracts.dataset_spec import list_specs
from contracts.settings import get_settings
from tests.dags.airflow_home import AIRFLOW_ENV, DAGS_DIR
from tests.helpers import REPO_ROOT

PARSE_BUDGET_S = 2.0  # per file, as measured by the DagBag (the scheduler's default limit is 30 s)
UNRETRIED_TASKS = {"notify_serving"}  # serving polls the registry anyway: a retry only delays the report
RETRAIN_TASKS = ["ingest", "validate", "preprocess", "train", "evaluate", "gate", "promote", "keep_champion",
                 "notify_serving", "report"]


def test_dagbag_has_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert dagbag.dags, "no DAG found in dags/"


def test_one_retraining_dag_per_dataset_spec_and_a_watcher(dagbag):
    expected = ({f"hemaflow_retrain_{spec.name}" for spec in list_specs()} | {"hemaflow_watch_raw", "hemaflow_feedback"}
                | {f"hemaflow_score_{spec.name}" for spec in list_specs()})
    assert set(dagbag.dags) == expected


def test_every_dag_has_owner_tags_retries_docs_and_failure_callback(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "hemaflow" in dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        assert dag.max_active_runs == 1, dag_id
        assert dag.catchup is False, dag_id
        for t in dag.tasks:
            assert t.owner == "hemaflow", (dag_id, t.task_id)
            assert t.retries >= 1 or t.task_id in UNRETRIED_TASKS, (dag_id, t.task_id)
            assert t.execution_timeout is not None, (dag_id, t.task_id)
            assert t.doc_md, (dag_id, t.task_id)
            assert t.on_failure_callback, (dag_id, t.task_id)
        retried = [t for t in dag.tasks if t.retries >= 1]
        assert retried and all(t.retry_exponential_backoff > 1 for t in retried), dag_id


def test_retraining_dag_shape_schedule_and_params(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    for spec in list_specs():
        dag = dagbag.dags[f"hemaflow_retrain_{spec.name}"]
        assert sorted(dag.task_dict) == sorted(RETRAIN_TASKS)
        assert dag.task_dict["validate"].upstream_task_ids == {"ingest"}
        assert dag.task_dict["train"].upstream_task_ids == {"preprocess"}
        assert dag.task_dict["gate"].downstream_task_ids == {"promote", "keep_champion"}
        assert dag.task_dict["notify_serving"].upstream_task_ids == {"promote"}
        assert dag.task_dict["report"].trigger_rule == "none_failed"
        assert isinstance(dag.timetable, AssetOrTimeSchedule)
        assets = list(dag.timetable.asset_condition.objects)
        assert [a.uri for a in assets] == [f"s3://{get_settings().s3_bucket}/{spec.s3_prefix.rstrip('/')}"]
        assert dag.is_paused_upon_creation is False  # a new spec's DAG retrains on its first upload
        assert dag.start_date is None  # so the timetable waits for the next cron time, not the last one
        assert dag.timetable.timetable.run_immediately is False
        assert dag.task_dict["train"].queue == get_settings().train_queue
        for name in ("epochs", "image_size", "gate_min_sensitivity", "gate_margin"):
            assert name in dag.params, name
            assert dag.params[name] is None  # null = the configured value


def test_scoring_dag_maps_chunks_and_listens_to_the_inbox(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    for spec in list_specs():
        dag = dagbag.dags[f"hemaflow_score_{spec.name}"]
        assert sorted(dag.task_dict) == ["finish", "plan", "score_chunk"]
        assert dag.task_dict["score_chunk"].upstream_task_ids == {"plan"}
        assert dag.task_dict["finish"].upstream_task_ids == {"score_chunk"}
        assert type(dag.task_dict["score_chunk"]).__name__.endswith("MappedOperator")  # dynamic task mapping
        assert isinstance(dag.timetable, AssetOrTimeSchedule)
        assets = list(dag.timetable.asset_condition.objects)
        assert [a.uri for a in assets] == [f"s3://{get_settings().s3_bucket}/inbox/{spec.name}"]
        assert dag.params["batch_id"] is None


def test_polling_dags_are_active_at_creation(dagbag):
    """The site pauses new DAGs (DAGS_ARE_PAUSED_AT_CREATION): the watcher and review feedback say
    otherwise, so reviews -> raw/ -> retraining needs no person to unpause them."""
    for dag_id in ("hemaflow_watch_raw", "hemaflow_feedback"):
        assert dagbag.dags[dag_id].is_paused_upon_creation is False, dag_id


def test_watcher_emits_exactly_the_assets_the_retraining_dags_consume(dagbag):
    watcher = dagbag.dags["hemaflow_watch_raw"]
    emitted = {o.uri for t in watcher.tasks for o in t.outlets}
    consumed = {
        a.uri
        for dag_id, dag in dagbag.dags.items()
        if dag_id.startswith("hemaflow_retrain_")
        for a in dag.timetable.asset_condition.objects
    }
    assert emitted == consumed and len(emitted) == len(list_specs())


def test_each_dag_file_parses_within_budget(dagbag):
    slow = [(s.file, s.duration.total_seconds()) for s in dagbag.dagbag_stats
            if s.duration.total_seconds() > PARSE_BUDGET_S]
    assert not slow, f"DAG files over {PARSE_BUDGET_S}s: {slow}"


def test_parsing_does_not_import_heavy_libraries():
    """A fresh interpreter parsing the DAG files must not pull TensorFlow, MLflow, boto3 or GX."""
    code = (
        "import sys, time; from airflow.dag_processing.dagbag import DagBag; t=time.time();"
        f"b=DagBag(dag_folder={str(DAGS_DIR)!r}); assert not b.import_errors, b.import_errors;"
        "heavy=[m for m in ('tensorflow','mlflow','boto3','great_expectations','keras') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **AIRFLOW_ENV},
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert time.monotonic() - start < 30
