"""Grad-CAM overlay from the model's `class_maps` output (no autodiff needed at serving time).

For a GAP -> Dense head, Grad-CAM of class c is ReLU(sum_k W[k,c] * A_k) up to a constant,
which the model already outputs per class; here it is rectified, normalised to 0..1,
upsampled to the model input, coloured with the jet colormap and blended over the image.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

DEFAULT_ALPHA = 0.45


def normalise_cam(class_map: np.ndarray) -> np.ndarray:
    """ReLU then scale to 0..1 (an all-zero map stays zero: nothing supports the class)."""
    cam = np.maximum(np.asarray(class_map, dtype=np.float32), 0.0)
    top = float(cam.max(initial=0.0))
    return cam / top if top > 0 and np.isfinite(top) else np.zeros_like(cam)


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float map to size x size."""
    img = Image.fromarray(cam.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib-style jet colormap of 0..1 values -> uint8 RGB (piecewise-linear)."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, class_map: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Blend the jet heatmap of `class_map` (h,w) over `image` (S,S,3 uint8)."""
    size = image.shape[0]
    heat = jet(upsample(normalise_cam(class_map), size)).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")
