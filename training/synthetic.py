"""Tiny generated smear-like images for tests and smoke runs (no real data needed).

Each class draws "cells" of a class-specific size and stain colour on a pink background,
so a small CNN learns the classes in a few epochs while the images stay a few KB.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = np.array([232, 200, 210], dtype=np.float32)
# Per-class stain colours (dark violet, light pink-violet, blue, magenta): easy to learn.
STAINS = np.array([[90, 40, 140], [190, 150, 200], [60, 80, 170], [170, 50, 120]], dtype=np.float32)


def synthetic_image(class_index: int, size: int, rng: np.random.Generator, separable: bool = True) -> np.ndarray:
    """One uint8 [size, size, 3] image; `separable=False` ignores the class (pure noise labels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.broadcast_to(BACKGROUND, (size, size, 3)).copy()
    k = class_index if separable else int(rng.integers(0, 4))
    radius = size * (0.10 + 0.07 * (k % 4))
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(radius, size - radius, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
        img[mask] = STAINS[k % len(STAINS)] * rng.uniform(0.9, 1.1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_images(labels: list[int], size: int, seed: int = 0, separable: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([synthetic_image(k, size, rng, separable) for k in labels])
