"""A scored batch's drift against the champion's training profile (the tests: contracts.drift).

Each chunk keeps, per readable image, what drift needs in its chunk file: the prepared image's
colour/stain statistics (`contracts.drift.image_stats`, 13 numbers: the same function the training
profile used, so no pixels are stored) and the model's pooled features. `finish` compares all of
them, with the predicted labels, against the profile the champion's bundle carries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

COLOUR_STATS = "colour_stats"  # row field: image_stats of the prepared image
FEATURES = "features"  # row field: pooled features (None: the bundle's model has none)
SIGNIFICANT_DIGITS = 5  # rounding in the chunk file: far below any drift effect, a third of the size


def _rounded(values) -> list[float]:
    return [float(f"{v:.{SIGNIFICANT_DIGITS}g}") for v in np.asarray(values, np.float64).ravel()]


def drift_inputs(image, features) -> dict[str, Any]:
    """The row fields drift needs from one prepared (S,S,3) image and its pooled features (K,) or None."""
    from contracts.drift import image_stats

    return {COLOUR_STATS: _rounded(image_stats(image[None])[0]),
            FEATURES: None if features is None else _rounded(features)}


def has_drift_inputs(rows: list[dict]) -> bool:
    """False for a chunk file written before drift (it is scored again rather than reused)."""
    return all(COLOUR_STATS in r for r in rows if not r.get("error"))


def batch_drift(bundle, rows: list[dict], subject: str, settings) -> Any:
    """DriftResult of the readable rows against the bundle's DATA_PROFILE_FILE; never raises for
    a missing or unusable profile (drift is reported as not tested, with the reason)."""
    from contracts.bundle import DATA_PROFILE_FILE
    from contracts.drift import ProfileError
    from contracts.drift_checks import DriftCheck, DriftResult, DriftThresholds, drift_report

    thresholds = DriftThresholds.from_settings(settings)
    scored = [r for r in rows if not r.get("error")]
    feats = [r.get(FEATURES) for r in scored]
    try:
        return drift_report(
            bundle.files.get(DATA_PROFILE_FILE),
            stats=np.asarray([r[COLOUR_STATS] for r in scored], np.float64) if scored else None,
            features=np.asarray(feats, np.float64) if scored and all(f is not None for f in feats) else None,
            labels=[r["label"] for r in scored], subject=subject, thresholds=thresholds)
    except ProfileError as exc:
        why = f"the model's training-data profile cannot be used: {exc}"
        return DriftResult(subject, len(scored), "", [DriftCheck(name, False, detail=why)
                                                      for name in ("colour", "features", "label_mix")],
                           thresholds.strong_effect)
