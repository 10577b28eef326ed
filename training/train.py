"""Train one candidate model on one processed dataset version, track it in MLflow, register it.

`train_candidate` is idempotent: a model version whose `config_hash` tag equals the hash of
(dataset, dataset_version, training settings, training code, package versions) means the
same training was already done, so it reports that version instead of training again:
as skipped once the gate has decided on it, else as the candidate still to gate (the
gate failed after training). Two processes that start the same training at once register
one version (`training.claim`). A NaN loss fails the MLflow run and registers nothing.
Promotion is a separate step (`training.gate.promote_if_better`).

This module only orchestrates: fitting is `training.fitting`, MLflow tracking and provenance
`training.tracking`, registration `training.registration`, the bundle `training.bundle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.processed import DatasetMeta
from contracts.settings import Settings, get_settings
from training.errors import TrainingError
from training.tracking import (
    TAG_CONFIG_HASH,
    code_hash,
    config_hash,
    experiment_id,
    find_version_by_config,
    git_commit,
    mlflow_client,
)

log = logging.getLogger("training")


@dataclass(frozen=True)
class CandidateRun:
    """One claimed MLflow run training one configuration (what the steps below share)."""

    settings: Settings
    meta: DatasetMeta
    run_id: str
    exp_id: str
    model_name: str
    chash: str
    commit: str
    verbose: int
    on_epoch: Callable[[int, dict], None] | None
    started: float


def latest_dataset_version(dataset: str, settings: Settings | None = None) -> str:
    """The newest complete processed version of `dataset`; a clear error when there is none."""
    from pipeline.storage import latest_processed_version

    s = settings or get_settings()
    version = latest_processed_version(dataset, s)
    if version is None:
        raise TrainingError(f"no processed version of {dataset!r} in s3://{s.s3_bucket}/processed/{dataset}/; "
                            "run the pipeline first (`python -m pipeline run --dataset ...`)")
    return version


def train_candidate(
    dataset: str,
    dataset_version: str | None = None,
    settings: Settings | None = None,
    verbose: int = 0,
    on_epoch: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train, evaluate, log and register one model; returns {run_id, model_version, skipped, reason, ...}.

    `overrides` replace settings fields for this run (e.g. epochs=2). `verbose` is Keras'
    fit verbosity (the CLI shows a progress bar); `on_epoch(epoch, logs)` is called per epoch.
    `resumed` is true when the version was registered earlier and still awaits its gate.
    """
    import mlflow

    from contracts.dataset_spec import training_settings
    from pipeline.storage import load_meta
    from training.claim import claim_tags, heartbeat
    from training.registration import existing_version_result

    s = training_settings(settings or get_settings(), dataset)  # the spec's [training] table, then `overrides`
    if overrides:
        s = s.model_copy(update=overrides)
    client = mlflow_client(s)
    dataset_version = dataset_version or latest_dataset_version(dataset, s)
    model_name = s.model_name(dataset)
    chash = config_hash(s, dataset, dataset_version)
    existing = find_version_by_config(client, model_name, chash)
    if existing is not None:
        return existing_version_result(existing, model_name, dataset_version, chash)

    meta = load_meta(dataset, dataset_version, s)
    commit = git_commit()
    exp_id = experiment_id(client, model_name)
    started = time.monotonic()
    # The run is the claim on this configuration: made before fitting, contested after a settle.
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{dataset_version}", tags={
            "dataset": dataset, "dataset_version": dataset_version, "git_commit": commit,
            TAG_CONFIG_HASH: chash, "code_hash": code_hash(), **claim_tags()}) as run:
        with heartbeat(client, run.info.run_id):
            return _claimed_training(client, CandidateRun(
                settings=s, meta=meta, run_id=run.info.run_id, exp_id=exp_id, model_name=model_name, chash=chash,
                commit=commit, verbose=verbose, on_epoch=on_epoch, started=started))


