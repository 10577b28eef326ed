"""Writing the serving bundle (format and reader: contracts/bundle.py).

`export_bundle` builds it from a trained Keras model and refuses to write a bundle whose
float32 TFLite outputs differ from Keras (max abs diff > CANARY_TOLERANCE). A quantized model
(`shipped_model(..., "dynamic_int8", ...)`) is shipped only when it agrees with Keras on the
validation images (`quantization_agreement`); otherwise the bundle falls back to float32 and says
why in bundle.json `quantization`. `sign_bundle` and
`sign_registered_bundle` sign its SHA256SUMS with BUNDLE_SIGNING_KEY (contracts.signing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import (
    BUNDLE_DIR,
    BUNDLE_JSON,
    CANARY_DIR,
    CANARY_TOLERANCE,
    FORMAT_VERSION,
    MODEL_FILE,
    OUTPUT_FEATURES,
    OUTPUT_PROBABILITIES,
    QUANTIZATION_NONE,
    SIGNATURE,
    SIGNATURE_FILE,
    SUMS_FILE,
    Bundle,
    BundleError,
    TFLiteRunner,
    check_canaries,
    read_bundle,
    read_local_bundle,
    sums_text,
)
from training.model import serving_function

PREPROCESSING = {"policy": "resize_shorter_center_crop", "resample": "bilinear"}
# A quantized model is shipped only within these bounds of the Keras model on validation images.
QUANTIZED_MAX_PROB_DIFF = 0.05
QUANTIZED_MIN_DECISION_AGREEMENT = 0.995
QUANTIZED_MAX_FEATURE_DIFF = 0.05  # relative to each image's largest pooled feature (the OOD input)


def preprocessing_record(crop: str = "center_crop") -> dict[str, str]:
    """bundle.json `preprocessing`: the policy name plus `crop`, the argument serving passes to
    `contracts.imaging.prepare_image` (absent in older bundles, which mean center_crop)."""
    from contracts.imaging import CROP_POLICY_NAMES

    return {**PREPROCESSING, "policy": CROP_POLICY_NAMES[crop], "crop": crop}


def convert_to_tflite(model: Any, image_size: int, quantization: str = QUANTIZATION_NONE) -> bytes:
    """Keras model -> TFLite flatbuffer (float32, or dynamic-range int8) with the named serving signature.

    Goes through a SavedModel with an explicit signature so the output names
    (`probabilities`, `class_maps`) survive conversion.
    """
    import keras
    import tensorflow as tf

    # Keras' ExportArchive tracks the Keras 3 variables properly (a bare tf.Module
    # around the same function converts to a model that outputs NaN).
    serve, signature = serving_function(model, image_size)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=signature)
    with tempfile.TemporaryDirectory(prefix="hemaflow-savedmodel-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
        # float32 must match Keras within 1e-4; Optimize.DEFAULT alone is dynamic-range int8
        converter.optimizations = [] if quantization == QUANTIZATION_NONE else [tf.lite.Optimize.DEFAULT]
        return converter.convert()


def quantization_agreement(model: Any, runner: TFLiteRunner, images: np.ndarray, labels: list[str],
                           positive_label: str | None, threshold: float | None,
                           keras_probabilities: np.ndarray | None = None) -> dict[str, float]:
    """How closely a converted model follows Keras on `images`: the largest probability and
    (relative) pooled-feature differences, and the share of identical decisions at the threshold.

    `keras_probabilities`: `model`'s probabilities on `images` when the caller already has them
    (training's evaluation predicts the validation split); default: predicted here."""
    from training.evaluate import predict_labels
    from training.ood import pooled_features

    lp = runner.predict_proba(images.astype(np.float32))
    kp = (model.predict(images.astype(np.float32), batch_size=64, verbose=0)
          if keras_probabilities is None else keras_probabilities)
    lf, kf = pooled_features(runner, images), pooled_features(model, images)
    same = predict_labels(lp, labels, positive_label, threshold) == predict_labels(kp, labels, positive_label, threshold)
    scale = np.maximum(1.0, np.abs(kf).max(axis=1))
    return {"images": int(len(lp)), "max_abs_prob_diff": float(np.max(np.abs(lp - kp))),
            "max_feature_diff": float(np.max(np.abs(lf - kf).max(axis=1) / scale)),
            "decision_agreement": float(np.mean(same))}


def quantization_refusal(agreement: dict[str, float]) -> str | None:
    """Why a quantized model may not be shipped, or None when it may."""
    if not agreement["max_abs_prob_diff"] <= QUANTIZED_MAX_PROB_DIFF:  # also catches NaN
        return f"probabilities differ from Keras by {agreement['max_abs_prob_diff']:.3f} (> {QUANTIZED_MAX_PROB_DIFF})"
    if not agreement["max_feature_diff"] <= QUANTIZED_MAX_FEATURE_DIFF:
        return f"pooled features differ from Keras by {agreement['max_feature_diff']:.3f} (> {QUANTIZED_MAX_FEATURE_DIFF})"
    if not agreement["decision_agreement"] >= QUANTIZED_MIN_DECISION_AGREEMENT:
        return (f"{agreement['decision_agreement']:.2%} of decisions agree with Keras "
                f"(< {QUANTIZED_MIN_DECISION_AGREEMENT:.1%})")
    return None


def shipped_model(model: Any, image_size: int, quantization: str, agreement_images: np.ndarray,
                  labels: list[str], positive_label: str | None, threshold: float | None,
                  keras_probabilities: np.ndarray | None = None) -> tuple[bytes, dict]:
    """(model.tflite bytes, bundle.json `quantization`): the quantized model when it agrees with
    Keras on `agreement_images` (validation), else float32 with the reason recorded.
    `keras_probabilities`: see `quantization_agreement`."""
    if quantization == QUANTIZATION_NONE:
        return convert_to_tflite(model, image_size), {"method": QUANTIZATION_NONE}
    quantized = convert_to_tflite(model, image_size, quantization)
    agreement = quantization_agreement(model, TFLiteRunner(quantized), agreement_images, labels,
                                       positive_label, threshold, keras_probabilities)
    refusal = quantization_refusal(agreement)
    if refusal is None:
        return quantized, {"method": quantization, "validation": agreement}
    return convert_to_tflite(model, image_size), {"method": QUANTIZATION_NONE, "requested": quantization,
                                                  "fallback_reason": refusal, "validation": agreement}


def write_sums(folder: Path) -> None:
    """SHA256SUMS for every file of the folder (but itself and its signature)."""
    (folder / SUMS_FILE).write_text(sums_text(read_local_bundle(folder)), encoding="utf-8")


def sign_bundle(folder: Path | str, signing_key: str) -> str:
    """Sign the folder's SHA256SUMS with a base64 Ed25519 private key; returns the key id.

    Serving refuses any bundle whose signature does not verify under a key it pins, so a run
    forged in MLflow (checksums and all) is never served."""
    from contracts.signing import key_id, load_private_key, sign_sums

    folder = Path(folder)
    (folder / SIGNATURE_FILE).write_bytes(sign_sums((folder / SUMS_FILE).read_bytes(), signing_key))
    return key_id(load_private_key(signing_key).public_key())


def sign_registered_bundle(settings: Any, model_name: str, version: str | None = None) -> dict[str, str]:
    """Sign (or re-sign) the serving bundle of a registered model version (default: @champion) with
    BUNDLE_SIGNING_KEY, after checking it as serving would (checksums, its own run id, canaries).

    For key rotation without retraining (re-sign the champion with the new key, then drop the old
    one) and for bundles trained before signing existed. Needs MLflow's writer identity."""
    from mlflow import MlflowClient

    key = signing_key_of(settings)
    client = MlflowClient(settings.mlflow_tracking_uri)
    mv = (client.get_model_version(model_name, version) if version
          else client.get_model_version_by_alias(model_name, "champion"))
    with tempfile.TemporaryDirectory(prefix="hemaflow-sign-") as tmp:
        local = Path(client.download_artifacts(mv.run_id, BUNDLE_DIR, tmp))
        bundle = read_bundle(local)
        if bundle.meta.get("run_id") != mv.run_id or bundle.meta.get("model_name") != model_name:
            raise BundleError("bad_metadata", f"{model_name} version {mv.version}: bundle.json names run "
                              f"{bundle.meta.get('run_id')!r} and model {bundle.meta.get('model_name')!r}; "
                              "refusing to sign it")
        check_canaries(bundle)
        kid = sign_bundle(local, key)
        client.log_artifact(mv.run_id, str(local / SIGNATURE_FILE), BUNDLE_DIR)
    return {"model": model_name, "version": str(mv.version), "run_id": mv.run_id, "key_id": kid}


def signing_key_of(settings: Any) -> str:
    """BUNDLE_SIGNING_KEY, checked before hours of training are spent on a bundle serving would refuse."""
    from contracts.signing import load_private_key

    key = settings.bundle_signing_key.get_secret_value()
    if not key:
        raise BundleError("no_signing_key", "BUNDLE_SIGNING_KEY is not set: serving refuses unsigned bundles. "
                          "`make demo` or `python -m pipeline secrets init` generates a key pair under HEMAFLOW_HOME")
    try:
        load_private_key(key)
    except ValueError as exc:
        raise BundleError("bad_signing_key", f"BUNDLE_SIGNING_KEY is unusable: {exc}") from None
    return key


def _check_features(model: Any, runner: TFLiteRunner, canary_images: np.ndarray) -> None:
    """The TFLite `features` output must be the Keras pooled features the detector was fitted on."""
    from training.model import pooled_feature_model

    lite = runner(canary_images.astype(np.float32))[OUTPUT_FEATURES]
    keras_feats = np.asarray(pooled_feature_model(model)(canary_images.astype(np.float32), training=False))
    diff = float(np.max(np.abs(lite - keras_feats)) / max(1.0, float(np.max(np.abs(keras_feats)))))
    if not diff <= CANARY_TOLERANCE:
        raise BundleError("canary_mismatch", f"TFLite and Keras pooled features differ by {diff:.2e} (relative)")


def export_bundle(
    model: Any,
    out_dir: Path | str,
    *,
    dataset: str,
    dataset_version: str,
    labels: list[str],
    classes: dict[str, str],
    image_size: int,
    canary_images: np.ndarray,
    canary_labels: list[str],
    positive_label: str | None = None,
    threshold: float | None = None,
    metrics: dict[str, Any] | None = None,
    run_id: str = "",
    model_name: str = "",
    git_commit: str = "",
    extra: dict[str, Any] | None = None,
    signing_key: str | None = None,
    extra_files: dict[str, bytes] | None = None,
    crop: str = "center_crop",
    calibration: dict[str, Any] | None = None,
    ood: tuple[Any, dict[str, Any]] | None = None,
    served_model: tuple[bytes, dict[str, Any]] | None = None,
) -> Bundle:
    """Convert `model` to TFLite and write a complete, verified bundle into `out_dir`.

    The bundle is assembled in a sibling temp folder and renamed into place, so a reader
    never sees half a bundle. Raises BundleError if TFLite and Keras disagree on the canaries.
    With `signing_key` (base64 Ed25519 private key) SHA256SUMS is signed (SHA256SUMS.sig).
    `extra_files` ({name: bytes}, e.g. DATA_PROFILE_FILE, MODEL_CARD_FILE) are listed in SHA256SUMS too.
    `calibration` (training.calibration.calibrate) is recorded as `calibration`; its temperature
    is already applied inside model.tflite, so serving's probabilities are the calibrated ones.
    `ood` = (contracts.ood.OodDetector, its validation figures) adds ood.npz and bundle.json `ood`.
    `served_model` is `shipped_model`'s (model.tflite bytes, bundle.json `quantization`); default:
    the float32 conversion.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    canary_images = np.asarray(canary_images, dtype=np.uint8)
    if canary_images.ndim != 4 or canary_images.shape[1:] != (image_size, image_size, 3):
        raise BundleError("bad_canaries",
                          f"canary images must be [N,{image_size},{image_size},3] uint8, got {canary_images.shape}")
    task = "binary" if len(labels) == 2 else "multiclass"
    if task == "binary" and (positive_label not in labels or threshold is None):
        raise BundleError("bad_metadata", "a binary bundle needs positive_label (one of labels) and a threshold")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tflite, quantized = served_model or shipped_model(model, image_size, QUANTIZATION_NONE, canary_images,
                                                          labels, positive_label, threshold)
        (staging / MODEL_FILE).write_bytes(tflite)
        runner = TFLiteRunner(staging / MODEL_FILE)
        lite = runner(canary_images.astype(np.float32))[OUTPUT_PROBABILITIES]
        keras_probs = np.asarray(model.predict(canary_images.astype(np.float32), verbose=0), dtype=np.float32)
        diff = float(np.max(np.abs(lite - keras_probs)))
        if quantized["method"] == QUANTIZATION_NONE:  # a quantized model passed shipped_model's bounds
            if not diff <= CANARY_TOLERANCE:  # also catches NaN
                raise BundleError("canary_mismatch",
                                  f"TFLite and Keras disagree on the canaries by {diff:.2e} (> {CANARY_TOLERANCE:.0e})")
            _check_features(model, runner, canary_images)
        (staging / CANARY_DIR).mkdir()
        canaries = []
        for i, (image, label) in enumerate(zip(canary_images, canary_labels, strict=True)):
            rel = f"{CANARY_DIR}/{i}.png"
            Image.fromarray(image, mode="RGB").save(staging / rel, format="PNG")
            canaries.append({"file": rel, "label": label, "probabilities": [float(p) for p in lite[i]]})
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "dataset_version": dataset_version,
            "run_id": run_id,
            "model_name": model_name,
            "labels": list(labels),
            "classes": dict(classes),
            "task": task,
            "positive_label": positive_label if task == "binary" else None,
            "threshold": float(threshold) if threshold is not None else None,
            "image_size": int(image_size),
            "preprocessing": preprocessing_record(crop),
            "calibration": calibration or {"method": "none", "temperature": 1.0},
            "metrics": metrics or {},
            "canaries": canaries,
            "keras_tflite_max_abs_diff": diff,
            "quantization": quantized,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit,
            **(extra or {}),
        }
        if ood is not None:
            from contracts.ood import OOD_FILE

            detector, figures = ood
            (staging / OOD_FILE).write_bytes(detector.to_npz())
            meta["ood"] = detector.describe(figures)
        (staging / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            if "/" in name or (staging / name).exists():
                raise BundleError("bad_metadata", f"extra bundle file {name!r} is nested or already written")
            (staging / name).write_bytes(data)
        write_sums(staging)
        if signing_key:
            sign_bundle(staging, signing_key)
        bundle = read_bundle(staging)
        check_canaries(bundle)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_bundle(out_dir)
