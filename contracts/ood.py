"""The out-of-scope (out-of-distribution) detector a bundle carries: numpy only, shared by
training (which fits it, training/ood.py) and serving (which applies it).

Two checks, each a Mahalanobis distance with a Ledoit-Wolf shrinkage covariance, each with a
threshold set on the VALIDATION split (training/ood.py):

- `features`: the model's pooled features (the GAP output before the dense head, the TFLite
  output `features`), class-conditional means with one shared covariance; the score is the
  distance to the nearest class. Catches images the network has no representation for.
- `image_statistics`: a few colour and texture statistics of the prepared image
  (`image_statistics`): catches flat, noise, text-like and other non-smear images cheaply,
  before the network's features are even looked at.

An image is out of scope when either score exceeds its threshold. In the bundle: the arrays in
`ood.npz` (listed in SHA256SUMS, so signed), thresholds and validation figures in bundle.json
under `ood`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

OOD_FILE = "ood.npz"
METHOD = "mahalanobis-ledoit-wolf"
REASON_STATISTICS = "image_statistics"
REASON_FEATURES = "features"
REASON_TEXT = {
    REASON_STATISTICS: "its colours and texture are unlike every image the model was trained on",
    REASON_FEATURES: "the model's features for it are far from every class it was trained on",
}
STAT_NAMES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "saturation_mean", "saturation_std",
              "log_gradient", "log_laplacian_ratio", "dark_fraction", "bright_fraction")
_EPS = 1e-6
# Statistics are computed on about this many pixels per side (every k-th pixel): the detector
# then costs well under the interpreter's time at serving (224 px images: every 4th pixel).
STAT_SIDE = 56


def image_statistics(images: np.ndarray) -> np.ndarray:
    """[N, len(STAT_NAMES)] colour/texture statistics of raw 0..255 images [N,S,S,3] (or one [S,S,3]).

    Computed on every k-th pixel (about STAT_SIDE per side; cheap at serving). The texture terms
    are logs so they are closer to Gaussian: uniform noise has a huge Laplacian-to-contrast ratio,
    a flat image none.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    step = max(1, x.shape[1] // STAT_SIDE)
    x = x[:, ::step, ::step, :].astype(np.float32) / 255.0
    n = len(x)
    # Per-channel and per-pixel reductions run over contiguous rows: numpy reduces a strided axis
    # with a 3-wide inner axis (x.std(axis=(1, 2)), x.max(axis=-1)) several times slower.
    channels = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, 3, -1)
    mean, std = channels.mean(axis=-1), channels.std(axis=-1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    sat = ((hi - lo) / (hi + _EPS)).reshape(n, -1)
    grey = (r + g + b) / 3
    grad = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))
    lap = np.abs(4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
                 - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).mean(axis=(1, 2))
    grey_px = grey.reshape(n, -1)
    contrast = grey_px.std(axis=1)
    stats = [mean, std, sat.mean(axis=1)[:, None], sat.std(axis=1)[:, None],
             np.log(grad + 1e-4)[:, None], np.log((lap + 1e-4) / (contrast + 1e-2))[:, None],
             (grey_px < 0.2).mean(axis=1)[:, None], (grey_px > 0.9).mean(axis=1)[:, None]]
    return np.concatenate(stats, axis=1).astype(np.float64)


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance of centred samples x [N, D] (Ledoit & Wolf 2004)."""
    n, d = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / d
    delta = np.sum((sample - mu * np.eye(d)) ** 2) / d
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2, without the N outer products.
    beta = (np.sum(np.sum(x**2, axis=1) ** 2) - n * np.sum(sample**2)) / (d * n * n)
    shrink = 0.0 if delta <= 0 else min(beta / delta, 1.0)
    return shrink * mu * np.eye(d) + (1 - shrink) * sample


@dataclass(frozen=True)
class Gaussian:
    """Means [M, D] (one per class, or one) and a shared precision [D, D]: the Mahalanobis model."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, groups: np.ndarray | None = None) -> Gaussian:
        """Class-conditional means (when `groups` is given) with one pooled shrinkage covariance."""
        x = np.asarray(x, dtype=np.float64)
        groups = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups)
        keys = np.unique(groups)
        means = np.stack([x[groups == k].mean(axis=0) for k in keys])
        centred = x - means[np.searchsorted(keys, groups)]
        cov = ledoit_wolf(centred)
        cov += np.eye(cov.shape[0]) * _EPS * max(float(np.trace(cov)) / cov.shape[0], _EPS)
        return cls(means, np.linalg.inv(cov))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of x [N, D] to its nearest mean."""
        x = np.asarray(x, dtype=np.float64)
        diff = x[:, None, :] - self.means[None, :, :]
        # (diff @ precision) . diff: one BLAS product; a three-operand einsum loops in C (~10x slower).
        return np.einsum("nmd,nmd->nm", diff @ self.precision, diff).min(axis=1)


@dataclass(frozen=True)
class Verdict:
    """One image's check: in scope, or the reason (REASON_*) and both scores against thresholds."""

    in_scope: bool
    reason: str | None
    feature_score: float
    statistics_score: float


