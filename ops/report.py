"""Run summaries of the retraining DAG: what was ingested, quarantined, trained, promoted, and why.

`report_run` is what the DAG's last task calls: it condenses the typed stage results
(`contracts.stages.RunResults`, passed as a dict) into one summary, logs it, and records it
in MLflow (a run in the `<prefix>-pipeline-runs` experiment with `run_summary.json` /
`run_summary.md`, plus tags on the candidate's training run) so the history of every
retraining is browsable in one place. `failure_summary` / `log_failure_summary` are the DAG's
on-failure callback.

MLflow is imported inside the functions: the DAG files import this module (the callback) while parsing.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from contracts.settings import Settings, get_settings
from contracts.stages import RunResults

log = logging.getLogger(__name__)

PIPELINE_RUNS_EXPERIMENT = "pipeline-runs"  # full name: f"{model_name_prefix}-pipeline-runs"
# Stages before the promotion: a failure there cannot have moved @champion.
STAGES_BEFORE_PROMOTION = ("ingest", "validate", "preprocess", "train", "evaluate", "gate", "keep_champion")
FAILURE_HINTS = {
    "ingest": "check that the S3 endpoint is reachable and the credentials are right",
    "validate": "too many images failed validation; see the quarantine/ and validation/ prefixes",
    "preprocess": "see the task log; the processed dataset is only published when complete",
    "train": "see the task log and the MLflow run of the candidate",
    "evaluate": "the candidate could not be evaluated against the champion; see the task log",
    "promote": "the registry may be half-updated: check the aliases of the registered model",
    "notify_serving": "serving keeps polling the registry and will pick up the champion",
    "report": "the run itself completed; only its summary could not be recorded",
}


def _outcome(r: RunResults, trained: bool, promoted: bool) -> str:
    version = r.train.model_version if r.train else None
    gate_reason = r.gate.reason if r.gate else ""
    if r.ingest is not None and r.ingest.total == 0:
        return "nothing to do: no images under the dataset's raw prefix yet"
    if r.train is None:
        return "training did not run"
    if not trained:
        return f"nothing to do: {r.train.reason or 'unchanged dataset, configuration and code'}"
    if promoted:
        return f"model version {version} promoted to @champion: {gate_reason}"
    if r.gate is not None:
        return f"candidate version {version} not promoted, @champion unchanged: {gate_reason}"
    return f"candidate version {version} trained but not gated"


def build_summary(dataset: str, results: RunResults, run: dict[str, Any] | None = None) -> dict:
    """Pure: the run summary from the typed stage results (None for a stage that did not run)."""
    r = results
    trained = r.train is not None and not r.train.skipped
    passed = r.gate is not None and r.gate.passed is True
    promoted = r.applied is not None and passed
    run = run or {}
    return {
        "dataset": dataset,
        "dag_id": run.get("dag_id"),
        "dag_run_id": run.get("run_id"),
        "params": {k: v for k, v in (run.get("params") or {}).items() if v is not None},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ingested": {k: getattr(r.ingest, k) if r.ingest else None
                     for k in ("new", "changed", "deleted", "unchanged", "total", "manifest_key",
                                   "reviewed")},
        "quarantined": r.validate.quarantined if r.validate else None,
        "bad_fraction": r.validate.bad_fraction if r.validate else None,
        "validation_summary_key": r.validate.summary_key if r.validate else None,
        "dataset_version": r.preprocess.dataset_version if r.preprocess else None,
        "dataset_created": r.preprocess.created if r.preprocess else None,
        "trained": trained,
        "training_reason": r.train.reason if r.train else None,
        "candidate_run_id": r.train.run_id if r.train else None,
        "candidate_version": r.train.model_version if r.train else None,
        "dataset_drift": r.train.extra.get("dataset_drift") if r.train else None,  # {level, reference, detail}
        "gate_passed": r.gate.passed if r.gate else None,
        "gate_reason": r.gate.reason if r.gate else None,
        "gate_reviewed": r.gate.reviewed if r.gate else None,  # {n, candidate, champion}; not gated on
        "primary_metric": r.gate.extra.get("primary_metric") if r.gate else None,
        "promoted": promoted,
        "kept_as_challenger": r.applied is not None and not passed,
        "champion_version": r.applied.champion if r.applied else None,
        "serving_notified": r.notify.notified if r.notify else None,
        "serving_detail": r.notify.detail if r.notify else None,
        "outcome": _outcome(r, trained, promoted),
    }


def reviewed_line(reviewed: dict | None, primary_metric: str | None) -> str:
    """Pure: the gate's figures on reviewed images, one line (recorded, not gated on)."""
    if not reviewed or not reviewed.get("n"):
        return "Reviewed images at the gate: none in this dataset version"
    metrics = [m for m in ("accuracy", primary_metric or "balanced_accuracy") if m]
    metrics = list(dict.fromkeys(metrics))

    def figures(who: str) -> str:
        values = reviewed.get(who)
        if not values:
            return f"{who} not evaluated"
        return f"{who} " + ", ".join(f"{m} {values[m]:.4f}" for m in metrics if values.get(m) is not None)

    return (f"Reviewed images at the gate ({reviewed['n']}, not gated on): "
            f"{figures('candidate')}; {figures('champion')}")


