"""The serving-bundle format: what training writes and serving loads, defined once.

    model.tflite   signature "serving_default": image [N,S,S,3] float 0..255 ->
                   {probabilities [N,C], class_maps [N,h,w,C], features [N,K] (since issue 10)}
    bundle.json    labels, threshold, preprocessing, metrics, canaries, provenance, ood,
                   quantization (how model.tflite's weights are stored; absent = float32)
    ood.npz        the out-of-scope detector's arrays (contracts/ood.py; optional)
    canary/*.png   lossless preprocessed canary inputs with their expected outputs
    SHA256SUMS     "<sha256>  <relative path>" for every other file
    SHA256SUMS.sig Ed25519 signature of SHA256SUMS (contracts.signing) by BUNDLE_SIGNING_KEY

This module is the reader side both packages share: one `BundleError`, the checksum and
signature checks, the bundle.json reader, one TFLite runner and one canary check. Writing
(`training/bundle.py`, needs TensorFlow) and hot-swapping (`serving/bundle.py`) live with
their packages. A bundle is handled as `{relative path: bytes}`: the bytes that were checksummed
are exactly the bytes the interpreter runs. numpy, Pillow and ai-edge-litert are imported inside
the functions that need them, so importing this module stays light.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from contracts.common import sha256_hex
from contracts.signing import SignatureRejected, verify_sums

FORMAT_VERSION = 1
BUNDLE_DIR = "serving_bundle"  # run artifact folder
CANARY_DIR = "canary"
CANARY_TOLERANCE = 1e-4
# bundle.json `quantization.method`, the values of Settings.model_quantization. dynamic_int8: int8
# weights, activations quantized per image at run time (XNNPACK's qd8 kernels, ~3.6x faster here).
QUANTIZATION_NONE = "none"
QUANTIZATION_DYNAMIC_INT8 = "dynamic_int8"
# A quantized model's canaries re-run on another CPU may take other int8 kernels (AVX2 vs AVX-512
# VNNI) that round an activation differently; 1e-3 still tells a wrong model or preprocessing apart.
CANARY_TOLERANCE_QUANTIZED = 1e-3
SUMS_FILE = "SHA256SUMS"
SIGNATURE_FILE = "SHA256SUMS.sig"  # signs SHA256SUMS, so it is the one file SHA256SUMS does not list
UNLISTED = (SUMS_FILE, SIGNATURE_FILE)
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.tflite"
DATA_PROFILE_FILE = "data_profile.json"  # training-data profile for drift (contracts.drift), optional
MODEL_CARD_FILE = "model_card.html"  # the model card as rendered at training (training.model_card), optional
# bundle.json {rule, target_sensitivity}: how training read a binary model's threshold off validation
# (training.evaluate.THRESHOLD_RULES); absent in multiclass bundles and in bundles from before it.
THRESHOLD_RULE_KEY = "threshold_rule"
SIGNATURE = "serving_default"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_MAPS = "class_maps"
OUTPUT_FEATURES = "features"  # pooled features; absent in bundles older than issue 10
MAX_BUNDLE_BYTES = 512 * 1024 * 1024


class BundleError(RuntimeError):
    """A bundle that must not be used; `reason` is a short code for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_local_bundle(path: Path | str) -> dict[str, bytes]:
    """Every file of a local bundle folder, as bytes (symlinks resolved, size bounded)."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError("missing", f"bundle folder {root} does not exist")
    files: dict[str, bytes] = {}
    total = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                raise BundleError("too_large", f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
            files[p.relative_to(root).as_posix()] = data
    return files


def sums_text(files: dict[str, bytes]) -> str:
    """The SHA256SUMS content for these files (every file but SHA256SUMS and its signature)."""
    return "".join(f"{sha256_hex(files[rel])}  {rel}\n" for rel in sorted(files) if rel not in UNLISTED)


def parse_sums(text: str) -> dict[str, str]:
    """`<sha256>  <relative path>` lines -> {path: digest}; rejects absolute or parent paths."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.strip().partition("  ")
        rel = rel.strip().lstrip("*")
        if len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise BundleError("bad_checksums", f"malformed SHA256SUMS line: {line[:120]!r}")
        sums[rel] = digest.lower()
    if not sums:
        raise BundleError("bad_checksums", "SHA256SUMS lists no files")
    return sums


