"""`hemaflow_feedback`: reviewed batch images join their dataset's raw images, then retraining runs.

On the watcher's schedule, one task per dataset copies the latest reviewer decision of every
reviewed image into `raw/<dataset>/<class folder>/` with its provenance (screening.feedback;
idempotent by review id). A task that copied or moved images succeeds and emits the dataset's raw
Asset, which starts `hemaflow_retrain_<dataset>` at once; with nothing new it is skipped. Copies
made by `python -m screening feedback` are found by `hemaflow_watch_raw` instead.
"""

from __future__ import annotations

from airflow.sdk import Asset, CronTriggerTimetable, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from contracts.dataset_spec import list_specs
from contracts.settings import get_settings
from ops.dag_defaults import polling_dag_args
from pipeline.watch import raw_asset_name, raw_asset_uri

FEEDBACK_DAG_ID = "hemaflow_feedback"


def build_feedback_dag():
    settings = get_settings()

    @dag(
        dag_id=FEEDBACK_DAG_ID,
        schedule=CronTriggerTimetable(settings.raw_watch_schedule, timezone="UTC"),
        **polling_dag_args(),
        tags=["hemaflow", "screening"],
        doc_md=__doc__,
        description="Copy reviewed batch images into raw/ and start retraining",
    )
    def feedback():
        for spec in list_specs():
            asset = Asset(name=raw_asset_name(spec.name), uri=raw_asset_uri(settings.s3_bucket, spec.s3_prefix))

            @task(
                task_id=f"feedback_{spec.name.replace('-', '_')}",
                outlets=[asset],
                doc_md=f"Reviewed images of `{spec.name}` into `{spec.s3_prefix}`; emits `{asset.uri}` when any "
                "joined or moved, else is skipped.",
            )
            def apply(dataset: str = spec.name) -> dict:
                from screening.feedback import apply_feedback

                result = apply_feedback(dataset)
                if not (result.copied or result.removed):
                    raise AirflowSkipException(f"{dataset}: no new reviewed images ({result.unchanged} already in raw/)")
                return result.to_dict()

            apply()

    return feedback()


feedback_dag = build_feedback_dag()
