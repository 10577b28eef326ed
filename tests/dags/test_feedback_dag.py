"""Feedback end to end (slow): reviews -> `hemaflow_feedback` copies into raw/ -> the dataset's Asset
event -> the retraining DAG's ingest takes the reviewed images, labelled by the reviewers."""

from __future__ import annotations

import pytest

from tests.helpers import patched_environ

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _asset_events(uri: str) -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).filter(
            AssetModel.uri == uri).count()


def test_reviews_join_raw_emit_the_asset_and_reach_ingest(local_stack, airflow_db, tiny_dataset_factory, s3):
    from airflow.dag_processing.dagbag import DagBag

    from contracts.dataset_spec import load_spec
    from pipeline.ingest import ingest
    from pipeline.storage import get_jsonl
    from pipeline.watch import pending_raw_changes, raw_asset_uri
    from contracts.reviews import append_decisions, new_decision
    from tests.dags.airflow_home import DAGS_DIR
    from tests.fixtures.screening import write_scored_batch

    settings, dataset, _ = tiny_dataset_factory({"Benign": 1, "Early": 1}, {"Benign": "normal", "Early": "abnormal"})
    with patched_environ({"DATASET_SPECS_DIR": str(settings.dataset_specs_dir)}):
        spec = load_spec(dataset)
        uri = raw_asset_uri(local_stack.s3_bucket, spec.s3_prefix)
        images = write_scored_batch(s3, local_stack.s3_bucket, dataset, "day-1", 5, 3)
        append_decisions(s3, local_stack.s3_bucket, [
            new_decision(dataset=dataset, batch_id="day-1", image_key=img.key, sha256=img.sha256, model_version=5,
                         predicted_label=img.label, reviewed_label=label, reviewer="alice")
            for img, label in zip(images, ("abnormal", "normal", "normal"), strict=True)])
        feedback = DagBag(dag_folder=str(DAGS_DIR)).dags["hemaflow_feedback"]
        task_id = f"feedback_{dataset}"

        before = _asset_events(uri)
        run = feedback.test()
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        assert states[task_id] == "success", states
        assert _asset_events(uri) == before + 1  # the retraining DAG's trigger
        assert pending_raw_changes(dataset)["new"] == 3  # and the watcher would see it too

        result = ingest(dataset, settings)  # the retraining DAG's first task
        assert result.new == 3 and result.reviewed == 3
        rows = {r["sha256"]: r for r in get_jsonl(s3, local_stack.s3_bucket, result.manifest_key)}
        assert [rows[img.sha256]["label"] for img in images] == ["abnormal", "normal", "normal"]

        again = feedback.test()  # nothing new: skipped, no second event
        assert {ti.task_id: str(ti.state) for ti in again.get_task_instances()}[task_id] == "skipped"
        assert _asset_events(uri) == before + 1
