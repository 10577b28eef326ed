"""HemaFlow batch scoring DAGs: one `hemaflow_score_<dataset>` per dataset spec.

plan -> score_chunk (dynamic task mapping, one task per SCORE_CHUNK_SIZE images) -> finish.
Runs when a batch lands in `inbox/<dataset>/` (the Asset event `python -m pipeline submit` emits,
with the batch id in its `extra`) and on RAW_WATCH_SCHEDULE, which finds batches uploaded by any
other S3 tool. Each task calls one library function of `screening.score` and passes keys and
versions only. Parsing imports Airflow's SDK and the specs; LiteRT, boto3 and MLflow are imported
inside the tasks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from contracts.dataset_spec import DatasetSpec, list_specs
from contracts.screening import BATCH_ID_PATTERN
from contracts.settings import Settings, get_settings
from ops.dag_defaults import task_defaults
from screening.batches import inbox_asset_name, inbox_asset_uri

DAG_ID_PREFIX = "hemaflow_score_"

DAG_DOC = """
# HemaFlow batch scoring: `{dataset}`

Scores every image of an inbox batch (`{inbox}<batch_id>/`) with the current `@champion` bundle
(LiteRT; the same `prepare_image`, signature, checksum and canary checks as serving) and writes
`results/{dataset}/<batch_id>/<model_version>/`: predictions.csv, thumbnails/, heatmaps/ (Grad-CAM),
report.html and summary.json (written last: a batch with one is never scored again by that version).

Which batches: the run param `batch_id`, else the batch ids in the triggering Asset events' `extra`
(`python -m pipeline submit` puts them there), else every batch without a result for the champion
(the **{schedule}** runs, and events from other tools). Bad images are listed with their reason and
never fail the batch.

| task | does | passes on |
|---|---|---|
| plan | resolves `@champion`, lists the batches' keys, cuts them in chunks of {chunk} | chunks (keys) |
| score_chunk | mapped: scores one chunk, writes previews and `_chunks/<first>.jsonl` | chunk file key, counts |
| finish | per batch: drift vs the champion's training profile, predictions.csv, report.html, then summary.json | summaries, drift verdicts |
"""


def _requested_batches() -> list[str] | None:
    """The run's batch ids: the param, else the submit events' `extra`; None = every unscored batch."""
    ctx = get_current_context()
    if ctx["params"].get("batch_id"):
        return [ctx["params"]["batch_id"]]
    events = ctx.get("triggering_asset_events") or {}
    found = {str(e.extra["batch_id"]) for evs in events.values() for e in evs if (e.extra or {}).get("batch_id")}
    return sorted(found) or None


def build_score_dag(spec: DatasetSpec, settings: Settings):
    """The batch-scoring DAG of one dataset spec."""
    dataset = spec.name
    asset = Asset(name=inbox_asset_name(dataset), uri=inbox_asset_uri(settings.s3_bucket, dataset))
    schedule = AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(settings.raw_watch_schedule, timezone="UTC", run_immediately=False),
        assets=[asset],
    )

    @dag(
        dag_id=f"{DAG_ID_PREFIX}{dataset}",
        schedule=schedule,
        catchup=False,
        is_paused_upon_creation=False,
        max_active_runs=1,  # two runs planning the same batch would score it twice
        dagrun_timeout=timedelta(hours=6),
        default_args=task_defaults(retry_delay=timedelta(seconds=20), max_retry_delay=timedelta(minutes=5),
                                   execution_timeout=timedelta(minutes=30)),
        params={"batch_id": Param(None, type=["null", "string"], pattern=BATCH_ID_PATTERN.pattern,
                                  description="Score this inbox batch only (null: the events' batches, else all "
                                              "batches without a result for the champion)")},
        tags=["hemaflow", "scoring", dataset],
        doc_md=DAG_DOC.format(dataset=dataset, inbox=f"inbox/{dataset}/", schedule=settings.raw_watch_schedule,
                              chunk=settings.score_chunk_size),
        description=f"Score inbox batches of {dataset} with the champion model",
    )
    def score():
        @task(doc_md="Resolve `@champion` and plan the batches to score into chunks of SCORE_CHUNK_SIZE keys. "
                     "Skipped (and so is the rest) when every batch already has a result for the champion.")
        def plan() -> list[dict]:
            from screening.champion import NoChampion
            from screening.score import plan_batches

            try:
                planned = plan_batches(dataset, _requested_batches(), get_settings())
            except NoChampion as exc:
                raise AirflowSkipException(str(exc)) from exc
            if not planned["chunks"]:
                raise AirflowSkipException(f"nothing to score for v{planned['model_version']}: complete "
                                           f"{planned['complete']}, empty {planned['empty']}")
            return planned["chunks"]

        @task(doc_md="Score one chunk of a batch (mapped): verified champion bundle, LiteRT, previews.")
        def score_chunk(chunk: dict) -> dict:
            from screening.score import score_chunk as score_one_chunk

            return score_one_chunk(chunk, get_settings())

        @task(doc_md="Per batch: predictions.csv and report.html, then summary.json (the completion marker).")
        def finish(chunks_done: list[dict]) -> list[dict]:
            from screening.report import drift_verdict
            from screening.score import finish_batches

            return [{k: s[k] for k in ("batch_id", "model_version", "n_scored", "n_bad", "counts", "prefix", "reused")}
                    | {"drift": drift_verdict(s.get("drift"))} for s in finish_batches(list(chunks_done), get_settings())]

        finish(score_chunk.expand(chunk=plan()))

    return score()


def _build_all() -> dict[str, Any]:
    settings = get_settings()
    return {f"{DAG_ID_PREFIX}{spec.name}": build_score_dag(spec, settings) for spec in list_specs()}


globals().update(_build_all())
