"""Test-time augmentation (INFERENCE_TTA), the one definition serving, batch screening, training
and the benchmarks share: the 8 flips / 90-degree rotations of each image go through the model
and their probabilities are averaged.

Whether a model answers that way: INFERENCE_TTA when it is set (every model), else the model's own
default, its dataset spec's `inference_tta` at training, recorded in bundle.json `tta.on_by_default`
(`uses_tta`). A dataset whose classes are not rotation-invariant, or that answers better from one view,
says so in its spec.

Averaging moves probabilities towards the middle, so a binary model's threshold chosen on
un-augmented validation no longer reaches TARGET_SENSITIVITY: training also picks one on the
averaged VALIDATION probabilities of the served model and records it in bundle.json `tta`
(`decision_threshold` reads it). Pure NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VIEWS = 8  # the dihedral group of the square: 4 rotations, each also mirrored
BUNDLE_KEY = "tta"  # bundle.json {views, threshold, on_by_default, validation and test figures}
DEFAULT_KEY = "on_by_default"  # bundle.json tta.on_by_default: the spec's `inference_tta` at training
DEFAULT_PARAM = "tta_on_by_default"  # the same, as the training run's MLflow param


def views(images: np.ndarray) -> np.ndarray:
    """[N,S,S,3] -> [N*VIEWS,S,S,3], image i's views at rows i*VIEWS .. i*VIEWS+7 (view 0 = original)."""
    out = []
    for image in images:
        for k in range(4):
            rotated = np.rot90(image, k, axes=(0, 1))
            out += [rotated, rotated[:, ::-1]]
    return np.ascontiguousarray(np.stack(out))


def average(view_probabilities: np.ndarray) -> np.ndarray:
    """[N*VIEWS, C] probabilities of `views(images)` -> [N, C], the mean over each image's views."""
    probs = np.asarray(view_probabilities)
    return probs.reshape(-1, VIEWS, probs.shape[-1]).mean(axis=1)


def _record(meta: dict[str, Any]) -> dict[str, Any]:
    """bundle.json `tta`, or {} when a bundle has none (or a malformed one)."""
    record = meta.get(BUNDLE_KEY)
    return record if isinstance(record, dict) else {}


def decision_threshold(meta: dict[str, Any], tta: bool) -> float | None:
    """A binary bundle's threshold for the probabilities it will be compared with: the TTA one when
    `tta` and the bundle has it, else the un-augmented one (bundles from before TTA thresholds
    existed keep theirs); None for multiclass bundles."""
    record = _record(meta)
    value = record.get("threshold") if tta and record.get("threshold") is not None else meta.get("threshold")
    return float(value) if value is not None else None


def on_by_default(meta: dict[str, Any]) -> bool:
    """The bundle's own TTA default (its spec's choice at training); bundles from before: on."""
    return bool(_record(meta).get(DEFAULT_KEY, True))


def uses_tta(setting: bool | None, default_on: bool) -> bool:
    """Whether answers average the views: INFERENCE_TTA (`setting`) when set, else the model's default."""
    return default_on if setting is None else bool(setting)
