"""Each scored batch as an MLflow run, so a lab browses and compares batches' drift in one place.

One run per (batch, model version) in the experiment `<MODEL_NAME_PREFIX>-screening-<dataset>`,
found again by its tags (`batch_id`, `model_version`): a re-run does not make a second one.
Metrics: the drift figures when drift was tested (`drift_level` 0 none / 1 drift / 2 strong, each
tested check's statistic, p-value and effect: `contracts.drift_checks.DriftResult.metrics`) and the
batch's counts; tags: the drift level ("untested" when too few images or no profile), the champion's
run, the report's S3 key; the drift section as an artifact.
The retraining run logs the dataset version's drift on the candidate's run
(`training.data_profile.drift_vs_champion`, metrics `dataset_drift_*`).

mlflow is imported inside the functions (the scoring DAG's parser imports screening.score).
"""

from __future__ import annotations

from typing import Any

from contracts.screening import REPORT_FILE
from contracts.settings import Settings

SCREENING_EXPERIMENT = "screening"  # full name: f"{model_name_prefix}-screening-<dataset>"
DRIFT_HTML_ARTIFACT = "drift/batch_drift.html"
COUNT_METRICS = ("n_images", "n_scored", "n_bad", "n_out_of_scope")


def screening_experiment(s: Settings, dataset: str) -> str:
    return f"{s.model_name_prefix}-{SCREENING_EXPERIMENT}-{dataset}"


def batch_run_tags(summary: dict) -> dict[str, str]:
    """The tags that identify a batch's run (and that find it again)."""
    return {"dataset": summary["dataset"], "batch_id": summary["batch_id"],
            "model_version": str(summary["model_version"])}


def find_batch_run(client, experiment: str, summary: dict):
    """The batch's run in `experiment` (id), or None."""
    tags = batch_run_tags(summary)
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment], filter_string=query, max_results=1)
    return runs[0] if runs else None


def log_batch_run(summary: dict, drift, settings: Settings) -> str:
    """Get-or-create the batch's run and record its drift and counts; returns the run id.

    A finished run that exists (a re-run of a finish that stopped before summary.json) is kept as it
    is; an unfinished one (stopped while logging) is completed."""
    import time

    from mlflow.entities import Metric, RunTag

    from training.tracking import experiment_id, mlflow_client

    client = mlflow_client(settings)
    exp = experiment_id(client, screening_experiment(settings, summary["dataset"]))
    found = find_batch_run(client, exp, summary)
    if found is not None and found.info.status == "FINISHED":
        return found.info.run_id
    run = found or client.create_run(exp, run_name=f"{summary['batch_id']} v{summary['model_version']}",
                                     tags=batch_run_tags(summary))
    stamp = int(time.time() * 1000)
    figures: dict[str, Any] = {**(drift.metrics("drift_") if drift.tested else {}),  # untested: no "level 0"
                               **{k: float(summary[k]) for k in COUNT_METRICS if summary.get(k) is not None}}
    tags = {"drift_level": drift.level if drift.tested else "untested", "drift_reference": drift.reference,
            "champion_run_id": summary.get("run_id") or "", "report": summary["prefix"] + REPORT_FILE}
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in sorted(figures.items())],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.log_text(run.info.run_id, drift.html_section(), DRIFT_HTML_ARTIFACT)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
