"""Load, verify and run a serving bundle (the training -> serving contract).

A bundle is held entirely in memory (`{relative path: bytes}`): it is small, the
container's filesystem can stay read-only, and the bytes that were checksummed are
exactly the bytes the interpreter runs. Nothing is swapped in before `load_bundle`
has verified the Ed25519 signature of SHA256SUMS against the pinned public keys
(`serving.signing`), every file against SHA256SUMS, and re-predicted every canary within
`CANARY_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The serving-bundle format. Training writes it (training/bundle.py) and imports these names,
# so the format is defined once, here, where the TF-free container can read it.
FORMAT_VERSION = 1
BUNDLE_DIR = "serving_bundle"  # run artifact folder
CANARY_TOLERANCE = 1e-4
SUMS_FILE = "SHA256SUMS"
SIGNATURE_FILE = "SHA256SUMS.sig"  # signs SHA256SUMS, so it is the one file SHA256SUMS does not list
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_MAPS = "class_maps"
MAX_BUNDLE_BYTES = 512 * 1024 * 1024


class BundleError(RuntimeError):
    """A bundle that must not be served; `reason` is a short code for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced an answer (shown in every response and on the page)."""

    name: str
    version: str
    dataset_version: str
    run_id: str
    source: str  # "registry" or "local"
    promoted_at: str | None = None
    signed_by: str | None = None  # id of the trusted public key that verified the bundle


@dataclass
class LoadedModel:
    """Interpreters plus the bundle metadata; `predict` is thread-safe (each call borrows its own
    interpreter from a `serving.runners.RunnerPool`, so `interpreters` calls run in parallel)."""

    identity: ModelIdentity
    meta: dict[str, Any]
    labels: list[str]
    image_size: int
    task: str
    positive_label: str | None
    threshold: float | None
    _runner: Any = field(repr=False)  # a serving.runners.RunnerPool
    _input_name: str = field(repr=False)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8/float (N,S,S,3) raw 0..255 -> (probabilities (N,C), class_maps (N,h,w,C))."""
        batch = np.ascontiguousarray(images, dtype=np.float32)
        out = self._runner(**{self._input_name: batch})
        return np.array(out[OUTPUT_PROBABILITIES]), np.array(out[OUTPUT_CLASS_MAPS])

    def decide(self, probs: np.ndarray) -> tuple[str, float]:
        """The predicted label and its probability (binary tasks use the bundle's threshold)."""
        if self.task == "binary" and self.positive_label in self.labels and self.threshold is not None:
            pos = self.labels.index(self.positive_label)
            neg = 1 - pos
            idx = pos if float(probs[pos]) >= self.threshold else neg
        else:
            idx = int(np.argmax(probs))
        return self.labels[idx], float(probs[idx])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_local_bundle(path: Path) -> dict[str, bytes]:
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
    from serving.signing import SignatureRejected, verify_sums

    if SUMS_FILE not in files:
        raise BundleError("bad_checksums", "bundle has no SHA256SUMS")
    try:
        return verify_sums(files[SUMS_FILE], files.get(SIGNATURE_FILE), trusted_keys)
    except SignatureRejected as exc:
        raise BundleError(exc.reason, exc.detail) from None


def verify_checksums(files: dict[str, bytes]) -> None:
    if SUMS_FILE not in files:
        raise BundleError("bad_checksums", "bundle has no SHA256SUMS")
    sums = parse_sums(files[SUMS_FILE].decode("utf-8", errors="replace"))
    for rel, digest in sums.items():
        if rel not in files:
            raise BundleError("bad_checksums", f"{rel} is listed in SHA256SUMS but missing")
        if sha256(files[rel]) != digest:
            raise BundleError("checksum_mismatch", f"{rel} does not match its SHA256SUMS entry")
    for required in (MODEL_FILE, BUNDLE_JSON):
        if required not in sums:
            raise BundleError("bad_checksums", f"{required} is not covered by SHA256SUMS")


