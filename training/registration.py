"""Registering a trained candidate as a model version, once per configuration.

The run is the claim on its configuration (`training.claim`): before fitting and again before
registering, `contest` checks whether another live run or an already registered version holds
that configuration, and stands this run down if so. Aliases (@champion, @challenger) are the
gate's business (`training.registry`).
"""

from __future__ import annotations

import logging
from typing import Any

from contracts.settings import Settings
from training.tracking import TAG_CONFIG_HASH, find_version_by_config

log = logging.getLogger("training")


def existing_version_result(existing, model_name: str, dataset_version: str, chash: str) -> dict[str, Any]:
    """The registered version of this configuration: skipped once gated, else the candidate to gate."""
    from training.registry import TAG_GATE_DECISION

    decision = existing.tags.get(TAG_GATE_DECISION)
    done = (f"{model_name} version {existing.version} was already trained on {dataset_version} "
            f"with the same configuration and code (config_hash {chash})")
    reason = (f"{done}; gate decision: {decision}" if decision
              else f"{done} but has no gate decision yet: it is the candidate to gate")
    log.info("%s: %s", "skipped" if decision else "resumed", reason)
    return {"run_id": existing.run_id, "model_version": str(existing.version), "skipped": bool(decision),
            "resumed": not decision, "reason": reason, "model_name": model_name,
            "dataset_version": dataset_version}


def contest(client, exp_id: str, run_id: str, model_name: str, chash: str, dataset_version: str,
            s: Settings) -> dict[str, Any] | None:
    """None while this run holds the claim; else it stands down and this says what to report.

    The live claims are read before the registered versions: a winner registers its version
    before its run stops being RUNNING, so one of the two reads sees it.
    """
    from training.claim import describe, live_claims, stand_down

    claims = live_claims(client, exp_id, chash, s)
    if claims and claims[0].info.run_id != run_id:
        winner = claims[0]
        stand_down(client, run_id, winner.info.run_id)
        reason = (f"{describe(winner)} is already training {dataset_version} with this configuration "
                  f"(config_hash {chash}); run {run_id} stood down")
        log.info("skipped: %s", reason)
        return {"run_id": winner.info.run_id, "model_version": None, "skipped": True, "reason": reason,
                "model_name": model_name, "dataset_version": dataset_version, "stood_down_run_id": run_id}
    existing = find_version_by_config(client, model_name, chash)
    if existing is None:
        return None
    stand_down(client, run_id, existing.run_id)
    return {**existing_version_result(existing, model_name, dataset_version, chash), "stood_down_run_id": run_id}


def version_tags(meta, commit: str, chash: str, fitted) -> dict[str, str]:
    """Tags of the registered version: provenance, task, threshold and the headline test metrics."""
    from training import evaluate as ev

    threshold = fitted.threshold
    return {
        "dataset": meta.dataset, "dataset_version": meta.dataset_version, "git_commit": commit,
        TAG_CONFIG_HASH: chash, "task": "binary" if fitted.binary else "multiclass",
        "threshold": "" if threshold is None else f"{threshold:.6f}",
        **{f"metric.{k}": f"{v:.6f}" for k, v in ev.scalar_metrics(fitted.test_metrics).items()
           if "_" not in k or k in ("balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")},
    }


def register_version(model_uri: str, model_name: str, tags: dict[str, str], run_id: str) -> str:
    """Register the run's model under `model_name`; returns the new version number."""
    import mlflow

    version = mlflow.register_model(model_uri, model_name, tags=tags)
    log.info("registered %s version %s (run %s)", model_name, version.version, run_id)
    return str(version.version)
