"""Robustness read-outs for k-fold models: test-time augmentation and re-stained test images.

A model is also judged on a dataset from another lab, which we do not have. The closest proxy
here is to re-stain the held-out images the way another lab's smears differ: in the optical
density space of haematoxylin and eosin (Ruifrok & Johnston's colour deconvolution), with

- `h_up_e_down` / `h_down_e_up`: one stain 30 % stronger and the other 25 % weaker;
- `other_class_stain`: each image's H, E and residual channels matched (Reinhard: per-image mean
  and standard deviation) to the average stain of training images of ANOTHER class. In leukemia
  the stain differs between classes (see ../shared/data/README.md); a model that learnt the
  colour instead of the cells fails this one.

Thresholds and temperature stay those of the un-stained validation split (a lab would not
re-tune them). numpy only; used by `benchmarks/accuracy.py --folds`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Ruifrok & Johnston (2001): optical density of haematoxylin, eosin and DAB (rows), unit length.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
STAIN_SCALES = {"h_up_e_down": (1.30, 0.75), "h_down_e_up": (0.75, 1.30)}
OTHER_CLASS = "other_class_stain"
SHIFTS = (*STAIN_SCALES, OTHER_CLASS)
CHUNK = 64  # images per prediction call (TTA multiplies by 8)


def to_stains(images: np.ndarray) -> np.ndarray:
    """uint8/float RGB [..., 3] -> stain concentrations [..., 3] (H, E, residual)."""
    od = -np.log10((images.astype(np.float64) + 1.0) / 256.0)
    return od @ HED_FROM_RGB


def from_stains(stains: np.ndarray) -> np.ndarray:
    """Inverse of `to_stains`, clipped to uint8."""
    rgb = 256.0 * np.power(10.0, -(stains @ RGB_FROM_HED)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def scale_stains(images: np.ndarray, h: float, e: float) -> np.ndarray:
    stains = to_stains(images)
    stains[..., 0] *= h
    stains[..., 1] *= e
    return from_stains(stains)


def _moments(stains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image of stains [N, H, W, 3]: mean and standard deviation of each channel ([N, 3] each)."""
    flat = stains.reshape(len(stains), -1, 3)
    return flat.mean(axis=1), flat.std(axis=1) + 1e-6


def stain_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: mean and standard deviation of each stain channel ([N, 3] each)."""
    return _moments(to_stains(images))


def restain(images: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """Reinhard transfer in stain space: each image's per-channel statistics -> the target's."""
    stains = to_stains(images)
    mean, std = _moments(stains)
    out = (stains - mean[:, None, None, :]) / std[:, None, None, :] * target_std + target_mean
    return from_stains(out)


def shifted(name: str, images: np.ndarray, y: np.ndarray, class_stains: dict[int, tuple]) -> np.ndarray:
    """The held-out images re-stained by shift `name` (`class_stains`: class -> mean (mean, std))."""
    if name in STAIN_SCALES:
        return scale_stains(images, *STAIN_SCALES[name])
    n_classes = len(class_stains)
    out = np.empty_like(images)
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows):
            out[rows] = restain(images[rows], *class_stains[(c + 1) % n_classes])
    return out


def class_stain_targets(images: np.ndarray, y: np.ndarray, n_classes: int) -> dict[int, tuple]:
    """Average per-image stain statistics of each class's training images."""
    targets = {}
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        mean, std = stain_statistics(images[rows[:: max(1, len(rows) // 200)]])
        targets[c] = (mean.mean(axis=0), std.mean(axis=0))
    return targets


def _chunked(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)])


def view_logits(model: Any, images: np.ndarray) -> np.ndarray:
    """[N, VIEWS, C] logits of each image's 8 views (contracts.tta): an ensemble's exact TTA read-out
    averages its members' logits per view before the views' probabilities are averaged."""
    from contracts.tta import VIEWS, views
    from training.calibration import logits_of

    return _chunked(lambda chunk: logits_of(model, views(chunk)).reshape(len(chunk), VIEWS, -1), images)


def tta_logits(per_view_logits: np.ndarray) -> np.ndarray:
    """[N, C] log of the probabilities averaged over the views, as serving and screening average them."""
    from contracts.tta import average
    from training.calibration import logits_from_probabilities, softmax

    return logits_from_probabilities(average(softmax(per_view_logits.reshape(-1, per_view_logits.shape[-1]))))


def robustness_arrays(data, idx: dict[str, np.ndarray]) -> Callable[[Any], dict[str, np.ndarray]]:
    """For `experiment.fit_and_score(extra_arrays=...)`: TTA logits of val and test (and each view's),
    and test logits under every stain shift."""
    from training.calibration import logits_of

    def arrays(model: Any) -> dict[str, np.ndarray]:
        tr, te = idx["train"], idx["test"]
        targets = class_stain_targets(data.images[tr], data.y[tr], len(data.labels))
        out = {}
        for split, rows in (("val", idx["val"]), ("test", te)):
            out[f"tta_views_{split}_logits"] = view_logits(model, data.images[rows])
            out[f"tta_{split}_logits"] = tta_logits(out[f"tta_views_{split}_logits"])
        for name in SHIFTS:  # re-stained CHUNK test images at a time (float64 stain arrays are large)
            restained = _chunked(lambda rows: shifted(name, data.images[rows], data.y[rows], targets), te)
            out[f"shift_{name}_test_logits"] = logits_of(model, restained)
        return out

    return arrays
