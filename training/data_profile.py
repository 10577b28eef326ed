"""The training-data profile stored in the bundle (format: contracts.drift; drift tests: contracts.drift_checks).

Colour/stain statistics of up to STATS_SAMPLE training images and the model's `pooled_features`
(GAP) of FEATURES_SAMPLE of them, computed by the served model when training passes its TFLite
runner (what serving's drift checks compare with); the label mix is the exact train split count
of the processed version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from contracts.processed import DatasetMeta

log = logging.getLogger("training")


def training_profile(model: Any, folder: Path, meta: DatasetMeta, seed: int = 0) -> dict[str, Any]:
    """The profile of the train split of `meta` (local copy in `folder`) as seen by `model`
    (Keras, or the served `contracts.bundle.TFLiteRunner`)."""
    from contracts.drift import FEATURES_SAMPLE, STATS_SAMPLE, build_profile
    from training.data import load_split_arrays
    from training.model import POOLED_FEATURES_LAYER
    from training.ood import pooled_features

    images, y = load_split_arrays(folder, meta, "train")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), min(len(images), STATS_SAMPLE), replace=False))
    images, y = images[pick], y[pick]
    for_features = np.sort(rng.choice(len(images), min(len(images), FEATURES_SAMPLE), replace=False))
    features = pooled_features(model, images[for_features])
    mix = {label: int(n) for label, n in (meta.counts.get("train") or {}).items() if n}
    return build_profile(images, [meta.labels[int(k)] for k in y], features=features,
                         feature_layer=POOLED_FEATURES_LAYER, dataset=meta.dataset,
                         dataset_version=meta.dataset_version, label_mix=mix or None, seed=seed)


def drift_vs_champion(client: Any, settings: Any, model_name: str, profile: dict[str, Any]) -> Any | None:
    """The new training data's drift against the @champion's profile (None without a champion or
    a champion profile); metrics, the html section and a `dataset_drift_level` tag go to the active run."""
    import mlflow

    from contracts.bundle import DATA_PROFILE_FILE, BundleError
    from contracts.drift import ProfileError
    from contracts.drift_checks import DriftThresholds, profile_drift
    from training.gate import download_bundle
    from training.registry import CHAMPION, alias_version

    champion = alias_version(client, model_name, CHAMPION)
    if champion is None:
        return None
    try:
        reference = download_bundle(client, champion.run_id, settings).files.get(DATA_PROFILE_FILE)
        if reference is None:
            return None
        result = profile_drift(reference, profile, subject=f"dataset version {profile['dataset_version']}",
                               thresholds=DriftThresholds.from_settings(settings))
    except (BundleError, ProfileError) as exc:  # the gate reports an unreadable champion; drift is a report
        log.warning("no drift check against %s v%s: %s", model_name, champion.version, exc)
        return None
    result.reference = f"{result.reference} (champion v{champion.version})"
    mlflow.log_metrics(result.metrics("dataset_drift_"))
    mlflow.log_text(result.html_section(), "drift/dataset_drift.html")
    mlflow.set_tag("dataset_drift_level", result.level)
    return result
