"""Test-time augmentation (SERVING_TTA): the 8 flips / 90-degree rotations of each image go
through the interpreter in one call and their probabilities are averaged. The Grad-CAM map and
the pooled features (what the out-of-scope detector scores, fitted on un-augmented images) stay
those of the original image, the first view.
"""

from __future__ import annotations

import numpy as np

from serving.batcher import Result

VIEWS = 8  # the dihedral group of the square: 4 rotations, each also mirrored


def views(images: np.ndarray) -> np.ndarray:
    """[N,S,S,3] -> [N*VIEWS,S,S,3], image i's views at rows i*VIEWS .. i*VIEWS+7 (view 0 = original)."""
    out = []
    for image in images:
        for k in range(4):
            rotated = np.rot90(image, k, axes=(0, 1))
            out += [rotated, rotated[:, ::-1]]
    return np.ascontiguousarray(np.stack(out))


def merge(outputs: list[Result], count: int) -> list[Result]:
    """Per original image: mean probabilities over its views; class map and features of view 0."""
    merged = []
    for i in range(count):
        group = outputs[i * VIEWS:(i + 1) * VIEWS]
        probs = np.mean([g[0] for g in group], axis=0)
        merged.append((probs, group[0][1], group[0][2]))
    return merged
