"""Macenko stain normalisation as a Keras layer: a training lever, not yet a setting.

Per image (Macenko et al., 2009, "A method for normalizing histology slides"): optical density
OD = -ln((255 x + 1) / 256) of pixels in 0..1; the stained pixels (OD >= BETA in ANY channel) give
the plane of the two largest eigenvectors of their OD covariance; the two stain vectors are
the directions at the ALPHA-th and (100 - ALPHA)-th percentile angle in that plane, haematoxylin
the one that absorbs more red. Each pixel's two stain concentrations (least squares) are scaled so
that their 99th percentile matches a reference, and the image is rebuilt with the reference stain
vectors. Macenko's own rule keeps only pixels with OD >= BETA in EVERY channel; on blood smears
that drops the eosin-stained red cells (they barely absorb red), the plane is then fitted to the
nuclei alone and flips between images: on 32 leukemia fields a stain shift (H x 1.3, E x 0.75)
moved the normalised pixels by 0.081 on average against 0.040 unnormalised; with ANY channel,
0.019 (and 0.0013 against 0.013 on the two-stain images of tests/unit/test_stain.py). On these
Romanowsky-stained fields the rebuilt image shows the nuclei in the eosin colour: the mapping is
consistent, not an H&E rendering. Unlike the per-image channel standardisation (`training.model.STAIN_PER_IMAGE`), it
separates the two stains, so a lab whose haematoxylin is stronger and eosin weaker is mapped back.

Why a lever only: the exported TFLite graph has no eigen-decomposition builtin, so serving could
not apply it (it would need a closed-form 3x3 solver); it is measured first (benchmarks/levers.py
and benchmarks/accuracy.py --lever stain_macenko).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Macenko's reference stain vectors (columns: haematoxylin, eosin; RGB optical density, unit length)
# and the 99th-percentile concentrations of his reference slide.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=np.float32)
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308], dtype=np.float32)
BETA = 0.15  # OD below this in any channel: background, left out of the stain estimate
ALPHA = 0.01  # robust extreme angles: the 1st and 99th percentile, not the minimum and maximum
CONCENTRATION_PERCENTILE = 0.99
MIN_STAINED_PIXELS = 64  # fewer stained pixels (a blank field): the image passes unchanged


def _masked_quantile(values: Any, mask: Any, count: Any, q: float) -> Any:
    """Per row of values [B, P]: the q-quantile of the entries where mask [B, P] is 1."""
    import tensorflow as tf

    ordered = tf.sort(tf.where(mask > 0, values, tf.fill(tf.shape(values), np.float32(1e9))), axis=1)
    index = tf.cast(tf.floor(q * tf.maximum(count - 1.0, 0.0)), tf.int32)
    return tf.gather(ordered, index[:, None], batch_dims=1)[:, 0]


def macenko(images: Any) -> Any:
    """images [B, H, W, 3] float in 0..1 -> the same images in the reference stains (float 0..1)."""
    import tensorflow as tf

    x = tf.stop_gradient(tf.convert_to_tensor(images, tf.float32))
    batch = tf.shape(x)[0]
    od = tf.reshape(-tf.math.log((x * 255.0 + 1.0) / 256.0), [batch, -1, 3])  # [B, P, 3]
    mask = tf.cast(tf.reduce_any(od >= BETA, axis=-1), tf.float32)  # [B, P]
    count = tf.reduce_sum(mask, axis=1)  # [B]
    weights = mask[..., None]
    mean = tf.reduce_sum(od * weights, axis=1) / tf.maximum(count, 1.0)[:, None]
    centred = (od - mean[:, None, :]) * weights
    covariance = tf.einsum("bpi,bpj->bij", centred, centred) / tf.maximum(count - 1.0, 1.0)[:, None, None]
    _, vectors = tf.linalg.eigh(covariance + 1e-6 * tf.eye(3))  # ascending eigenvalues
    plane = tf.reverse(vectors[:, :, 1:], axis=[2])  # [B, 3, 2], the largest first
    plane = plane * tf.where(plane[:, :1, :] < 0.0, -1.0, 1.0)  # optical densities point the positive way
    projected = tf.einsum("bpi,bij->bpj", od, plane)
    angle = tf.atan2(projected[..., 1], projected[..., 0])
    ends = [_masked_quantile(angle, mask, count, q) for q in (ALPHA, 1.0 - ALPHA)]
    low, high = (tf.einsum("bij,bj->bi", plane, tf.stack([tf.cos(a), tf.sin(a)], axis=-1)) for a in ends)
    haematoxylin_first = low[:, :1] > high[:, :1]
    stains = tf.stack([tf.where(haematoxylin_first, low, high), tf.where(haematoxylin_first, high, low)], axis=-1)
    stains = stains / tf.maximum(tf.norm(stains, axis=1, keepdims=True), 1e-6)  # [B, 3, 2]
    gram = tf.einsum("bik,bil->bkl", stains, stains) + 1e-6 * tf.eye(2)
    concentrations = tf.einsum("bkj,bpj->bpk", tf.linalg.solve(gram, tf.transpose(stains, [0, 2, 1])), od)
    top = tf.sort(concentrations, axis=1)
    n_pixels = tf.shape(concentrations)[1]
    at = tf.cast(tf.floor(CONCENTRATION_PERCENTILE * tf.cast(n_pixels - 1, tf.float32)), tf.int32)
    max_concentrations = tf.maximum(top[:, at, :], 1e-6)  # [B, 2]
    concentrations = concentrations * (REFERENCE_MAX_CONCENTRATIONS / max_concentrations)[:, None, :]
    rebuilt = tf.einsum("bpk,ik->bpi", concentrations, REFERENCE_STAINS)
    out = tf.clip_by_value((256.0 * tf.exp(-rebuilt) - 1.0) / 255.0, 0.0, 1.0)
    out = tf.reshape(out, tf.shape(x))
    return tf.where((count >= MIN_STAINED_PIXELS)[:, None, None, None], out, x)


def macenko_layer(name: str) -> Any:
    """A Keras layer applying `macenko` (no weights; built here so `keras` is imported lazily)."""
    from keras import layers

    return layers.Lambda(macenko, name=name)