def _read_meta(files: dict[str, bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(files[BUNDLE_JSON])
    except (KeyError, ValueError) as exc:
        raise BundleError("bad_metadata", f"bundle.json missing or not JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError("bad_metadata", f"unsupported format_version {meta.get('format_version')!r}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise BundleError("bad_metadata", "bundle.json needs a list of at least two labels")
    size = meta.get("image_size")
    if not isinstance(size, int) or not 8 <= size <= 2048:
        raise BundleError("bad_metadata", f"bad image_size {size!r}")
    if meta.get("task") not in ("binary", "multiclass"):
        raise BundleError("bad_metadata", f"bad task {meta.get('task')!r}")
    return meta


# bundle.json field -> refusal reason when it differs from what the registry promised.
MISMATCH_REASONS = {"run_id": "run_mismatch", "model_name": "model_mismatch"}


def _check_expected(meta: dict[str, Any], expect: dict[str, str]) -> None:
    """The signed bundle.json must name the run and model the registry resolved: a genuinely signed
    bundle copied into another run or model (replayed) is refused. An empty field never matches."""
    for key, wanted in expect.items():
        got = str(meta.get(key) or "")
        if got != wanted:
            raise BundleError(MISMATCH_REASONS.get(key, "bad_metadata"),
                              f"bundle.json says {key} {got or '(empty)'!r}, the registry says {wanted!r}")


def _interpreter(model_bytes: bytes, num_threads: int | None):
    # Imported here: `import serving` must stay light (the runtime pulls in numpy + C++).
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_content=model_bytes, num_threads=num_threads)
        runner = interp.get_signature_runner(SIGNATURE)
    except (ValueError, RuntimeError) as exc:
        raise BundleError("bad_model", f"model.tflite cannot be loaded: {exc}") from None
    outputs = set(runner.get_output_details())
    if not {OUTPUT_PROBABILITIES, OUTPUT_CLASS_MAPS} <= outputs:
        raise BundleError("bad_model", f"signature outputs are {sorted(outputs)}, need probabilities + class_maps")
    inputs = list(runner.get_input_details())
    if len(inputs) != 1:
        raise BundleError("bad_model", f"signature must have one input, has {inputs}")
    return interp, runner, inputs[0]


def _check_canaries(model: LoadedModel, files: dict[str, bytes]) -> None:
    from PIL import Image

    canaries = model.meta.get("canaries") or []
    if not canaries:
        raise BundleError("no_canaries", "bundle.json lists no canary images")
    for canary in canaries:
        rel = canary.get("file", "")
        if rel not in files:
            raise BundleError("canary_missing", f"canary {rel!r} is not in the bundle")
        with Image.open(io.BytesIO(files[rel])) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if arr.shape != (model.image_size, model.image_size, 3):
            raise BundleError("canary_mismatch", f"canary {rel} has shape {arr.shape}")
        probs, cmaps = model.predict(arr[None])
        expected = np.asarray(canary.get("probabilities", []), dtype=np.float64)
        if expected.shape != (len(model.labels),):
            raise BundleError("canary_mismatch", f"canary {rel} expects {expected.shape[0]} probabilities")
        diff = float(np.max(np.abs(probs[0].astype(np.float64) - expected)))
        if not diff <= CANARY_TOLERANCE:
            raise BundleError("canary_mismatch", f"canary {rel}: max abs diff {diff:.2e} > {CANARY_TOLERANCE}")
        if cmaps.ndim != 4 or cmaps.shape[-1] != len(model.labels):
            raise BundleError("bad_model", f"class_maps shape {cmaps.shape} does not match the labels")


def load_bundle(
    files: dict[str, bytes],
    *,
    trusted_keys: dict[str, Any],
    version: str | None = None,
    source: str = "local",
    promoted_at: str | None = None,
    num_threads: int | None = None,
    expect: dict[str, str] | None = None,
    interpreters: int = 1,
    solo_threads: int = 0,
) -> LoadedModel:
    """Verify signature and checksums, build the interpreter, run the canaries; raises BundleError.

    `trusted_keys` is `serving.signing.parse_public_keys(settings.bundle_trusted_public_keys)`;
    `expect` ({"run_id": ..., "model_name": ...}) is what the registry says the bundle must be.
    `interpreters` (each with `num_threads`) can run at once, one per inference thread; with
    `solo_threads`, one more interpreter with that many threads serves a request that runs alone.
    """
    from serving.runners import RunnerPool

    signed_by = verify_signature(files, trusted_keys)
    verify_checksums(files)
    meta = _read_meta(files)
    _check_expected(meta, expect or {})
    _, runner, input_name = _interpreter(files[MODEL_FILE], num_threads)
    runners = [runner] + [_interpreter(files[MODEL_FILE], num_threads)[1] for _ in range(interpreters - 1)]
    identity = ModelIdentity(
        name=str(meta.get("model_name") or "model"),
        version=version or f"local-{sha256(files[SUMS_FILE])[:12]}",
        dataset_version=str(meta.get("dataset_version", "")),
        run_id=str(meta.get("run_id", "")),
        source=source,
        promoted_at=promoted_at,
        signed_by=signed_by,
    )
    threshold = meta.get("threshold")
    model = LoadedModel(
        identity=identity,
        meta=meta,
        labels=list(meta["labels"]),
        image_size=int(meta["image_size"]),
        task=str(meta["task"]),
        positive_label=meta.get("positive_label"),
        threshold=float(threshold) if threshold is not None else None,
        _runner=RunnerPool(runners, _interpreter(files[MODEL_FILE], solo_threads)[1] if solo_threads else None),
        _input_name=input_name,
    )
    try:
        _check_canaries(model, files)
    except BundleError:
        raise
    except Exception as exc:  # the interpreter rejects a shape, a PNG is corrupt, ...
        raise BundleError("canary_error", f"{type(exc).__name__}: {exc}") from None
    return model
