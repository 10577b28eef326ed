"""The serving bundle: what training hands to serving (format in .notes/CONTRACT.md).

    model.tflite   signature "serving_default": image [N,S,S,3] float 0..255 ->
                   {probabilities [N,C], class_maps [N,h,w,C]}
    bundle.json    labels, threshold, preprocessing (+ crop policy), calibration, metrics, canaries,
                   provenance
    canary/*.png   lossless preprocessed canary inputs with their expected outputs
    SHA256SUMS     "<sha256>  <relative path>" for every other file
    SHA256SUMS.sig Ed25519 signature of SHA256SUMS (serving.signing) by BUNDLE_SIGNING_KEY

`export_bundle` builds it from a trained Keras model and refuses to write a bundle whose
TFLite outputs differ from Keras (max abs diff > CANARY_TOLERANCE); `read_bundle` and
`check_canaries` are the reader side (used by the tests and by the promotion gate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import (
    BUNDLE_JSON,
    CANARY_TOLERANCE,
    FORMAT_VERSION,
    MODEL_FILE,
    OUTPUT_CLASS_MAPS,
    OUTPUT_PROBABILITIES,
    SIGNATURE,
    SIGNATURE_FILE,
    SUMS_FILE,
)
from training.model import INPUT_NAME, serving_function

CANARY_DIR = "canary"
PREPROCESSING = {"policy": "resize_shorter_center_crop", "resample": "bilinear"}


def preprocessing_record(crop: str = "center_crop") -> dict[str, str]:
    """bundle.json `preprocessing`: the policy name plus `crop`, the argument serving passes to
    `pipeline.imaging.prepare_image` (absent in older bundles, which mean center_crop)."""
    from pipeline.preprocess import CROP_POLICY_NAMES

    return {**PREPROCESSING, "policy": CROP_POLICY_NAMES[crop], "crop": crop}


class BundleError(RuntimeError):
    """A bundle is incomplete, tampered with, or does not reproduce its canaries."""


def convert_to_tflite(model: Any, image_size: int) -> bytes:
    """Keras model -> float32 TFLite flatbuffer with the named serving signature.

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
        converter.optimizations = []  # float32: canaries must match Keras within 1e-4
        return converter.convert()


