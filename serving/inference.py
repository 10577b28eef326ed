"""The model-running half of a prediction request: image checks, bounded decoding, the
(micro-batched) interpreter call, and the response built from its outputs.

One `Inference` per app, built in the lifespan: it owns the micro-batcher's worker task and the
decode slots, which both belong to the server's event loop.
"""

from __future__ import annotations

import asyncio

import numpy as np

from contracts.imaging import ImageRejected, open_image, prepare_image, read_header
from contracts.ood import REASON_TEXT
from contracts.settings import Settings
from serving import gradcam, schemas, tta
from serving.batcher import MicroBatcher, Result
from serving.bundle import LoadedModel
from serving.clinical import context_for
from serving.errors import ApiError
from serving.manager import monotonic_ms
from serving.metrics import ServingMetrics
from serving.upload import UploadedFile

# At most this many images are decoded at once, so concurrent uploads cannot multiply the
# per-image peak (a 40 Mpx image is ~200 MB while it is decoded) without bound.
DECODE_SLOTS = 2
# ImageRejected reasons that mean "not an image we can read" (415); the rest are 422.
UNSUPPORTED_REASONS = {"not_an_image", "unsupported_format"}


def prepare(data: bytes, size: int, s: Settings) -> np.ndarray:
    """Check format and sides from the header (nothing is decoded for an image that will be
    refused), then decode and preprocess with the pipeline's own `prepare_image`."""
    head = read_header(data, s.max_image_pixels)
    fmt = head.format.upper()
    if fmt not in s.allowed_format_set:
        raise ImageRejected("unsupported_format", f"{fmt or 'this'} format is not accepted; use "
                            + ", ".join(sorted(s.allowed_format_set)))
    if min(head.width, head.height) < s.min_image_side or max(head.width, head.height) > s.max_image_side:
        raise ImageRejected("bad_dimensions", f"{head.width}x{head.height}: sides must be between "
                            f"{s.min_image_side} and {s.max_image_side} pixels")
    return prepare_image(open_image(data, s.max_image_pixels), size)


class Inference:
    """Decode slots, the micro-batcher and the metrics of predictions, shared by every request."""

    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.tta = settings.serving_tta
        self.refuse_out_of_scope = settings.serving_refuse_out_of_scope
        self.batcher = MicroBatcher(settings.serving_micro_batch, on_batch=lambda n: metrics.batch_size.observe(n))
        self.decode_slots = asyncio.Semaphore(DECODE_SLOTS)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def prepare(self, upload: UploadedFile, size: int, settings: Settings) -> np.ndarray:
        """The model input of one upload, decoded off the event loop; a refused image is an ApiError."""
        try:
            async with self.decode_slots:
                return await asyncio.to_thread(prepare, bytes(upload.data), size, settings)
        except ImageRejected as exc:
            status = 415 if exc.reason in UNSUPPORTED_REASONS else 422
            raise ApiError(status, exc.reason, exc.detail) from None

    async def predict(self, model: LoadedModel, images: np.ndarray) -> list[Result]:
        """(probabilities, class map, features) per image; averaged over flips/rotations with SERVING_TTA."""
        if not self.tta:
            return await self.batcher.predict(model, images)
        return tta.merge(await self.batcher.predict(model, tta.views(images)), len(images))

    def scope(self, model: LoadedModel, image: np.ndarray, feats: np.ndarray | None) -> schemas.Scope:
        """Whether the image looks like what the model was trained on (None: the bundle cannot tell)."""
        if model.detector is None or feats is None:
            return schemas.Scope(in_scope=None, detail=model.scope_note or "no detector: the model has no features")
        verdict = model.detector.check(feats[None], image[None])[0]
        if verdict.in_scope:
            return schemas.Scope(in_scope=True)
        return schemas.Scope(in_scope=False, reason=verdict.reason, detail=REASON_TEXT[verdict.reason],
                             refused=self.refuse_out_of_scope)

    def result(self, model: LoadedModel, upload: UploadedFile, image: np.ndarray, output: Result,
               explain: bool, start: float) -> schemas.Prediction:
        """The response for one image; with `explain`, its Grad-CAM overlay (CPU work: call it in a thread).
        An image the detector refuses gets in_scope=false, the reason and no label (still a 200)."""
        probs, cmap, feats = output
        scope = self.scope(model, image, feats)
        if scope.refused:
            self.metrics.refusals.labels(reason=scope.reason).inc()
            return schemas.Prediction(
                filename=upload.filename, in_scope=False, refusal_reason=scope.reason,
                scope_detail=f"{schemas.OUT_OF_SCOPE_MESSAGE}: {scope.detail}", model=schemas.model_ref(model),
                processing_ms=monotonic_ms(start))
        label, confidence = model.decide(probs)
        self.metrics.predictions.labels(version=model.identity.version, label=label).inc()
        explanation = None
        if explain:
            idx = model.labels.index(label)
            explanation = schemas.Explanation(
                label=label,
                image_size=model.image_size,
                overlay_png_base64=gradcam.png_base64(gradcam.overlay(image, cmap[..., idx])),
                input_png_base64=gradcam.png_base64(image),
            )
        return schemas.Prediction(
            filename=upload.filename,
            in_scope=scope.in_scope,
            refusal_reason=scope.reason,
            scope_detail=scope.detail,
            label=label,
            task_label=label,
            confidence=round(confidence, 6),
            probabilities={lab: round(float(p), 6) for lab, p in zip(model.labels, probs, strict=True)},
            threshold=model.threshold if model.task == "binary" else None,
            positive_label=model.positive_label if model.task == "binary" else None,
            model=schemas.model_ref(model),
            processing_ms=monotonic_ms(start),
            clinical=schemas.ClinicalContext(**context_for(label)),
            explanation=explanation,
        )