def _claimed_training(client, c: CandidateRun) -> dict[str, Any]:
    """Inside the claim's run (heartbeat on): contest it, fit, evaluate, log, contest again, register."""
    import mlflow

    from pipeline.storage import fetch_processed
    from training.claim import CLAIM_SETTLE_S
    from training.model_card import publish_card_quietly
    from training.registration import contest, register_version
    from training.tracking import log_run_params

    time.sleep(CLAIM_SETTLE_S)
    lost = contest(client, c.exp_id, c.run_id, c.model_name, c.chash, c.meta.dataset_version, c.settings)
    if lost is not None:
        return lost
    folder = fetch_processed(c.meta.dataset, c.meta.dataset_version, c.settings)
    log_run_params(c.settings, c.meta, folder, c.commit)
    result, model_uri, tags = _fit_evaluate_log(c, folder)
    lost = contest(client, c.exp_id, c.run_id, c.model_name, c.chash, c.meta.dataset_version, c.settings)
    if lost is not None:
        return lost
    result["model_version"] = register_version(model_uri, c.model_name, tags, c.run_id)
    publish_card_quietly(client, c.model_name, result["model_version"])
    result["train_seconds"] = round(time.monotonic() - c.started, 1)
    mlflow.log_metric("wall_seconds", result["train_seconds"])
    return result


def _fit_evaluate_log(c: CandidateRun, folder: Path) -> tuple[dict[str, Any], str, dict[str, str]]:
    """Fit, evaluate and log everything of the run; returns (result, model URI, version tags) to register."""
    import tempfile

    import mlflow

    from contracts.bundle import BUNDLE_DIR, TFLiteRunner
    from contracts.dataset_spec import inference_tta_default
    from contracts.imaging import crop_of
    from contracts.tta import BUNDLE_KEY as TTA_BUNDLE_KEY
    from contracts.tta import DEFAULT_KEY as TTA_DEFAULT_KEY
    from contracts.tta import DEFAULT_PARAM as TTA_DEFAULT_PARAM
    from training.bundle import export_bundle, shipped_model, signing_key_of
    from training.stopping import TAG_STOP_REASON
    from training.errors import Diverged
    from training.fitting import ENSEMBLE_MEMBERS_KEY, FitRequest, fit_and_evaluate, pick_canaries
    from training.data import load_split_arrays
    from training.ood import fit_for_run
    from training.tta import tta_metrics, tta_record
    from training.registration import version_tags
    from training.tracking import epoch_logger, log_evaluation, log_fit, log_model, log_quantization
    from training.warm_start import fit_settings, log_warm_start

    s, meta = c.settings, c.meta
    signing_key = signing_key_of(s)  # security: fail before training, not after, when no key is set
    warm = log_warm_start(s, meta)
    try:
        fitted = fit_and_evaluate(FitRequest(fit_settings(s, warm), meta, folder, c.verbose,
                                             epoch_logger(s.epochs * s.model_ensemble_size, c.on_epoch), initial_weights=warm.weights))
    except Diverged as exc:
        mlflow.log_param("model_params", exc.model_params)
        mlflow.set_tag("failure", "non-finite loss")
        raise
    log_fit(fitted)
    log_evaluation(s, meta, fitted)
    # The served model (int8 when it follows Keras on validation) is chosen first: the out-of-scope
    # detector (thresholds on val) and the drift profile are fitted on the features IT computes.
    served = shipped_model(fitted.model, meta.image_size, s.model_quantization, fitted.val_x, fitted.labels,
                           fitted.positive_label, fitted.threshold, keras_probabilities=fitted.val_p)
    runner = TFLiteRunner(served[0])
    ood = fit_for_run(runner, folder, meta, fitted.val_x)
    mlflow.log_metrics({f"ood_{k}": v for k, v in ood[1].items()})
    tta = {**tta_record(runner, fitted, load_split_arrays(folder, meta, "test")[0]),
           TTA_DEFAULT_KEY: inference_tta_default(s, meta.dataset)}
    mlflow.log_param(TTA_DEFAULT_PARAM, tta[TTA_DEFAULT_KEY])
    mlflow.log_metrics(tta_metrics(tta))
    extra_files, drift = profile_and_card(c, folder, fitted, ood[1], runner, served[1], tta)
    canary_x, canary_labels = pick_canaries(fitted.val_x, fitted.val_y, fitted.labels, s.canary_count)
    with tempfile.TemporaryDirectory(prefix="hemaflow-bundle-") as tmp:
        bundle = export_bundle(
            fitted.model, Path(tmp) / BUNDLE_DIR, dataset=meta.dataset, dataset_version=meta.dataset_version,
            labels=fitted.labels, classes=meta.classes, image_size=meta.image_size, canary_images=canary_x,
            canary_labels=canary_labels, positive_label=fitted.positive_label, threshold=fitted.threshold,
            metrics={k: v for k, v in fitted.test_metrics.items() if k != "per_class"},
            run_id=c.run_id, model_name=c.model_name, git_commit=c.commit, signing_key=signing_key,
            extra_files=extra_files, crop=crop_of(meta.preprocessing), calibration=fitted.calibration,
            extra={TAG_STOP_REASON: fitted.stop_reason, ENSEMBLE_MEMBERS_KEY: fitted.ensemble_members,
                   TTA_BUNDLE_KEY: tta, **fitted.threshold_rule_record()}, ood=ood,
            served_model=served,
        )
        mlflow.log_artifacts(str(bundle.folder), BUNDLE_DIR)
        mlflow.log_metric("keras_tflite_max_abs_diff", bundle.meta["keras_tflite_max_abs_diff"])
        log_quantization(bundle.meta["quantization"])
    model_uri = log_model(fitted.model, fitted.val_x[:2].astype(np.float32))
    result = {
        "run_id": c.run_id, "skipped": False, "resumed": False, "reason": f"trained on {meta.dataset_version}",
        "model_name": c.model_name, "dataset_version": meta.dataset_version, "metrics": fitted.test_metrics,
        "threshold": fitted.threshold, "epochs_run": fitted.epochs_run, "stop_reason": fitted.stop_reason,
        "dataset_drift": drift,
    }
    result["warm_started_from"] = warm.from_version
    return result, model_uri, version_tags(meta, c.commit, c.chash, fitted)