def verify_signature(files: dict[str, bytes], trusted_keys: dict[str, Any]) -> str:
    """The id of the trusted key that signed SHA256SUMS; BundleError (unsigned, bad_signature,
    unknown_key) otherwise. Checked before anything else: an untrusted bundle is never parsed."""
    if SUMS_FILE not in files:
        raise BundleError("bad_checksums", "bundle has no SHA256SUMS")
    try:
        return verify_sums(files[SUMS_FILE], files.get(SIGNATURE_FILE), trusted_keys)
    except SignatureRejected as exc:
        raise BundleError(exc.reason, exc.detail) from None


def verify_checksums(files: dict[str, bytes], *, exact: bool = False) -> None:
    """Every file SHA256SUMS lists is present with its hash, and it covers the model and bundle.json.

    `exact` also refuses files SHA256SUMS does not list (training's own bundles). Serving keeps
    the lenient default: it only ever reads listed files."""
    if SUMS_FILE not in files:
        raise BundleError("bad_checksums", "bundle has no SHA256SUMS")
    sums = parse_sums(files[SUMS_FILE].decode("utf-8", errors="replace"))
    unlisted = set(files) - set(sums) - set(UNLISTED)
    if exact and unlisted:
        raise BundleError("bad_checksums", f"files differ from SHA256SUMS: unlisted {sorted(unlisted)}")
    for rel, digest in sums.items():
        if rel not in files:
            raise BundleError("bad_checksums", f"{rel} is listed in SHA256SUMS but missing")
        if sha256_hex(files[rel]) != digest:
            raise BundleError("checksum_mismatch", f"{rel}: sha256 mismatch with its SHA256SUMS entry")
    for required in (MODEL_FILE, BUNDLE_JSON):
        if required not in sums:
            raise BundleError("bad_checksums", f"{required} is not covered by SHA256SUMS")