class TFLiteRunner:
    """Runs a bundle's model with ai-edge-litert, reading outputs by name."""

    def __init__(self, model_path: Path | str, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise BundleError(f"{model_path}: no '{SIGNATURE}' signature (found {sorted(signatures)})")
        outputs = set(signatures[SIGNATURE]["outputs"])
        missing = {OUTPUT_PROBABILITIES, OUTPUT_CLASS_MAPS} - outputs
        if missing:
            raise BundleError(f"{model_path}: signature lacks outputs {sorted(missing)}")
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        out = self.runner(**{INPUT_NAME: batch})
        return {OUTPUT_PROBABILITIES: np.array(out[OUTPUT_PROBABILITIES]), OUTPUT_CLASS_MAPS: np.array(out[OUTPUT_CLASS_MAPS])}

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        parts = [self(images[i : i + batch_size])[OUTPUT_PROBABILITIES] for i in range(0, len(images), batch_size)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


UNLISTED = (SUMS_FILE, SIGNATURE_FILE)  # the checksum list and its signature are not in the list


def _write_sums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in UNLISTED)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / SUMS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def verify_checksums(folder: Path) -> None:
    """Every file listed in SHA256SUMS exists with its hash, and no file is unlisted."""
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise BundleError(f"{folder}: {SUMS_FILE} is missing")
    listed: dict[str, str] = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, _, rel = line.partition("  ")
            listed[rel] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(UNLISTED)
    if present != set(listed):
        raise BundleError(f"{folder}: files differ from {SUMS_FILE}: {sorted(present ^ set(listed))}")
    for rel, digest in listed.items():
        if sha256_file(folder / rel) != digest:
            raise BundleError(f"{folder}: sha256 mismatch for {rel}")


def sign_bundle(folder: Path | str, signing_key: str) -> str:
    """Sign the folder's SHA256SUMS with a base64 Ed25519 private key; returns the key id.

    Serving refuses any bundle whose signature does not verify under a key it pins, so a run
    forged in MLflow (checksums and all) is never served."""
    from serving.signing import key_id, load_private_key, sign_sums

    folder = Path(folder)
    (folder / SIGNATURE_FILE).write_bytes(sign_sums((folder / SUMS_FILE).read_bytes(), signing_key))
    return key_id(load_private_key(signing_key).public_key())


def sign_registered_bundle(settings: Any, model_name: str, version: str | None = None) -> dict[str, str]:
    """Sign (or re-sign) the serving bundle of a registered model version (default: @champion) with
    BUNDLE_SIGNING_KEY, after checking it as serving would (checksums, its own run id, canaries).

    For key rotation without retraining (re-sign the champion with the new key, then drop the old
    one) and for bundles trained before signing existed. Needs MLflow's writer identity."""
    from mlflow import MlflowClient

    from serving.bundle import BUNDLE_DIR

    key = signing_key_of(settings)
    client = MlflowClient(settings.mlflow_tracking_uri)
    mv = (client.get_model_version(model_name, version) if version
          else client.get_model_version_by_alias(model_name, "champion"))
    with tempfile.TemporaryDirectory(prefix="hemaflow-sign-") as tmp:
        local = Path(client.download_artifacts(mv.run_id, BUNDLE_DIR, tmp))
        bundle = read_bundle(local)
        if bundle.meta.get("run_id") != mv.run_id or bundle.meta.get("model_name") != model_name:
            raise BundleError(f"{model_name} version {mv.version}: bundle.json names run {bundle.meta.get('run_id')!r} "
                              f"and model {bundle.meta.get('model_name')!r}; refusing to sign it")
        check_canaries(bundle)
        kid = sign_bundle(local, key)
        client.log_artifact(mv.run_id, str(local / SIGNATURE_FILE), BUNDLE_DIR)
    return {"model": model_name, "version": str(mv.version), "run_id": mv.run_id, "key_id": kid}


def signing_key_of(settings: Any) -> str:
    """BUNDLE_SIGNING_KEY, checked before hours of training are spent on a bundle serving would refuse."""
    from serving.signing import load_private_key

    key = settings.bundle_signing_key.get_secret_value()
    if not key:
        raise BundleError("BUNDLE_SIGNING_KEY is not set: serving refuses unsigned bundles. `make demo` or "
                          "`python -m pipeline secrets init` generates a key pair under HEMAFLOW_HOME")
    try:
        load_private_key(key)
    except ValueError as exc:
        raise BundleError(f"BUNDLE_SIGNING_KEY is unusable: {exc}") from None
    return key


@dataclass(frozen=True)
class Bundle:
    folder: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def runner(self) -> TFLiteRunner:
        return TFLiteRunner(self.model_path)


def read_bundle(folder: Path | str, verify: bool = True) -> Bundle:
    folder = Path(folder)
    if verify:
        verify_checksums(folder)
    try:
        meta = json.loads((folder / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder}: cannot read {BUNDLE_JSON}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{folder}: unsupported bundle format_version {meta.get('format_version')!r}")
    return Bundle(folder, meta)


def load_canary(folder: Path, rel: str) -> np.ndarray:
    from PIL import Image

    with Image.open(folder / rel) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def check_canaries(bundle: Bundle, tolerance: float = CANARY_TOLERANCE) -> float:
    """Run the canaries; returns the max abs diff, raises BundleError beyond `tolerance`."""
    runner = bundle.runner()
    worst = 0.0
    for canary in bundle.meta["canaries"]:
        image = load_canary(bundle.folder, canary["file"]).astype(np.float32)
        got = runner(image)[OUTPUT_PROBABILITIES][0]
        diff = float(np.max(np.abs(got - np.asarray(canary["probabilities"], np.float32))))
        worst = diff if np.isnan(diff) else max(worst, diff)
    if not worst <= tolerance:  # also catches NaN
        raise BundleError(f"{bundle.folder}: canary outputs differ by {worst:.2e} (> {tolerance:.0e})")
    return worst


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
    crop: str = "center_crop",
    calibration: dict[str, Any] | None = None,
) -> Bundle:
    """Convert `model` to TFLite and write a complete, verified bundle into `out_dir`.

    The bundle is assembled in a sibling temp folder and renamed into place, so a reader
    never sees half a bundle. Raises BundleError if TFLite and Keras disagree on the canaries.
    With `signing_key` (base64 Ed25519 private key) SHA256SUMS is signed (SHA256SUMS.sig).
    `calibration` (training.calibration.calibrate) is recorded as `calibration`; its temperature
    is already applied inside model.tflite, so serving's probabilities are the calibrated ones.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    canary_images = np.asarray(canary_images, dtype=np.uint8)
    if canary_images.ndim != 4 or canary_images.shape[1:] != (image_size, image_size, 3):
        raise BundleError(f"canary images must be [N,{image_size},{image_size},3] uint8, got {canary_images.shape}")
    task = "binary" if len(labels) == 2 else "multiclass"
    if task == "binary" and (positive_label not in labels or threshold is None):
        raise BundleError("a binary bundle needs positive_label (one of labels) and a threshold")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / MODEL_FILE).write_bytes(convert_to_tflite(model, image_size))
        runner = TFLiteRunner(staging / MODEL_FILE)
        lite = runner(canary_images.astype(np.float32))[OUTPUT_PROBABILITIES]
        keras_probs = np.asarray(model.predict(canary_images.astype(np.float32), verbose=0), dtype=np.float32)
        diff = float(np.max(np.abs(lite - keras_probs)))
        if not diff <= CANARY_TOLERANCE:  # also catches NaN
            raise BundleError(f"TFLite and Keras disagree on the canaries by {diff:.2e} (> {CANARY_TOLERANCE:.0e})")
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
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit,
            **(extra or {}),
        }
        (staging / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        _write_sums(staging)
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