def profile_and_card(c: CandidateRun, folder: Path, fitted, ood: dict[str, Any], served: Any,
                     quantization: dict[str, Any], tta: dict[str, Any] | None = None
                     ) -> tuple[dict[str, bytes], dict[str, Any] | None]:
    """The training-data profile (features by `served`, the bundle's TFLite runner) and the model
    card, logged to the run and returned as bundle files, and the data's drift against the
    champion's profile ({level, reference, detail}; None: no champion)."""
    import mlflow

    from contracts.bundle import DATA_PROFILE_FILE, MODEL_CARD_FILE
    from contracts.drift import profile_bytes
    from training.data_profile import drift_vs_champion, training_profile
    from training.model_card import log_card, render_card, training_card

    profile = training_profile(served, folder, c.meta, c.settings.seed)
    mlflow.log_dict(profile, f"profile/{DATA_PROFILE_FILE}")
    drift = drift_vs_champion(mlflow_client(c.settings), c.settings, c.model_name, profile)
    card = training_card(c.settings, c.meta, fitted, c.run_id, c.model_name, c.commit, ood, quantization, tta)
    mlflow.log_metrics({f"test_{k}_ci_{end}": v[end] for k, v in card["intervals"].items()
                        for end in ("low", "high") if np.isfinite(v[end])})
    log_card(mlflow_client(c.settings), c.run_id, card)
    files = {DATA_PROFILE_FILE: profile_bytes(profile), MODEL_CARD_FILE: render_card(card).encode()}
    summary = None if drift is None else {
        "level": drift.level, "reference": drift.reference,
        "detail": "; ".join(f"{k.name}: {k.detail}" for k in drift.checks if k.tested)}
    return files, summary