def read_meta(files: dict[str, bytes]) -> dict[str, Any]:
    """bundle.json, checked for the fields every reader relies on."""
    try:
        meta = json.loads(files[BUNDLE_JSON])
    except (KeyError, ValueError) as exc:
        raise BundleError("bad_metadata", f"bundle.json missing or not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise BundleError("bad_metadata", f"unsupported format_version {version!r}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise BundleError("bad_metadata", "bundle.json needs a list of at least two labels")
    size = meta.get("image_size")
    if not isinstance(size, int) or not 8 <= size <= 2048:
        raise BundleError("bad_metadata", f"bad image_size {size!r}")
    if meta.get("task") not in ("binary", "multiclass"):
        raise BundleError("bad_metadata", f"bad task {meta.get('task')!r}")
    return meta


class TFLiteRunner:
    """Runs a bundle's model with ai-edge-litert through its named signature (one input, the two
    named outputs, plus `features` when the bundle has it). Not thread-safe: serving holds a lock
    around calls."""

    def __init__(self, model: bytes | Path | str, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter  # lazy: only a running bundle loads LiteRT

        model_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        try:
            self.interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads)
            self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        except (ValueError, RuntimeError) as exc:
            raise BundleError("bad_model", f"model.tflite cannot be loaded: {exc}") from None
        outputs = set(self.runner.get_output_details())
        if not {OUTPUT_PROBABILITIES, OUTPUT_CLASS_MAPS} <= outputs:
            raise BundleError("bad_model", f"signature outputs are {sorted(outputs)}, need probabilities + class_maps")
        inputs = list(self.runner.get_input_details())
        if len(inputs) != 1:
            raise BundleError("bad_model", f"signature must have one input, has {inputs}")
        self.input_name = inputs[0]
        self.has_features = OUTPUT_FEATURES in outputs

    def __call__(self, images) -> dict[str, Any]:
        """uint8/float (N,S,S,3) or (S,S,3) raw 0..255 -> {probabilities (N,C), class_maps (N,h,w,C)}
        and, when the model has it, features (N,K)."""
        import numpy as np

        batch = np.ascontiguousarray(images, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        out = self.runner(**{self.input_name: batch})
        names = (OUTPUT_PROBABILITIES, OUTPUT_CLASS_MAPS) + ((OUTPUT_FEATURES,) if self.has_features else ())
        return {name: np.array(out[name]) for name in names}

    def predict(self, images) -> tuple[Any, Any]:
        out = self(images)
        return out[OUTPUT_PROBABILITIES], out[OUTPUT_CLASS_MAPS]

    def predict_proba(self, images, batch_size: int = 32):
        parts = [self(images[i : i + batch_size])[OUTPUT_PROBABILITIES] for i in range(0, len(images), batch_size)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Bundle:
    """A bundle's files and its checked bundle.json (`folder` when it was read from disk)."""

    files: dict[str, bytes]
    meta: dict[str, Any]
    folder: Path | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def runner(self, num_threads: int | None = None) -> TFLiteRunner:
        return TFLiteRunner(self.files[MODEL_FILE], num_threads)


def read_bundle(folder: Path | str) -> Bundle:
    """A local bundle folder, its checksums verified exactly (no unlisted file) and bundle.json read."""
    files = read_local_bundle(folder)
    verify_checksums(files, exact=True)
    return Bundle(files, read_meta(files), Path(folder))


def quantization_of(meta: dict[str, Any]) -> str:
    """The bundle's quantization method (bundles from before quantization are float32)."""
    return (meta.get("quantization") or {}).get("method", QUANTIZATION_NONE)


def crop_policy(meta: dict[str, Any]) -> str:
    """The crop policy the model was trained with, the one every consumer must prepare images with
    (bundle.json preprocessing.crop; older bundles: center_crop)."""
    return str((meta.get("preprocessing") or {}).get("crop") or "center_crop")


def canary_tolerance(meta: dict[str, Any]) -> float:
    return CANARY_TOLERANCE if quantization_of(meta) == QUANTIZATION_NONE else CANARY_TOLERANCE_QUANTIZED


def check_canaries(bundle: Bundle, predict=None, tolerance: float | None = None) -> float:
    """Re-predict every canary; returns the max abs difference, raises BundleError beyond `tolerance`
    (default: `canary_tolerance` of the bundle).

    `predict(images) -> (probabilities, class_maps)` defaults to a fresh runner of the bundle's
    model (serving passes its loaded model's thread-safe predict)."""
    predict = predict or bundle.runner().predict
    tolerance = canary_tolerance(bundle.meta) if tolerance is None else tolerance
    labels, size = bundle.meta["labels"], bundle.meta["image_size"]
    canaries = bundle.meta.get("canaries") or []
    if not canaries:
        raise BundleError("no_canaries", "bundle.json lists no canary images")
    worst = 0.0
    for canary in canaries:
        rel = canary.get("file", "")
        if rel not in bundle.files:
            raise BundleError("canary_missing", f"canary {rel!r} is not in the bundle")
        with Image.open(io.BytesIO(bundle.files[rel])) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if arr.shape != (size, size, 3):
            raise BundleError("canary_mismatch", f"canary {rel} has shape {arr.shape}")
        probs, cmaps = predict(arr[None])
        expected = np.asarray(canary.get("probabilities", []), dtype=np.float64)
        if expected.shape != (len(labels),):
            raise BundleError("canary_mismatch", f"canary {rel} expects {expected.shape[0]} probabilities")
        diff = float(np.max(np.abs(np.asarray(probs[0], dtype=np.float64) - expected)))
        if not diff <= tolerance:  # also catches NaN
            raise BundleError("canary_mismatch", f"canary {rel}: outputs differ by {diff:.2e} (> {tolerance:.0e})")
        if cmaps.ndim != 4 or cmaps.shape[-1] != len(labels):
            raise BundleError("bad_model", f"class_maps shape {cmaps.shape} does not match the labels")
        worst = max(worst, diff)
    return worst
