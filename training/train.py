"""Train one candidate model on one processed dataset version, track it in MLflow, register it.

`train_candidate` is idempotent: a model version whose `config_hash` tag equals the hash of
(dataset, dataset_version, training settings, training code, package versions) means the
same training was already done, so it reports that version instead of training again:
as skipped once the gate has decided on it, else as the candidate still to gate (the
gate failed after training). Two processes that start the same training at once register
one version (`training.claim`). A NaN loss fails the MLflow run and registers nothing.
Promotion is a separate step (`training.registry.promote_if_better`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger("training")

# Settings that define a training run (all go into the config hash and the MLflow params).
TRAIN_SETTING_KEYS = (
    "seed",
    "epochs",
    "batch_size",
    "learning_rate",
    "model_width",
    "model_depth",
    "train_input_size",
    "early_stopping_patience",
    "train_colour_strength",
    "train_time_budget_s",
    "target_sensitivity",
    "canary_count",
)
# Source files whose content defines "the same code" for idempotence.
CODE_FILES = (
    "training/model.py",
    "training/data.py",
    "training/train.py",
    "training/evaluate.py",
    "training/bundle.py",
    "training/calibration.py",
    "training/stopping.py",
    "pipeline/processed.py",
)
MODEL_ARTIFACT = "model"
TAG_CONFIG_HASH = "config_hash"


class TrainingError(RuntimeError):
    """Training could not produce a registered model."""


class MlflowUnavailable(TrainingError):
    """The MLflow tracking server cannot be reached."""


# --- provenance ------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_hash() -> str:
    digest = hashlib.sha256()
    for rel in CODE_FILES:
        path = PROJECT_ROOT / rel
        digest.update(rel.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return digest.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tensorflow-cpu", "keras", "numpy", "mlflow", "ai-edge-litert", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def training_config(s: Settings) -> dict[str, Any]:
    return {k: getattr(s, k) for k in TRAIN_SETTING_KEYS}


def config_hash(s: Settings, dataset: str, dataset_version: str) -> str:
    """Identity of a training run: data version + settings + code + package versions.

    The training code is hashed by content rather than by git commit, so a commit that
    touches only other parts of the project does not trigger a retrain.
    """
    payload = {
        "dataset": dataset,
        "dataset_version": dataset_version,
        "config": training_config(s),
        "code": code_hash(),
        "packages": package_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# --- MLflow helpers --------------------------------------------------------------------------


def check_mlflow(s: Settings, timeout_s: float = 3.0) -> None:
    """Fail fast with a clear message instead of MLflow's long retry loop."""
    url = s.mlflow_tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - configured URL
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise MlflowUnavailable(
        f"MLflow tracking server at {s.mlflow_tracking_uri} is unreachable ({problem}). "
        "Start the local stack with `python -m pipeline stack up` or set MLFLOW_TRACKING_URI."
    )


def mlflow_client(s: Settings):
    """Point the mlflow fluent API at the configured server and return a client."""
    import mlflow
    from mlflow import MlflowClient

    check_mlflow(s)
    mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    return MlflowClient(tracking_uri=s.mlflow_tracking_uri)


