"""`hemaflow_watch_raw`: emits a dataset's raw Asset when its images changed in the bucket.

Images may reach `raw/<dataset>/` by any path (the upload CLI, `aws s3 sync`, a scanner
export). Every few minutes this DAG lists each dataset's prefix (cheap: keys, ETags and
sizes only) and compares it with the latest ingest manifest; for a dataset with new, changed
or deleted images its task succeeds and so emits the Asset, which starts
`hemaflow_retrain_<dataset>`. Unchanged datasets are skipped and emit nothing.
"""

from __future__ import annotations

from airflow.sdk import Asset, CronTriggerTimetable, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from ops.dag_defaults import polling_dag_args
from contracts.dataset_spec import list_specs
from contracts.settings import get_settings
from pipeline.watch import raw_asset_name, raw_asset_uri

WATCH_DAG_ID = "hemaflow_watch_raw"


def build_watch_dag():
    settings = get_settings()

    @dag(
        dag_id=WATCH_DAG_ID,
        schedule=CronTriggerTimetable(settings.raw_watch_schedule, timezone="UTC"),
        **polling_dag_args(),
        tags=["hemaflow", "watcher"],
        doc_md=__doc__,
        description="Start retraining when raw images change in the bucket",
    )
    def watch_raw():
        for spec in list_specs():
            asset = Asset(name=raw_asset_name(spec.name), uri=raw_asset_uri(settings.s3_bucket, spec.s3_prefix))

            @task(
                task_id=f"check_{spec.name.replace('-', '_')}",
                outlets=[asset],
                doc_md=f"List `{spec.s3_prefix}` and compare with the latest ingest manifest; emits "
                f"`{asset.uri}` (success) when something changed, else is skipped.",
            )
            def check(dataset: str = spec.name) -> dict:
                from pipeline.watch import pending_raw_changes

                changes = pending_raw_changes(dataset)
                if not changes["pending"]:
                    raise AirflowSkipException(f"{dataset}: no change since {changes['manifest_key']}")
                return changes

            check()

    return watch_raw()


watch_dag = build_watch_dag()
