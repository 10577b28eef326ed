"""The training-data profile of the champion, and the colour statistics drift is measured on.

The profile (`build_profile`, a versioned JSON stored in the serving bundle as DATA_PROFILE_FILE)
holds per-image colour/stain statistics of the training split, brightness and saturation
histograms, the training label mix and a sample of the model's pooled CNN features. The drift
tests against it (`drift_report`, `profile_drift`) are contracts.drift_checks. Numpy only:
importable by the LiteRT scoring task (no TensorFlow).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

PROFILE_FORMAT = "hemaflow-data-profile"
PROFILE_VERSION = 1
# Per-image statistics: RGB means/stds (0..255), optical density per channel (stain amount),
# saturation-weighted hue as a unit vector, mean saturation and brightness (HSV V), 0..1.
STAT_NAMES = ("r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "od_r", "od_g", "od_b",
              "hue_cos", "hue_sin", "saturation", "brightness")
STATS_SAMPLE = 1000  # per-image stat rows kept in the profile
FEATURES_SAMPLE = 200  # pooled-feature rows kept in the profile (and drawn from a batch)
HIST_BINS = 16
STATS_SIDE = 64  # statistics read every k-th pixel so that about STATS_SIDE² pixels per image are used


class ProfileError(ValueError):
    """A data profile of an unknown format or version, or unusable input."""


# --- statistics ----------------------------------------------------------------------------

def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (radians), saturation and value (0..1) of float RGB in 0..1, any leading shape."""
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-12), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-12)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(delta > 0, hue, 0.0) * (np.pi / 3), sat, mx


def _pixels(images: np.ndarray) -> np.ndarray:
    """A strided view (every k-th row and column, k = side // STATS_SIDE): global colour statistics
    barely move, the cost drops k² times (a 224 px field: 16 times)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ProfileError(f"images must be [N, H, W, 3] RGB, got shape {images.shape}")
    k = max(1, min(images.shape[1:3]) // STATS_SIDE)
    return images[:, ::k, ::k]


def image_stats(images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """[N, len(STAT_NAMES)] per-image colour/stain statistics of uint8 RGB images [N, H, W, 3]."""
    images = _pixels(images)
    rows = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].astype(np.float32)
        flat = x.reshape(len(x), -1, 3)
        od = -np.log10((flat + 1.0) / 256.0)
        hue, sat, val = _hsv(flat / 255.0)
        rows.append(np.column_stack([
            flat.mean(axis=1), flat.std(axis=1), od.mean(axis=1),
            (sat * np.cos(hue)).mean(axis=1), (sat * np.sin(hue)).mean(axis=1), sat.mean(axis=1), val.mean(axis=1),
        ]))
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, len(STAT_NAMES)))


def _histograms(images: np.ndarray, chunk: int = 64) -> dict[str, list[float]]:
    images = _pixels(images)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    bright, sat_h = np.zeros(HIST_BINS), np.zeros(HIST_BINS)
    for i in range(0, len(images), chunk):
        _, sat, val = _hsv(images[i : i + chunk].astype(np.float32).reshape(-1, 3) / 255.0)
        bright += np.histogram(val, edges)[0]
        sat_h += np.histogram(sat, edges)[0]
    norm = lambda h: [round(float(v), 6) for v in h / max(h.sum(), 1)]  # noqa: E731
    return {"edges": [float(e) for e in edges], "brightness": norm(bright), "saturation": norm(sat_h)}


def sample_rows(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(rows) <= n:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))]


def _rounded(rows: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.5g}") for v in row] for row in np.asarray(rows, np.float64)]


# --- profile -------------------------------------------------------------------------------

def build_profile(images: np.ndarray, labels: Sequence[str], *, features: np.ndarray | None = None,
                  feature_layer: str = "", dataset: str = "", dataset_version: str = "",
                  label_mix: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """The training-data profile: colour stats (mean, std, a sample of rows), histograms, label mix
    (`label_mix` when the images are a sample of the data, else counted from `labels`),
    and a sample of pooled features ([N, K]) when given."""
    stats = image_stats(images)
    if len(stats) == 0:
        raise ProfileError("cannot profile an empty image set")
    profile: dict[str, Any] = {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "dataset": dataset,
        "dataset_version": dataset_version, "n_images": int(len(stats)),
        "colour": {"names": list(STAT_NAMES), "mean": _rounded(stats.mean(axis=0)[None])[0],
                   "std": _rounded(stats.std(axis=0)[None])[0],
                   "sample": _rounded(sample_rows(stats, STATS_SAMPLE, seed))},
        "histograms": _histograms(np.asarray(images)),
        "label_mix": dict(sorted((label_mix or Counter(str(v) for v in labels)).items())),
        "features": None,
    }
    if features is not None:
        feats = np.asarray(features, np.float64)
        profile["features"] = {"layer": feature_layer, "dim": int(feats.shape[1]), "n": int(len(feats)),
                               "sample": _rounded(sample_rows(feats, FEATURES_SAMPLE, seed))}
    return profile


def profile_bytes(profile: dict[str, Any]) -> bytes:
    return json.dumps(profile, sort_keys=True, separators=(",", ":")).encode()


def load_profile(data: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A profile read from JSON (bytes/str) or a dict, its format and version checked."""
    profile = data if isinstance(data, dict) else json.loads(data)
    if profile.get("format") != PROFILE_FORMAT or profile.get("version") != PROFILE_VERSION:
        raise ProfileError(f"not a {PROFILE_FORMAT} v{PROFILE_VERSION} profile: "
                           f"format={profile.get('format')!r} version={profile.get('version')!r}")
    return profile
