"""The model-running half of a prediction request: image checks, bounded decoding, the
interpreter call, and the response built from its outputs.

One `Inference` per app, built in the lifespan. It owns the inference threads: by default one
per core, each job decodes, prepares and runs one upload on a free interpreter of the request's
model (`serving.runners`), so Pillow and LiteRT, which release the GIL, use every core while the
event loop only parses HTTP. With SERVING_MICRO_BATCH > 1 the interpreter call goes through the
micro-batcher instead (its worker task belongs to the server's event loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from contracts import gradcam
from contracts.bundle import crop_policy as bundle_crop_policy
from contracts.imaging import ImageRejected, prepare_image, read_header
from contracts.ood import REASON_TEXT
from contracts.settings import Settings
from serving import schemas, tta
from serving.batcher import MicroBatcher, Result, split_outputs
from serving.bundle import LoadedModel
from serving.clinical import context_for
from serving.errors import ApiError
from serving.manager import monotonic_ms
from serving.metrics import ServingMetrics
from serving.runners import default_threads
from serving.upload import UploadedFile

T = TypeVar("T")

# At most this many images are decoded at once, so concurrent uploads cannot multiply the
# per-image peak (a 40 Mpx image is ~200 MB while it is decoded) without bound.
DECODE_SLOTS = 2
# ImageRejected reasons that mean "not an image we can read" (415); the rest are 422.
UNSUPPORTED_REASONS = {"not_an_image", "unsupported_format"}


def crop_policy(model: LoadedModel) -> str:
    """The crop policy the model was trained with (`contracts.bundle.crop_policy`)."""
    return bundle_crop_policy(model.meta)


def prepare(data: bytes, size: int, s: Settings, crop: str = "center_crop") -> np.ndarray:
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
    return prepare_image(data, size, s.max_image_pixels, crop=crop)


class Inference:
    """Inference threads, decode slots, the micro-batcher and the metrics of predictions, shared by every request."""

    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.threads = default_threads(settings.serving_inference_threads, settings.serving_workers)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="inference")
        self.refuse_out_of_scope = settings.serving_refuse_out_of_scope
        self.batcher = MicroBatcher(settings.serving_micro_batch, on_batch=lambda n: metrics.batch_size.observe(n))
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on an inference thread; a refused image becomes its 415/422 ApiError."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except ImageRejected as exc:
            self.metrics.observe_image(None)
            status = 415 if exc.reason in UNSUPPORTED_REASONS else 422
            raise ApiError(status, exc.reason, exc.detail) from None

    def _prepare(self, data: bytearray, size: int, settings: Settings, crop: str) -> np.ndarray:
        with self.decode_slots:
            return prepare(data, size, settings, crop)

    async def prepare(self, upload: UploadedFile, size: int, settings: Settings,
                      crop: str = "center_crop") -> np.ndarray:
        """The model input of one upload, decoded on an inference thread; a refused image is an ApiError."""
        return await self._in_pool(self._prepare, upload.data, size, settings, crop)

    async def predict(self, model: LoadedModel, images: np.ndarray) -> list[Result]:
        """(probabilities, class map, features) per image; averaged over flips/rotations when the model
        was loaded with TTA (INFERENCE_TTA)."""
        if not model.tta:
            return await self.batcher.predict(model, images)
        return tta.merge(await self.batcher.predict(model, tta.views(images)), len(images))

    def _outputs(self, model: LoadedModel, images: np.ndarray) -> list[Result]:
        """(probabilities, class map, features) per image on this thread; averaged over flips/rotations
        when the model was loaded with TTA (INFERENCE_TTA)."""
        if not model.tta:
            return split_outputs(model.predict_outputs(images))
        return tta.merge(split_outputs(model.predict_outputs(tta.views(images))), len(images))

    def _answer(self, model: LoadedModel, upload: UploadedFile, settings: Settings, explain: bool,
                start: float) -> schemas.Prediction:
        image = self._prepare(upload.data, model.image_size, settings, crop_policy(model))
        (output,) = self._outputs(model, image[None])
        self.metrics.batch_size.observe(1)
        return self.result(model, upload, image, output, explain, start)

    async def answer(self, model: LoadedModel, upload: UploadedFile, settings: Settings, explain: bool,
                     start: float) -> schemas.Prediction:
        """One upload's prediction on `model`: one inference-thread job (decode, prepare, model,
        Grad-CAM when asked), or, with micro-batching, decode in a thread and a shared interpreter call."""
        if self.batcher.max_batch == 1:
            return await self._in_pool(self._answer, model, upload, settings, explain, start)
        image = await self.prepare(upload, model.image_size, settings, crop_policy(model))
        (output,) = await self.predict(model, image[None])
        if explain:
            return await self._in_pool(self.result, model, upload, image, output, True, start)
        return self.result(model, upload, image, output, False, start)

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
        self.metrics.observe_image(label)
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