def experiment_id(client, name: str) -> str:
    """Get-or-create the experiment (tolerates a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def find_version_by_config(client, model_name: str, chash: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if v.tags.get(TAG_CONFIG_HASH) == chash]
    return max(matches, key=lambda v: int(v.version)) if matches else None


# --- dataset version resolution --------------------------------------------------------------


def latest_dataset_version(dataset: str, settings: Settings | None = None) -> str:
    """The newest complete processed version of `dataset` (by dataset.json creation time)."""
    from pipeline.processed import META_FILE, DatasetMeta
    from pipeline.storage import iter_objects, s3_client

    s = settings or get_settings()
    client = s3_client(s)
    best: tuple[str, str] | None = None
    for obj in iter_objects(client, s.s3_bucket, f"processed/{dataset}/"):
        key = obj["Key"]
        if not key.endswith("/" + META_FILE):
            continue
        meta = DatasetMeta.from_json(client.get_object(Bucket=s.s3_bucket, Key=key)["Body"].read().decode())
        stamp = meta.created_at or str(obj.get("LastModified", ""))
        if best is None or stamp > best[0]:
            best = (stamp, meta.dataset_version)
    if best is None:
        raise TrainingError(f"no processed version of {dataset!r} in s3://{s.s3_bucket}/processed/{dataset}/; "
                            "run the pipeline first (`python -m pipeline run --dataset ...`)")
    return best[1]


# --- callbacks -------------------------------------------------------------------------------


def _callbacks(s: Settings, on_epoch: Callable[[int, dict], None] | None):
    """Early stopping / epochs end the run; the wall-clock budget is a safety stop (training.stopping)."""
    import keras

    from training.stopping import reproducible_callbacks

    class EpochHook(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if on_epoch is not None:
                on_epoch(epoch, dict(logs or {}))

    callbacks, stops = reproducible_callbacks(s.early_stopping_patience, s.train_time_budget_s)
    return [*callbacks, EpochHook()], stops


def _finite(history: dict[str, list[float]], model) -> bool:
    losses = history.get("loss", [])
    if not losses or any(not math.isfinite(v) for v in losses):
        return False
    return all(np.isfinite(w).all() for w in model.get_weights())


def _pick_canaries(images: np.ndarray, y: np.ndarray, labels: list[str], count: int):
    """Up to `count` images, round-robin over labels, so every class has a canary when possible."""
    order: list[int] = []
    per_label = [list(np.flatnonzero(y == k)) for k in range(len(labels))]
    while len(order) < min(count, len(y)) and any(per_label):
        for bucket in per_label:
            if bucket and len(order) < count:
                order.append(int(bucket.pop(0)))
    return images[order], [labels[int(y[i])] for i in order]


def _log_validation_summary(s: Settings, meta, out: Path) -> list[Path]:
    """Copy the foundation stage's validation summary (json + md) next to the run."""
    from pipeline.storage import s3_client

    if not meta.validation_summary_key:
        return []
    client = s3_client(s)
    base = meta.validation_summary_key.rsplit("/", 1)[0]
    written = []
    for name in ("summary.json", "summary.md"):
        try:
            body = client.get_object(Bucket=s.s3_bucket, Key=f"{base}/{name}")["Body"].read()
        except Exception:  # noqa: BLE001 - optional artifact; absence is logged below
            continue
        path = out / name
        path.write_bytes(body)
        written.append(path)
    if not written:
        log.warning("validation summary %s not found; not logged", meta.validation_summary_key)
    return written


# --- the training run ------------------------------------------------------------------------


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

    from pipeline.processed import load_meta
    from training.claim import claim_tags, heartbeat

    s = settings or get_settings()
    if overrides:
        s = s.model_copy(update=overrides)
    client = mlflow_client(s)
    dataset_version = dataset_version or latest_dataset_version(dataset, s)
    model_name = s.model_name(dataset)
    chash = config_hash(s, dataset, dataset_version)
    existing = find_version_by_config(client, model_name, chash)
    if existing is not None:
        return _existing_version_result(existing, model_name, dataset_version, chash)

    meta = load_meta(dataset, dataset_version, s)
    commit = git_commit()
    exp_id = experiment_id(client, model_name)
    started = time.monotonic()
    # The run is the claim on this configuration: made before fitting, contested after a settle.
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{dataset_version}", tags={
            "dataset": dataset, "dataset_version": dataset_version, "git_commit": commit,
            TAG_CONFIG_HASH: chash, "code_hash": code_hash(), **claim_tags()}) as run:
        run_id = run.info.run_id
        with heartbeat(client, run_id):
            result = _claimed_training(client, s, meta, run_id=run_id, exp_id=exp_id, model_name=model_name,
                                       chash=chash, commit=commit, verbose=verbose, on_epoch=on_epoch,
                                       started=started)
    return result


def _claimed_training(client, s: Settings, meta, *, run_id: str, exp_id: str, model_name: str, chash: str,
                      commit: str, verbose: int, on_epoch, started: float) -> dict[str, Any]:
    """Inside the claim's run (heartbeat on): contest it, fit, evaluate, log, contest again, register."""
    import mlflow

    from pipeline.processed import MANIFEST_FILE, fetch_processed
    from training.claim import CLAIM_SETTLE_S

    dataset, dataset_version = meta.dataset, meta.dataset_version
    time.sleep(CLAIM_SETTLE_S)
    lost = _contest(client, exp_id, run_id, model_name, chash, dataset_version, s)
    if lost is not None:
        return lost
    folder = fetch_processed(dataset, dataset_version, s)
    manifest_sha = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()
    mlflow.log_params({
        **training_config(s),
        "dataset": dataset,
        "dataset_version": dataset_version,
        "image_size": meta.image_size,
        "labels": ",".join(meta.labels),
        "positive_label": meta.positive_label or "",
        "git_commit": commit,
        "manifest_sha256": manifest_sha,
        "source_manifest_key": meta.source_manifest_key,
        **{f"n_{split}": sum(meta.counts.get(split, {}).values()) for split in ("train", "val", "test")},
        **{f"pkg_{k}": v for k, v in package_versions().items()},
    })
    result, model_uri, tags = _fit_evaluate_log(s, meta, folder, run_id, model_name, commit, chash,
                                                verbose, on_epoch)
    lost = _contest(client, exp_id, run_id, model_name, chash, dataset_version, s)
    if lost is not None:
        return lost
    version = mlflow.register_model(model_uri, model_name, tags=tags)
    log.info("registered %s version %s (run %s)", model_name, version.version, run_id)
    result["model_version"] = str(version.version)
    result["train_seconds"] = round(time.monotonic() - started, 1)
    mlflow.log_metric("wall_seconds", result["train_seconds"])
    return result


