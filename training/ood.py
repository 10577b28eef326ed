"""Fitting the out-of-scope detector (format and scoring: contracts/ood.py) at training time.

The Gaussians are fitted on the TRAINING split (pooled features of the served model, and image
statistics); each threshold is a split-conformal quantile of the VALIDATION scores: with n
validation images, the k-th smallest score, k = ceil((n + 1)(1 - ALPHA / 2)). For an in-scope
image exchangeable with validation (a content-hash split is) each check then refuses it with
probability <= ALPHA / 2, both together <= ALPHA (union bound), whatever the scores' distribution.
ALPHA = 0.5 % leaves the issue's <= 1 % in-scope refusal target a margin for the sampling noise of
a few hundred validation images (a plain 99 % validation quantile, the earlier rule, refused 1.5 %
of a test split). With too few validation images for that rank (n < 2 / ALPHA - 1) the threshold is
the largest validation score and `conformal_valid` is 0. The test split is never looked at. The
figures (alpha, rank, guaranteed pass rate, validation pass rates, share of generated non-smears
refused) go to MLflow, bundle.json `ood.validation`, the gate decision and the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from contracts.ood import Gaussian, OodDetector
from training.conformal import conformal_rank

ALPHA = 0.005  # allowed share of in-scope images refused, in expectation (both checks together)
FEATURE_BATCH = 128
NON_SMEAR_KINDS = ("flat", "noise", "text", "photo")


def pooled_features(model: Any, images: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """Pooled features [N, K] of raw 0..255 images, computed in chunks (a split can be large), by a
    Keras model or by the served model (`contracts.bundle.TFLiteRunner`). Training fits the detector
    and the drift profile on the served model's features: a quantized model's differ from Keras'
    by up to a few %, and serving compares what IT computes with the thresholds."""
    from contracts.bundle import OUTPUT_FEATURES, TFLiteRunner
    from training.model import pooled_feature_model

    if isinstance(model, TFLiteRunner):
        def extract(batch):
            return model(batch)[OUTPUT_FEATURES]
    else:
        sub = pooled_feature_model(model)

        def extract(batch):
            return np.asarray(sub(batch, training=False))
    parts = [extract(images[i:i + batch_size].astype(np.float32)) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def conformal_threshold(scores: np.ndarray, alpha: float) -> tuple[float, int, bool]:
    """(threshold, rank used, valid): the conformal quantile, or the maximum when n is too small."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = conformal_rank(len(ordered), alpha)
    valid = k <= len(ordered)
    k = min(k, len(ordered))
    return float(ordered[k - 1]), k, valid


def fit_detector(model: Any, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 alpha: float = ALPHA) -> tuple[OodDetector, dict[str, Any]]:
    """(detector, validation figures): Gaussians on train, conformal thresholds on validation."""
    if len(val_x) == 0 or len(train_x) < 2:
        raise ValueError("the out-of-scope detector needs training and validation images")
    detector, figures = detector_from_arrays(pooled_features(model, train_x), train_y, train_x,
                                             pooled_features(model, val_x), val_x, alpha)
    figures.update(non_smear_refusals(detector, model, int(val_x.shape[1])))
    return detector, figures


def detector_from_arrays(train_features: np.ndarray, train_y: np.ndarray, train_x: np.ndarray,
                         val_features: np.ndarray, val_x: np.ndarray,
                         alpha: float = ALPHA) -> tuple[OodDetector, dict[str, Any]]:
    """`fit_detector` on pooled features already computed (benchmarks fit it on saved features)."""
    from contracts.ood import image_statistics

    features = Gaussian.fit(train_features, train_y)
    statistics = Gaussian.fit(image_statistics(train_x))
    val_f = features.distance(val_features)
    val_s = statistics.distance(image_statistics(val_x))
    feature_threshold, rank, valid = conformal_threshold(val_f, alpha / 2)
    statistics_threshold, _, _ = conformal_threshold(val_s, alpha / 2)
    detector = OodDetector(features, statistics, feature_threshold, statistics_threshold)
    passed_f, passed_s = val_f <= detector.feature_threshold, val_s <= detector.statistics_threshold
    figures = {
        "alpha": alpha, "conformal_rank": rank, "conformal_valid": float(valid),
        # Guaranteed expected pass rate of in-scope images (union bound over the two checks).
        "pass_bound": max(0.0, 1 - 2 * (1 - rank / (len(val_x) + 1))) if valid else 0.0,
        "fit_images": int(len(train_x)), "val_images": int(len(val_x)),
        "val_pass_rate": float(np.mean(passed_f & passed_s)),
        "val_pass_features": float(np.mean(passed_f)), "val_pass_statistics": float(np.mean(passed_s)),
    }
    return detector, figures


def fit_for_run(model: Any, folder: Path, meta: Any, val_x: np.ndarray,
                alpha: float = ALPHA) -> tuple[OodDetector, dict[str, Any]]:
    """The detector of one training run: reads the training split of the processed version."""
    from training.data import load_split_arrays

    train_x, train_y = load_split_arrays(folder, meta, "train")
    return fit_detector(model, train_x, train_y, val_x, alpha)


def non_smear_refusals(detector: OodDetector, model: Any, size: int, per_kind: int = 8) -> dict[str, float]:
    """Share of generated non-smears (NON_SMEAR_KINDS) the detector refuses, overall and per kind."""
    from contracts.imaging import prepare_image

    out: dict[str, float] = {}
    refused_all = []
    for kind, images in non_smear_images(per_kind, seed=12345).items():
        batch = np.stack([prepare_image(img, size) for img in images])
        refused = [not v.in_scope for v in detector.check(pooled_features(model, batch), batch)]
        out[f"synthetic_refused_{kind}"] = float(np.mean(refused))
        refused_all += refused
    out["synthetic_refused"] = float(np.mean(refused_all))
    return out


def non_smear_images(per_kind: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> dict[str, list[Any]]:
    """Pillow images that are not blood smears: `flat` colour, uniform `noise`, rendered `text`,
    and a `photo`-like sky gradient with shapes. Used at training time (figures) and by tests."""
    rng = np.random.default_rng(seed)
    makers = {"flat": _flat, "noise": _noise, "text": _text, "photo": _photo}
    return {kind: [makers[kind](rng, size) for _ in range(per_kind)] for kind in NON_SMEAR_KINDS}


def _flat(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))


def _noise(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _text(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(14, 28)))
    words = ["patient", "sample", "report", "smear", "blood", "count", "result", "HemaFlow", "2026", "ok"]
    y = int(rng.integers(2, 12))
    while y < size[1] - 10:
        line = " ".join(rng.choice(words, 5))
        draw.text((int(rng.integers(2, 20)), y), line, fill=(0, 0, 0), font=font)
        y += int(rng.integers(20, 34))
    return img


def _photo(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    sky = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    img = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img