@dataclass(frozen=True)
class OodDetector:
    """The fitted detector: two Gaussians and a threshold on each distance."""

    features: Gaussian
    statistics: Gaussian
    feature_threshold: float
    statistics_threshold: float

    def scores(self, features: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature distances, statistics distances) of a batch: pooled features [N,K], images [N,S,S,3]."""
        return self.features.distance(features), self.statistics.distance(image_statistics(images))

    def check(self, features: np.ndarray, images: np.ndarray) -> list[Verdict]:
        """A verdict per image; the statistics reason wins when both fire (it is the plainer one)."""
        f_scores, s_scores = self.scores(features, images)
        out = []
        for f, s in zip(f_scores, s_scores, strict=True):
            reason = (REASON_STATISTICS if s > self.statistics_threshold
                      else REASON_FEATURES if f > self.feature_threshold else None)
            out.append(Verdict(reason is None, reason, float(f), float(s)))
        return out

    def to_npz(self) -> bytes:
        """The arrays for ood.npz (thresholds go to bundle.json, see `describe`)."""
        buf = io.BytesIO()
        np.savez(buf, feature_means=self.features.means.astype(np.float32),
                 feature_precision=self.features.precision.astype(np.float32),
                 statistics_means=self.statistics.means, statistics_precision=self.statistics.precision)
        return buf.getvalue()

    def describe(self, validation: dict[str, Any]) -> dict[str, Any]:
        """bundle.json `ood`: where the arrays are, the thresholds, and the validation figures."""
        return {"file": OOD_FILE, "method": METHOD, "feature_dim": int(self.features.means.shape[1]),
                "statistics": list(STAT_NAMES), "feature_threshold": float(self.feature_threshold),
                "statistics_threshold": float(self.statistics_threshold), "validation": validation}

    @classmethod
    def load(cls, meta_ood: dict[str, Any], npz: bytes) -> OodDetector:
        """From bundle.json `ood` and the bytes of ood.npz; ValueError when they do not fit together."""
        with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:
            feats = Gaussian(arrays["feature_means"].astype(np.float64),
                             arrays["feature_precision"].astype(np.float64))
            stats = Gaussian(arrays["statistics_means"], arrays["statistics_precision"])
        k = feats.means.shape[1]
        if feats.precision.shape != (k, k) or stats.means.shape[1] != len(STAT_NAMES):
            raise ValueError(f"ood.npz shapes do not fit: features {feats.means.shape}/{feats.precision.shape}, "
                             f"statistics {stats.means.shape}")
        if int(meta_ood.get("feature_dim", k)) != k:
            raise ValueError(f"bundle.json says feature_dim {meta_ood.get('feature_dim')}, ood.npz has {k}")
        return cls(feats, stats, float(meta_ood["feature_threshold"]), float(meta_ood["statistics_threshold"]))


def bundle_detector(files: dict[str, bytes], meta: dict[str, Any], runner: Any) -> OodDetector | None:
    """The bundle's out-of-scope detector; None for bundles without one. A detector bundle.json
    announces must be covered by SHA256SUMS (so signed) and fit the model's features output.
    `runner` is the bundle's `contracts.bundle.TFLiteRunner` (serving and batch scoring both load it here)."""
    from contracts.bundle import OUTPUT_FEATURES, SUMS_FILE, BundleError, parse_sums

    ood = meta.get("ood")
    if not ood:
        return None
    if not runner.has_features:
        raise BundleError("bad_model", "bundle.json has an out-of-scope detector but the model has no features output")
    if OOD_FILE not in parse_sums(files[SUMS_FILE].decode("utf-8", errors="replace")):
        raise BundleError("bad_checksums", f"{OOD_FILE} is not covered by SHA256SUMS")
    try:
        detector = OodDetector.load(ood, files[OOD_FILE])
    except Exception as exc:  # a missing array, a corrupt zip, a wrong shape: never swapped in
        raise BundleError("bad_detector", f"out-of-scope detector unusable: {exc}") from None
    width = int(runner.runner.get_output_details()[OUTPUT_FEATURES]["shape"][-1])
    if width != detector.features.means.shape[1]:
        raise BundleError("bad_detector", f"detector expects {detector.features.means.shape[1]} features, "
                          f"the model outputs {width}")
    return detector