def summary_markdown(summary: dict) -> str:
    ing = summary["ingested"]
    lines = [
        f"# HemaFlow retraining: {summary['dataset']}",
        "",
        f"**Outcome:** {summary['outcome']}",
        "",
        f"- DAG run: `{summary['dag_id']}` / `{summary['dag_run_id']}` (finished {summary['finished_at']})",
        f"- Ingested: {ing['new']} new, {ing['changed']} changed, {ing['deleted']} deleted, "
        f"{ing['unchanged']} unchanged, {ing['total']} total (manifest `{ing['manifest_key']}`); "
        f"reviewed images joined: {ing['reviewed'] or 0}",
        f"- Quarantined: {summary['quarantined']} (bad fraction {summary['bad_fraction']}); "
        f"validation summary `{summary['validation_summary_key']}`",
        f"- Dataset version: `{summary['dataset_version']}` (new: {summary['dataset_created']})",
        f"- Trained: {summary['trained']} ({summary['training_reason'] or 'candidate trained'}); "
        f"candidate run `{summary['candidate_run_id']}`, version {summary['candidate_version']}",
        f"- Gate: passed={summary['gate_passed']} ({summary['gate_reason']})",
        f"- Promoted: {summary['promoted']}; @champion after this run: {summary['champion_version']}; "
        f"serving notified: {summary['serving_notified']}",
    ]
    if summary.get("gate_passed") is not None:
        lines.append(f"- {reviewed_line(summary.get('gate_reviewed'), summary.get('primary_metric'))}")
    drift = summary.get("dataset_drift")
    if drift:
        mark = "**STRONG DRIFT**" if drift["level"] == "strong" else drift["level"]
        lines.append(f"- Data drift vs {drift['reference']}: {mark} ({drift['detail']})")
    if summary["params"]:
        lines.append(f"- Overrides: `{json.dumps(summary['params'], sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(name).experiment_id


def record_summary(summary: dict, settings: Settings | None = None) -> str:
    """Store the summary in MLflow; returns the pipeline-runs run id."""
    from mlflow.tracking import MlflowClient

    s = settings or get_settings()
    client = MlflowClient(tracking_uri=s.mlflow_tracking_uri)
    exp_id = _experiment_id(client, f"{s.model_name_prefix}-{PIPELINE_RUNS_EXPERIMENT}")
    tags = {
        "hemaflow.dataset": summary["dataset"],
        "hemaflow.dag_run_id": str(summary["dag_run_id"]),
        "hemaflow.outcome": summary["outcome"][:4000],
        "hemaflow.trained": str(summary["trained"]).lower(),
        "hemaflow.promoted": str(summary["promoted"]).lower(),
    }
    if summary["candidate_version"] is not None:
        tags["hemaflow.candidate_version"] = str(summary["candidate_version"])
    run = client.create_run(exp_id, run_name=f"{summary['dataset']} {summary['dag_run_id']}", tags=tags)
    run_id = run.info.run_id
    ing = summary["ingested"]
    for name, value in (
        ("ingested_new", ing["new"]), ("ingested_changed", ing["changed"]), ("ingested_deleted", ing["deleted"]),
        ("ingested_total", ing["total"]), ("ingested_reviewed", ing.get("reviewed")),
        ("quarantined", summary["quarantined"]),
        ("bad_fraction", summary["bad_fraction"]),
        ("gate_reviewed_n", (summary.get("gate_reviewed") or {}).get("n")),
    ):
        if isinstance(value, (int, float)):
            client.log_metric(run_id, name, float(value))
    client.log_dict(run_id, summary, "run_summary.json")
    client.log_text(run_id, summary_markdown(summary), "run_summary.md")
    client.set_terminated(run_id, "FINISHED")
    if summary["trained"] and summary["candidate_run_id"]:
        # The candidate's own run says what became of it, next to its metrics.
        for key, value in (
            ("hemaflow.pipeline.outcome", summary["outcome"][:4000]),
            ("hemaflow.pipeline.promoted", str(summary["promoted"]).lower()),
            ("hemaflow.pipeline.dag_run_id", str(summary["dag_run_id"])),
            ("hemaflow.pipeline.summary_run_id", run_id),
        ):
            client.set_tag(summary["candidate_run_id"], key, value)
    return run_id


def report_run(
    dataset: str, results: dict[str, dict | None], run: dict[str, Any] | None = None, settings: Settings | None = None
) -> dict:
    """Build, log and record the run summary from `RunResults.to_dict()`; returns it with `summary_run_id`."""
    summary = build_summary(dataset, RunResults.from_dict(results), run)
    log.info("retraining summary\n%s", summary_markdown(summary))
    summary["summary_run_id"] = record_summary(summary, settings)
    return summary


# --- failure callback --------------------------------------------------------------------------


def failure_summary(context: dict) -> str:
    """Pure: one clear paragraph about a failed task or DAG run from an Airflow callback context."""
    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", "?")
    run_id = getattr(dag_run, "run_id", None) or getattr(ti, "run_id", "?")
    task_id = getattr(ti, "task_id", None) or "?"
    exc = context.get("exception") or context.get("reason")
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc or "see the task log")
    try_number, max_tries = getattr(ti, "try_number", None), getattr(ti, "max_tries", None)
    attempt = f" (attempt {try_number} of {max_tries + 1})" if try_number and max_tries is not None else ""
    if task_id in STAGES_BEFORE_PROMOTION:
        impact = "Nothing was promoted by this run: the current @champion stays in service."
    else:
        impact = "Check the registry aliases (champion / challenger) before retrying."
    hint = FAILURE_HINTS.get(task_id, "see the task log")
    return (
        f"HemaFlow retraining FAILED: dag={dag_id} run={run_id} task={task_id}{attempt}\n"
        f"  error: {error[:1000]}\n  impact: {impact}\n  next step: {hint}"
    )


def log_failure_summary(context: dict) -> None:
    """Airflow on_failure_callback: never raises (a failing callback would hide the real error)."""
    try:
        log.error(failure_summary(context))
    except Exception:  # noqa: BLE001
        log.exception("HemaFlow failure callback could not summarise the failure")
