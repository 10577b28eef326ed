"""The served model's test-time-augmentation figures, computed at training time.

With INFERENCE_TTA on, the API and batch screening answer with the mean probabilities of an
image's 8 views (`contracts.tta`). Averaging moves probabilities, so a binary model needs its own
threshold for them: it is chosen on the view-averaged VALIDATION probabilities of the served
model by the same rule as the plain one (TARGET_SENSITIVITY); the test split is only measured.
The record goes to bundle.json `tta` and to MLflow as `tta_val_*` / `tta_test_*` metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIGURES = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "roc_auc", "ece")
VIEW_BATCH = 16  # images per interpreter call (x 8 views)


def averaged_probabilities(runner: Any, images: np.ndarray, batch: int = VIEW_BATCH) -> np.ndarray:
    """[N, C] view-averaged probabilities of raw 0..255 images by a `contracts.bundle.TFLiteRunner`."""
    from contracts.bundle import OUTPUT_PROBABILITIES
    from contracts.tta import average, views

    parts = [average(runner(views(images[i:i + batch]))[OUTPUT_PROBABILITIES]) for i in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def served_probabilities(runner: Any, images: np.ndarray, tta: bool) -> np.ndarray:
    """[N, C] probabilities as serving and screening answer: view-averaged with `tta`, else one view."""
    return averaged_probabilities(runner, images) if tta else runner.predict_proba(images.astype("float32"))


def tta_record(runner: Any, fitted: Any, test_x: np.ndarray) -> dict[str, Any]:
    """bundle.json `tta`: {views, threshold (binary; None otherwise), validation {...}, test {...}}
    of the served model `runner`; `fitted` is the run's `training.fitting.FitResult`."""
    from contracts.tta import VIEWS
    from training.evaluate import choose_threshold, compute_metrics

    val_p = averaged_probabilities(runner, fitted.val_x)
    test_p = averaged_probabilities(runner, test_x)
    threshold = None
    if fitted.positive_label is not None:
        pos = fitted.labels.index(fitted.positive_label)
        threshold = choose_threshold(fitted.val_y == pos, val_p[:, pos], fitted.target_sensitivity,
                                     fitted.threshold_rule)

    def figures(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        metrics = compute_metrics(y, p, fitted.labels, fitted.positive_label, threshold)
        return {k: float(metrics[k]) for k in FIGURES if metrics.get(k) is not None}

    return {"views": VIEWS, "threshold": threshold, "validation": figures(fitted.val_y, val_p),
            "test": figures(fitted.test_y, test_p)}


def tta_metrics(record: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a `tta_record`: tta_threshold, tta_val_<figure>, tta_test_<figure>."""
    out = {f"tta_{split}_{k}": v for split, key in (("val", "validation"), ("test", "test"))
           for k, v in record[key].items()}
    if record["threshold"] is not None:
        out["tta_threshold"] = float(record["threshold"])
    return out
