"""Load a serving bundle into a model serving can swap in (format: contracts/bundle.py).

Nothing is swapped in before `load_bundle` has verified the Ed25519 signature of SHA256SUMS
against the pinned public keys, every file against SHA256SUMS, that bundle.json names the run
and model the registry resolved, and re-predicted every canary within the bundle's tolerance
(`contracts.bundle.canary_tolerance`: 1e-4 for float32, 1e-3 for a quantized model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.bundle import (
    MODEL_CARD_FILE,
    MODEL_FILE,
    OUTPUT_CLASS_MAPS,
    OUTPUT_FEATURES,
    OUTPUT_PROBABILITIES,
    SUMS_FILE,
    Bundle,
    BundleError,
    TFLiteRunner,
    check_canaries,
    read_meta,
    verify_checksums,
    verify_signature,
)
from contracts.common import sha256_hex
from contracts.ood import OodDetector, bundle_detector
from contracts.tta import decision_threshold, on_by_default, uses_tta


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
    threshold: float | None  # for the probabilities it answers with: the TTA one when `tta` (contracts.tta)
    _runner: Any = field(repr=False)  # a serving.runners.RunnerPool of contracts.bundle.TFLiteRunner
    card_html: bytes | None = field(default=None, repr=False)  # the bundle's signed model card, if any
    detector: OodDetector | None = field(default=None, repr=False)
    tta: bool = False  # answers average the 8 views' probabilities (INFERENCE_TTA)

    @property
    def scope_note(self) -> str | None:
        """Why this model cannot say whether an image is in scope (None when it can)."""
        if self.detector is None:
            return "no detector: this bundle has no out-of-scope detector (trained before it existed)"
        return None

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8/float (N,S,S,3) raw 0..255 -> (probabilities (N,C), class_maps (N,h,w,C))."""
        out = self._runner(images)
        return out[OUTPUT_PROBABILITIES], out[OUTPUT_CLASS_MAPS]

    def predict_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Like `predict`, plus the pooled features (N,K) (None for bundles without them)."""
        out = self._runner(images)
        return out[OUTPUT_PROBABILITIES], out[OUTPUT_CLASS_MAPS], out.get(OUTPUT_FEATURES)

    def decide(self, probs: np.ndarray) -> tuple[str, float]:
        """The predicted label and its probability (binary tasks use the bundle's threshold)."""
        if self.task == "binary" and self.positive_label in self.labels and self.threshold is not None:
            pos = self.labels.index(self.positive_label)
            neg = 1 - pos
            idx = pos if float(probs[pos]) >= self.threshold else neg
        else:
            idx = int(np.argmax(probs))
        return self.labels[idx], float(probs[idx])


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
    tta: bool | None = False,
) -> LoadedModel:
    """Verify signature and checksums, build the interpreter, run the canaries; raises BundleError.

    `trusted_keys` is `contracts.signing.parse_public_keys(settings.bundle_trusted_public_keys)`;
    `expect` ({"run_id": ..., "model_name": ...}) is what the registry says the bundle must be.
    `interpreters` (each with `num_threads`) can run at once, one per inference thread; with
    `solo_threads`, one more interpreter with that many threads serves a request that runs alone.
    With `tta` the model answers with view-averaged probabilities (serving.tta), so its threshold
    is the bundle's TTA threshold (`contracts.tta.decision_threshold`); None (INFERENCE_TTA unset):
    the bundle's own default (`contracts.tta.uses_tta`).
    """
    from serving.runners import RunnerPool

    signed_by = verify_signature(files, trusted_keys)
    verify_checksums(files)
    meta = read_meta(files)
    _check_expected(meta, expect or {})
    runners = [TFLiteRunner(files[MODEL_FILE], num_threads) for _ in range(max(1, interpreters))]
    solo = TFLiteRunner(files[MODEL_FILE], solo_threads) if solo_threads else None
    identity = ModelIdentity(
        name=str(meta.get("model_name") or "model"),
        version=version or f"local-{sha256_hex(files[SUMS_FILE])[:12]}",
        dataset_version=str(meta.get("dataset_version", "")),
        run_id=str(meta.get("run_id", "")),
        source=source,
        promoted_at=promoted_at,
        signed_by=signed_by,
    )
    tta = uses_tta(tta, on_by_default(meta))
    threshold = decision_threshold(meta, tta)
    model = LoadedModel(
        identity=identity,
        meta=meta,
        labels=list(meta["labels"]),
        image_size=int(meta["image_size"]),
        task=str(meta["task"]),
        positive_label=meta.get("positive_label"),
        threshold=threshold,
        _runner=RunnerPool(runners, solo),
        card_html=files.get(MODEL_CARD_FILE),
        detector=bundle_detector(files, meta, runners[0]),
        tta=tta,
    )
    try:
        check_canaries(Bundle(files, meta), model.predict)
    except BundleError:
        raise
    except Exception as exc:  # the interpreter rejects a shape, a PNG is corrupt, ...
        raise BundleError("canary_error", f"{type(exc).__name__}: {exc}") from None
    return model
