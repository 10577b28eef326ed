"""HemaFlow retraining DAGs: one per dataset spec in `pipeline/specs/*.toml`.

ingest -> validate -> preprocess -> train -> evaluate -> gate -> promote | keep_champion
-> notify_serving -> report. Every task calls one library function and passes only
references (S3 keys, dataset version, run id, model version) through XCom. Parsing this
file imports Airflow's SDK and reads the TOML specs, nothing heavier: TensorFlow, MLflow,
boto3 and Great Expectations are imported inside the tasks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from contracts.dataset_spec import DatasetSpec, list_specs
from contracts.settings import Settings, get_settings
from contracts.stages import GateDecision, IngestResult, PreprocessResult, RunResults, TrainResult, ValidateResult
from ops.dag_defaults import task_defaults
from ops.report import log_failure_summary
from pipeline.watch import raw_asset_name, raw_asset_uri

DAG_ID_PREFIX = "hemaflow_retrain_"

# Trigger-time overrides: each is a Settings field; null = use the configured value.
OVERRIDE_PARAMS: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "epochs": (["null", "integer"], {"minimum": 1}, "Most training epochs (EPOCHS)"),
    "image_size": (["null", "integer"], {"minimum": 16, "maximum": 1024},
                   "Side of the preprocessed images (IMAGE_SIZE); a change makes a new dataset version"),
    "train_input_size": (["null", "integer"], {"minimum": 16, "maximum": 1024},
                         "Network input side (TRAIN_INPUT_SIZE)"),
    "max_bad_fraction": (["null", "number"], {"minimum": 0, "maximum": 1},
                         "Validation fails above this fraction of quarantined images (MAX_BAD_FRACTION)"),
    "warm_start": (["null", "boolean"], {}, "Start the candidate from the champion's weights when labels and "
                   "architecture match (WARM_START)"),
    "gate_min_balanced_accuracy": (["null", "number"], {"minimum": 0, "maximum": 1},
                                   "Promotion floor on test balanced accuracy (can only raise the configured one)"),
    "gate_min_sensitivity": (["null", "number"], {"minimum": 0, "maximum": 1},
                             "Promotion floor on test sensitivity (can only raise the configured one)"),
    "gate_min_accuracy": (["null", "number"], {"minimum": 0, "maximum": 1},
                          "Promotion floor on test accuracy (can only raise the configured one)"),
    "gate_margin": (["null", "number"], {"minimum": 0, "maximum": 1},
                    "The candidate must beat the champion by this much (can only raise)"),
}

DAG_DOC = """
# HemaFlow retraining: `{dataset}`

{description}

Runs **{schedule}** (cron, no catch-up) **or** as soon as new images land under
`{asset_uri}` (the `hemaflow_watch_raw` DAG emits that Asset), one run at a time.

| task | does | passes on |
|---|---|---|
| ingest | lists `{prefix}`, downloads only new/changed images, writes a manifest | manifest key |
| validate | per-image checks + Great Expectations suite; quarantines bad images | validated key |
| preprocess | resizes, splits by content hash, writes TFRecord shards | dataset version |
| train | trains a candidate CNN, logs + registers it in MLflow; **skipped** when dataset version, configuration and code are unchanged | run id, model version |
| evaluate | candidate vs `@champion` on the candidate's held-out test split | metrics |
| gate | floors + margin decide: `promote` or `keep_champion` | decision |
| promote | moves `@champion` (previous one kept as `@previous-champion`) | aliases |
| keep_champion | records the candidate as `@challenger`; champion untouched | aliases |
| notify_serving | asks the serving container to reload (it also polls) | status |
| report | run summary in the task log and in MLflow (`<prefix>-pipeline-runs`) | summary run id |

**Params** (all optional, null = configured value) override settings for this run only:
epochs, image size, network input size, warm start, bad-fraction threshold and gate thresholds (the gate's
floors and margin can only be raised above the configured values, never lowered).
"""


def _overrides() -> dict[str, Any]:
    params = get_current_context()["params"]
    return {k: params[k] for k in OVERRIDE_PARAMS if params.get(k) is not None}


def _settings() -> Settings:
    """Settings for this task: environment/.env plus the run's params (validated by pydantic)."""
    from training.gate import run_settings

    return run_settings(get_settings(), _overrides())