def _existing_version_result(existing, model_name: str, dataset_version: str, chash: str) -> dict[str, Any]:
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


def _contest(client, exp_id: str, run_id: str, model_name: str, chash: str, dataset_version: str,
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
    return {**_existing_version_result(existing, model_name, dataset_version, chash), "stood_down_run_id": run_id}


def _fit_evaluate_log(s, meta, folder: Path, run_id: str, model_name: str, commit: str, chash: str,
                      verbose: int, on_epoch) -> tuple[dict[str, Any], str, dict[str, str]]:
    """Fit, evaluate and log everything of the run; returns (result, model URI, version tags) to register."""
    import keras
    import mlflow
    from mlflow.models import infer_signature

    from training import evaluate as ev
    from serving.bundle import BUNDLE_DIR
    from pipeline.preprocess import crop_of
    from training.bundle import export_bundle, signing_key_of
    from training.calibration import calibrate
    from training.data import class_weights, configure_threads, load_split_arrays, make_dataset
    from training.model import build_model, served_twin
    from training.stopping import TAG_STOP_REASON, enable_determinism, stop_reason

    signing_key = signing_key_of(s)  # security: fail before training, not after, when no key is set
    configure_threads()
    enable_determinism(s.seed)
    labels, binary = list(meta.labels), len(meta.labels) == 2
    size = s.train_input_size
    train_ds = make_dataset(folder, meta, "train", s.batch_size, training=True, seed=s.seed, resize_to=size,
                            colour_strength=s.train_colour_strength)
    val_ds = make_dataset(folder, meta, "val", s.batch_size, resize_to=size)
    # Trained at the network's input size; the served twin (input IMAGE_SIZE) gets its weights.
    net = build_model(len(labels), size, size, s.model_width, s.model_depth, seed=s.seed)
    net.compile(
        optimizer=keras.optimizers.Adam(s.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    mlflow.log_param("model_params", net.count_params())

    def _epoch(epoch: int, logs: dict) -> None:
        finite = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        mlflow.log_metrics(finite, step=epoch)
        # One line per epoch: progress in the Airflow task log (and the demo's terminal).
        log.info("epoch %d/%d %s", epoch + 1, s.epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in sorted(finite.items()) if k != "learning_rate"))
        if on_epoch is not None:
            on_epoch(epoch, logs)

    callbacks, stops = _callbacks(s, _epoch)
    history = net.fit(
        train_ds, validation_data=val_ds, epochs=s.epochs, class_weight=class_weights(meta),
        callbacks=callbacks, verbose=verbose,
    ).history
    if not _finite(history, net):
        mlflow.set_tag("failure", "non-finite loss")
        raise TrainingError(f"training of {meta.dataset} {meta.dataset_version} diverged (NaN/inf loss); "
                            "the run is marked FAILED and nothing was registered")
    reason = stop_reason(stops, len(history["loss"]), s.epochs)
    mlflow.set_tag(TAG_STOP_REASON, reason)
    mlflow.log_param(TAG_STOP_REASON, reason)
    mlflow.log_metrics({"epochs_run": len(history["loss"]),
                        "stopped_for_time_budget": float(stops.budget.stopped_for_budget)})

    # Evaluation: temperature and threshold from validation, figures from test.
    val_x, val_y = load_split_arrays(folder, meta, "val")
    test_x, test_y = load_split_arrays(folder, meta, "test")
    model, calibration = calibrate(served_twin(net, len(labels), meta.image_size, size, s.model_width,
                                               s.model_depth), val_x, val_y, test_x, test_y)
    mlflow.log_metrics({f"calibration_{k}": v for k, v in calibration.items() if isinstance(v, float)})
    val_p = model.predict(val_x.astype(np.float32), batch_size=64, verbose=0)
    test_p = model.predict(test_x.astype(np.float32), batch_size=64, verbose=0)
    positive = meta.positive_label if binary else None
    threshold = None
    if binary and positive is not None:
        pos = labels.index(positive)
        threshold = ev.choose_threshold(val_y == pos, val_p[:, pos], s.target_sensitivity)
    val_metrics = ev.compute_metrics(val_y, val_p, labels, positive, threshold)
    test_metrics = ev.compute_metrics(test_y, test_p, labels, positive, threshold)
    mlflow.log_metrics(ev.scalar_metrics(val_metrics, "validation_"))
    mlflow.log_metrics(ev.scalar_metrics(test_metrics, "test_"))

    with tempfile.TemporaryDirectory(prefix="hemaflow-train-") as tmp:
        tmpdir = Path(tmp)
        plots = tmpdir / "plots"
        plots.mkdir()
        ev.plot_confusion_matrix(test_metrics, labels, plots / "confusion_matrix.png")
        ev.plot_roc(test_y, test_p, labels, positive, plots / "roc.png")
        ev.plot_calibration(test_y, test_p, plots / "calibration.png")
        ev.plot_training_curves(history, plots / "training_curves.png")
        mlflow.log_artifacts(str(plots), "plots")
        reports = tmpdir / "reports"
        reports.mkdir()
        (reports / "classification_report.txt").write_text(ev.classification_report(test_metrics, labels))
        (reports / "test_metrics.json").write_text(json.dumps(test_metrics, indent=2))
        (reports / "validation_metrics.json").write_text(json.dumps(val_metrics, indent=2))
        (reports / "label_map.json").write_text(json.dumps(
            {"labels": labels, "classes": meta.classes, "positive_label": meta.positive_label}, indent=2))
        (reports / "dataset.json").write_text(meta.to_json())
        (reports / "history.json").write_text(json.dumps({k: [float(x) for x in v] for k, v in history.items()}))
        mlflow.log_artifacts(str(reports), "reports")
        summary_dir = tmpdir / "validation"
        summary_dir.mkdir()
        if _log_validation_summary(s, meta, summary_dir):
            mlflow.log_artifacts(str(summary_dir), "validation")

        canary_x, canary_labels = _pick_canaries(val_x, val_y, labels, s.canary_count)
        bundle_metrics = {k: v for k, v in test_metrics.items() if k != "per_class"}
        bundle = export_bundle(
            model, tmpdir / BUNDLE_DIR, dataset=meta.dataset, dataset_version=meta.dataset_version,
            labels=labels, classes=meta.classes, image_size=meta.image_size, canary_images=canary_x,
            canary_labels=canary_labels, positive_label=positive, threshold=threshold, metrics=bundle_metrics,
            run_id=run_id, model_name=model_name, git_commit=commit, signing_key=signing_key,
            crop=crop_of(meta.preprocessing), calibration=calibration, extra={TAG_STOP_REASON: reason},
        )
        mlflow.log_artifacts(str(bundle.folder), BUNDLE_DIR)
        mlflow.log_metric("keras_tflite_max_abs_diff", bundle.meta["keras_tflite_max_abs_diff"])

    sample = val_x[:2].astype(np.float32)
    info = mlflow.tensorflow.log_model(
        model, name=MODEL_ARTIFACT, signature=infer_signature(sample, model.predict(sample, verbose=0)),
        pip_requirements=[f"{k}=={v}" for k, v in package_versions().items() if k in ("tensorflow-cpu", "keras")],
    )
    tags = {
        "dataset": meta.dataset, "dataset_version": meta.dataset_version, "git_commit": commit,
        TAG_CONFIG_HASH: chash, "task": "binary" if binary else "multiclass",
        "threshold": "" if threshold is None else f"{threshold:.6f}",
        **{f"metric.{k}": f"{v:.6f}" for k, v in ev.scalar_metrics(test_metrics).items() if "_" not in k or k in (
            "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")},
    }
    result = {
        "run_id": run_id, "skipped": False, "resumed": False, "reason": f"trained on {meta.dataset_version}",
        "model_name": model_name, "dataset_version": meta.dataset_version, "metrics": test_metrics,
        "threshold": threshold, "epochs_run": len(history["loss"]), TAG_STOP_REASON: reason,
        "calibration": calibration,
    }
    return result, info.model_uri, tags
