"""MLflow tracking of a training run: provenance (config hash, code, packages), the one MLflow
client, and logging params, per-epoch metrics, evaluation plots and reports, the bundle and model.

mlflow is imported inside the functions: importing this module stays light (the DAG's parser,
`training.claim` and `training.registry` import it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.processed import MANIFEST_FILE, DatasetMeta
from contracts.settings import PROJECT_ROOT, Settings
from training.errors import MlflowUnavailable

log = logging.getLogger("training")

# Settings that define a training run (all go into the config hash and the MLflow params).
TRAIN_SETTING_KEYS = (
    "seed",
    "epochs",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "model_width",
    "model_depth",
    "model_ensemble_size",
    "train_input_size",
    "model_stain_normalisation",
    "early_stopping_patience",
    "early_stopping_start_epoch",
    "train_colour_strength",
    "train_time_budget_s",
    "target_sensitivity",
    "threshold_rule",
    "canary_count",
    "model_quantization",
)
# Source files whose content defines "the same code" for idempotence.
CODE_FILES = (
    "training/model.py",
    "training/data.py",
    "training/train.py",
    "training/fitting.py",
    "training/evaluate.py",
    "training/bundle.py",
    "training/calibration.py",
    "training/stopping.py",
    "training/schedule.py",
    "training/ood.py",
    "training/tta.py",
    "contracts/ood.py",
    "contracts/tta.py",
    "contracts/bundle.py",
    "contracts/processed.py",
)
MODEL_ARTIFACT = "model"
TAG_CONFIG_HASH = "config_hash"


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
    # warm_start only when on: existing runs (made without the setting) keep their config hash.
    return {k: getattr(s, k) for k in TRAIN_SETTING_KEYS} | ({"warm_start": True} if s.warm_start else {})


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


# --- the MLflow client -----------------------------------------------------------------------


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


# --- logging a run (inside mlflow.start_run) --------------------------------------------------

# Run param: the dataset version's split parameters (fractions, salt, splits version). A warm start
# needs the champion's to be the same: otherwise images it trained on may be in the candidate's test split.
PARAM_SPLIT_PARAMS = "split_params"


def split_params_text(meta: DatasetMeta) -> str:
    return json.dumps((meta.preprocessing or {}).get("splits", {}), sort_keys=True)


def log_run_params(s: Settings, meta: DatasetMeta, folder: Path, commit: str) -> None:
    """The run's inputs: training settings, dataset version and counts, provenance, packages."""
    import mlflow

    manifest_sha = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()
    mlflow.log_params({
        **training_config(s),
        "dataset": meta.dataset,
        "dataset_version": meta.dataset_version,
        "image_size": meta.image_size,
        "labels": ",".join(meta.labels),
        "positive_label": meta.positive_label or "",
        "git_commit": commit,
        "manifest_sha256": manifest_sha,
        "source_manifest_key": meta.source_manifest_key,
        PARAM_SPLIT_PARAMS: split_params_text(meta),
        **{f"n_{split}": sum(meta.counts.get(split, {}).values()) for split in ("train", "val", "test")},
        **{f"pkg_{k}": v for k, v in package_versions().items()},
    })


def epoch_logger(epochs: int, on_epoch: Callable[[int, dict], None] | None) -> Callable[[int, dict], None]:
    """Per-epoch hook: finite metrics to MLflow, one log line (Airflow task log, the demo's terminal)."""
    import mlflow

    def _epoch(epoch: int, logs: dict) -> None:
        finite = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        mlflow.log_metrics(finite, step=epoch)
        log.info("epoch %d/%d %s", epoch + 1, epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in sorted(finite.items()) if k != "learning_rate"))
        if on_epoch is not None:
            on_epoch(epoch, logs)

    return _epoch


def log_quantization(record: dict) -> None:
    """Tag `quantization` (the shipped method, and why float32 when the quantized model was refused)
    and its agreement with Keras on validation as metrics."""
    import mlflow

    mlflow.set_tag("quantization", record["method"])
    if "fallback_reason" in record:
        mlflow.set_tag("quantization_fallback", record["fallback_reason"])
    mlflow.log_metrics({f"quantization_{k}": float(v) for k, v in record.get("validation", {}).items()})


def log_fit(fitted) -> None:
    """What fitting measured (`training.fitting.FitResult`): size, epochs, validation and test metrics."""
    import mlflow

    from training import evaluate as ev
    from training.fitting import ENSEMBLE_MEMBERS_KEY
    from training.stopping import TAG_STOP_REASON

    mlflow.log_param("model_params", fitted.model_params)
    mlflow.set_tag(TAG_STOP_REASON, fitted.stop_reason)
    mlflow.log_param(TAG_STOP_REASON, fitted.stop_reason)
    mlflow.log_metrics({f"calibration_{k}": v for k, v in fitted.calibration.items() if isinstance(v, float)})
    mlflow.log_metrics({"epochs_run": fitted.epochs_run,
                        "stopped_for_time_budget": float(fitted.stopped_for_time_budget),
                        ENSEMBLE_MEMBERS_KEY: fitted.ensemble_members})
    mlflow.log_metrics(ev.scalar_metrics(fitted.val_metrics, "validation_"))
    mlflow.log_metrics(ev.scalar_metrics(fitted.test_metrics, "test_"))


def log_evaluation(s: Settings, meta: DatasetMeta, fitted) -> None:
    """Plots, reports and the validation stage's summary as run artifacts."""
    import mlflow

    from training import evaluate as ev

    labels, metrics = fitted.labels, fitted.test_metrics
    with tempfile.TemporaryDirectory(prefix="hemaflow-train-") as tmp:
        tmpdir = Path(tmp)
        plots = tmpdir / "plots"
        plots.mkdir()
        ev.plot_confusion_matrix(metrics, labels, plots / "confusion_matrix.png")
        ev.plot_roc(fitted.test_y, fitted.test_p, labels, fitted.positive_label, plots / "roc.png")
        ev.plot_calibration(fitted.test_y, fitted.test_p, plots / "calibration.png")
        ev.plot_training_curves(fitted.history, plots / "training_curves.png")
        mlflow.log_artifacts(str(plots), "plots")
        reports = tmpdir / "reports"
        reports.mkdir()
        (reports / "classification_report.txt").write_text(ev.classification_report(metrics, labels))
        (reports / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        (reports / "validation_metrics.json").write_text(json.dumps(fitted.val_metrics, indent=2))
        (reports / "label_map.json").write_text(json.dumps(
            {"labels": labels, "classes": meta.classes, "positive_label": meta.positive_label}, indent=2))
        (reports / "dataset.json").write_text(meta.to_json())
        (reports / "history.json").write_text(
            json.dumps({k: [float(x) for x in v] for k, v in fitted.history.items()}))
        mlflow.log_artifacts(str(reports), "reports")
        summary_dir = tmpdir / "validation"
        summary_dir.mkdir()
        if _copy_validation_summary(s, meta, summary_dir):
            mlflow.log_artifacts(str(summary_dir), "validation")


def _copy_validation_summary(s: Settings, meta: DatasetMeta, out: Path) -> list[Path]:
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


def log_model(model, sample) -> str:
    """The Keras model as an MLflow model (what gets registered); returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    info = mlflow.tensorflow.log_model(
        model, name=MODEL_ARTIFACT, signature=infer_signature(sample, model.predict(sample, verbose=0)),
        pip_requirements=[f"{k}=={v}" for k, v in package_versions().items() if k in ("tensorflow-cpu", "keras")],
    )
    return info.model_uri