def _apply_gate(dataset: str, trained: dict, decision: dict) -> dict:
    """Record the gate decision in the registry (promote and keep_champion share this body).

    A champion that moved since evaluate makes the decision stale: fail without retry (the
    version stays ungated, so the next run evaluates it again against the new champion)."""
    from training.registry import ChampionMoved, apply_gate

    try:
        model_version = TrainResult.from_dict(trained).model_version
        return apply_gate(dataset, model_version, GateDecision.from_dict(decision).to_dict(), settings=_settings())
    except ChampionMoved as exc:
        raise AirflowFailException(f"not applied: {exc}") from exc


def _params() -> dict[str, Param]:
    return {
        name: Param(None, type=types, description=desc, **bounds)
        for name, (types, bounds, desc) in OVERRIDE_PARAMS.items()
    }


def build_retrain_dag(spec: DatasetSpec, settings: Settings):
    """The retraining DAG of one dataset spec."""
    dataset = spec.name
    asset = Asset(name=raw_asset_name(dataset), uri=raw_asset_uri(settings.s3_bucket, spec.s3_prefix))
    # No start_date and run_immediately=False: a new DAG waits for its first cron time instead of
    # running the latest past interval at once (on a prefix that may still be empty).
    schedule = AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(settings.retrain_schedule, timezone="UTC", run_immediately=False),
        assets=[asset],
    )
    default_args = task_defaults(
        retry_delay=timedelta(seconds=30), max_retry_delay=timedelta(minutes=10),
        execution_timeout=timedelta(minutes=30),
    )
    train_timeout = timedelta(seconds=settings.train_time_budget_s * 2 + 1800)

    @dag(
        dag_id=f"{DAG_ID_PREFIX}{dataset}",
        schedule=schedule,
        catchup=False,
        is_paused_upon_creation=False,  # a new spec retrains on its first upload
        max_active_runs=1,
        dagrun_timeout=train_timeout + timedelta(hours=2),
        default_args=default_args,
        params=_params(),
        tags=["hemaflow", "retraining", dataset],
        doc_md=DAG_DOC.format(
            dataset=dataset,
            description=spec.description or "",
            schedule=settings.retrain_schedule,
            asset_uri=asset.uri,
            prefix=spec.s3_prefix,
        ),
        on_failure_callback=log_failure_summary,
        description=f"Retrain, gate and promote the {dataset} model",
    )
    def retrain():
        @task(doc_md="Bring the ingest manifest up to date with the raw S3 prefix (only new/changed objects "
                     "are downloaded, into a content-addressed cache). Returns the manifest key and counts.")
        def ingest() -> dict:
            from pipeline.ingest import ingest as ingest_raw

            return ingest_raw(dataset, settings=_settings()).to_dict()

        @task(doc_md="Validate every image and run the Great Expectations dataset suite on the manifest; "
                     "bad images go to `quarantine/`. Fails **without retry** when the bad fraction is too high.")
        def validate(ingested: dict) -> dict:
            from pipeline.validate import NoImages, ValidationFailed, validate as validate_manifest

            try:
                manifest_key = IngestResult.from_dict(ingested).manifest_key
                return validate_manifest(manifest_key, dataset, settings=_settings()).to_dict()
            except NoImages as exc:  # an empty prefix is not an error: the run ends green, saying so
                raise AirflowSkipException(f"nothing to do: {exc}") from exc
            except ValidationFailed as exc:  # a data problem: retrying cannot help
                raise AirflowFailException(f"validation failed for {dataset}: {exc}") from exc

        @task(execution_timeout=timedelta(hours=1),
              doc_md="Resize (one policy, shared with serving), split by content hash and publish the processed "
                     "dataset version. An unchanged re-run does nothing and says so.")
        def preprocess(validated: dict) -> dict:
            from pipeline.preprocess import preprocess as preprocess_validated

            validated_key = ValidateResult.from_dict(validated).validated_key
            return preprocess_validated(validated_key, dataset, settings=_settings()).to_dict()

        @task(retries=1, execution_timeout=train_timeout, queue=settings.train_queue,
              doc_md="Train a candidate, log it to MLflow and register a model version. **Skipped** when this "
                     "dataset version, configuration and code were already trained and registered.")
        def train(processed: dict) -> dict:
            from training.train import train_candidate

            dataset_version = PreprocessResult.from_dict(processed).dataset_version
            settings = _settings()
            # The run's params (validated in _settings) win over the spec's [training] table.
            run_params = {k: getattr(settings, k) for k in _overrides()}
            result = TrainResult.from_dict(train_candidate(dataset, dataset_version, settings=settings, **run_params))
            # The report reads this key whether or not training was skipped.
            get_current_context()["ti"].xcom_push(key="result", value=result.to_dict())
            if result.skipped:
                raise AirflowSkipException(f"training skipped: {result.reason}")
            return result.to_dict()

        @task(doc_md="Evaluate the candidate and the current `@champion` on the candidate's held-out test split.")
        def evaluate(trained: dict) -> dict:
            from training.gate import evaluate_against_champion

            model_version = TrainResult.from_dict(trained).model_version
            return evaluate_against_champion(dataset, model_version, settings=_settings())

        @task.branch(doc_md="Apply the promotion gate (absolute floors, margin over the champion). "
                            "Chooses `promote` or `keep_champion`; the decision is in XCom key `decision`.")
        def gate(comparison: dict) -> str:
            from training.gate import decide_gate

            decision = GateDecision.from_dict(decide_gate(comparison, settings=_settings()))
            get_current_context()["ti"].xcom_push(key="decision", value=decision.to_dict())
            return "promote" if decision.passed else "keep_champion"

        @task(doc_md="Move `@champion` to the candidate (the previous one becomes `@previous-champion`).")
        def promote(trained: dict, decision: dict) -> dict:
            return _apply_gate(dataset, trained, decision)

        @task(doc_md="The candidate did not pass: record it as `@challenger` with the reason; "
                     "`@champion` is untouched.")
        def keep_champion(trained: dict, decision: dict) -> dict:
            return _apply_gate(dataset, trained, decision)

        @task(retries=0, execution_timeout=timedelta(minutes=5),
              doc_md="POST `/v1/admin/reload` to the serving container. Tolerant: when serving is down it logs "
                     "and continues (serving polls the registry too).")
        def notify_serving() -> dict:
            from ops.notify import notify_serving as post_reload

            return post_reload(settings=_settings())

        @task(trigger_rule=TriggerRule.NONE_FAILED,
              doc_md="Summarise the run (ingested, quarantined, trained, promoted, and why) in this log and in "
                     "MLflow (experiment `<prefix>-pipeline-runs`, tags on the candidate run).")
        def report() -> dict:
            from ops.report import report_run

            ti = get_current_context()["ti"]
            # This DAG's task ids -> the typed results the report reads (None: the task did not run).
            results = RunResults.from_dict({
                "ingest": ti.xcom_pull(task_ids="ingest"), "validate": ti.xcom_pull(task_ids="validate"),
                "preprocess": ti.xcom_pull(task_ids="preprocess"),
                "train": ti.xcom_pull(task_ids="train", key="result"),
                "gate": ti.xcom_pull(task_ids="gate", key="decision"),
                "applied": ti.xcom_pull(task_ids="promote") or ti.xcom_pull(task_ids="keep_champion"),
                "notify": ti.xcom_pull(task_ids="notify_serving"),
            })
            run = {"dag_id": ti.dag_id, "run_id": ti.run_id, "params": _overrides()}
            return report_run(dataset, results.to_dict(), run, settings=_settings())

        ingested = ingest()
        processed = preprocess(validate(ingested))
        trained = train(processed)
        gate_choice = gate(evaluate(trained))
        decision = gate_choice["decision"]
        promoted = promote(trained, decision)
        kept = keep_champion(trained, decision)
        gate_choice >> [promoted, kept]
        notified = notify_serving()
        promoted >> notified
        [trained, notified, kept] >> report()

    return retrain()


def _build_all() -> dict[str, Any]:
    settings = get_settings()
    return {f"{DAG_ID_PREFIX}{spec.name}": build_retrain_dag(spec, settings) for spec in list_specs()}


globals().update(_build_all())
