"""The watcher DAG emits a dataset's raw Asset exactly when its prefix changed since the last ingest."""

from __future__ import annotations

import io

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATASET = "pbc8"  # the retraining tests use leukemia: this one is untouched by them


def _png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed * 40 % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _asset_events(uri: str) -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).filter(
            AssetModel.uri == uri).count()


def _queued_retrain(dag_id: str) -> int:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(AssetDagRunQueue).filter(AssetDagRunQueue.target_dag_id == dag_id).count()


def test_watcher_emits_asset_on_new_images_and_skips_when_ingested(local_stack, airflow_db, dagbag, s3):
    from contracts.dataset_spec import load_spec
    from pipeline.ingest import ingest
    from pipeline.watch import pending_raw_changes, raw_asset_uri

    spec = load_spec(DATASET)
    uri = raw_asset_uri(local_stack.s3_bucket, spec.s3_prefix)
    task_id = f"check_{DATASET}"
    watcher = dagbag.dags["hemaflow_watch_raw"]

    assert pending_raw_changes(DATASET)["pending"] is False  # empty prefix, nothing to do
    for i, folder in enumerate(spec.class_folders[:2]):
        s3.put_object(Bucket=local_stack.s3_bucket, Key=spec.key_for(folder, f"cell-{i}.png"), Body=_png_bytes(i))
    before = _asset_events(uri)
    run = watcher.test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states[task_id] == "success", states
    assert _asset_events(uri) == before + 1
    assert _queued_retrain(f"hemaflow_retrain_{DATASET}") >= 1  # the retraining DAG is waiting to run

    ingest(DATASET)  # what the retraining DAG's first task does
    assert pending_raw_changes(DATASET) == {**pending_raw_changes(DATASET), "pending": False, "new": 0}
    run = watcher.test()
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states[task_id] == "skipped", states
    assert _asset_events(uri) == before + 1  # no new event without new images

    s3.delete_object(Bucket=local_stack.s3_bucket, Key=spec.key_for(spec.class_folders[0], "cell-0.png"))
    changes = pending_raw_changes(DATASET)
    assert changes["pending"] is True and changes["deleted"] == 1
