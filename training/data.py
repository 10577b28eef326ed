"""tf.data input pipelines over a processed dataset version (see contracts/processed.py).

Shards hold raw uint8 pixels, so "decoding" is a reshape: the pipeline parses, caches the
uint8 tensors in memory once, and only augmentation runs per epoch. Augmentation is
applied to the training split only and fits smears: flips and 90-degree rotations (a
smear has no orientation), small shifts, and colour/stain jitter (hue, saturation,
brightness, contrast, per-channel gain), because the leukemia classes differ in staining
and a model must not win on colour alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from contracts.processed import DatasetMeta, feature_spec

SHIFT_FRACTION = 0.08
HUE_DELTA = 0.04
SATURATION_RANGE = (0.7, 1.3)
BRIGHTNESS_DELTA = 0.12
CONTRAST_RANGE = (0.75, 1.25)
CHANNEL_GAIN = 0.08


def configure_threads(threads: int | None = None) -> None:
    """Size TensorFlow's thread pools for this small CPU (before any op runs)."""
    import os

    import tensorflow as tf

    n = threads or os.cpu_count() or 2
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, n))
    except RuntimeError:
        pass  # already initialised in this process: keep its settings


def shard_paths(folder: Path, meta: DatasetMeta, split: str) -> list[str]:
    return [str(folder / name) for name in meta.shards.get(split, [])]


def _parse(image_size: int, resize_to: int | None = None):
    import tensorflow as tf

    spec = feature_spec()

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        image = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [image_size, image_size, 3])
        if resize_to and resize_to != image_size:
            # The same op as the model's Resizing layer (bilinear, no antialias), done once
            # before the cache: training and augmentation then run at the network's size.
            image = tf.image.resize(tf.cast(image, tf.float32), [resize_to, resize_to], method="bilinear")
        return image, tf.cast(ex["label"], tf.int32)

    return parse


def augment_image(image, seed: Any, colour_strength: float = 1.0):
    """One random smear-preserving augmentation of an image (uint8 or float 0..255) -> float32 0..255.

    `colour_strength` scales the colour/stain jitter (0 = geometry only, 1 = the ranges above)."""
    import tensorflow as tf

    size = tf.shape(image)[0]
    seeds = tf.random.experimental.stateless_split(seed, 10)
    x = tf.cast(image, tf.float32) / 255.0  # 0..1 for the colour ops
    x = tf.image.stateless_random_flip_left_right(x, seeds[0])
    x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
    x = tf.image.rot90(x, k)
    pad = tf.cast(tf.cast(size, tf.float32) * SHIFT_FRACTION, tf.int32)
    padded = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    x = tf.image.stateless_random_crop(padded, tf.stack([size, size, 3]), seeds[3])
    k = float(colour_strength)
    if k > 0:
        x = tf.image.stateless_random_hue(x, min(0.5, HUE_DELTA * k), seeds[4])
        x = tf.image.stateless_random_saturation(x, *_scaled(SATURATION_RANGE, k), seeds[5])
        x = tf.image.stateless_random_brightness(x, BRIGHTNESS_DELTA * k, seeds[6])
        x = tf.image.stateless_random_contrast(x, *_scaled(CONTRAST_RANGE, k), seeds[7])
        gain = tf.random.stateless_uniform([1, 1, 3], seeds[8], 1 - CHANNEL_GAIN * k, 1 + CHANNEL_GAIN * k)
        x = tf.clip_by_value(x * gain, 0.0, 1.0)
    return x * 255.0


def _scaled(bounds: tuple[float, float], k: float) -> tuple[float, float]:
    """A (lo, hi) factor range around 1 widened or narrowed by k (lo stays > 0)."""
    lo, hi = bounds
    return max(0.05, 1 - (1 - lo) * k), 1 + (hi - 1) * k


def make_dataset(
    folder: Path,
    meta: DatasetMeta,
    split: str,
    batch_size: int,
    training: bool = False,
    seed: int = 1337,
    resize_to: int | None = None,
    colour_strength: float = 1.0,
) -> Any:
    """Batched (image float32 0..255, label int32) dataset of one split.

    `resize_to`: images are resized once (before the cache) to the network's input size,
    for training the size-`resize_to` twin of the served model (see training.model).
    """
    import tensorflow as tf

    files = shard_paths(folder, meta, split)
    if not files:
        raise ValueError(f"processed version {meta.dataset_version} has no {split!r} shards")
    autotune = tf.data.AUTOTUNE
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 4))
    ds = ds.map(_parse(meta.image_size, resize_to), num_parallel_calls=autotune).cache()
    if training:
        n = sum(meta.counts.get(split, {}).values()) or 1024
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        # A fresh, reproducible seed per element and epoch (stateless ops are deterministic).
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, s: (augment_image(pair[0], s, colour_strength), pair[1]), num_parallel_calls=autotune
        )
    else:
        ds = ds.map(lambda img, y: (tf.cast(img, tf.float32), y), num_parallel_calls=autotune)
    return ds.batch(batch_size).prefetch(autotune).with_options(fit_options())


def fit_options() -> Any:
    """tf.data's autotuning off: with it, Keras dropping an epoch's iterator waited ~15 s on an idle CPU
    (py-spy: ~IteratorResource joining tf.data's thread pool), so a leukemia epoch took ~41 s instead of
    ~22 s. AUTOTUNE parallelism then means the core count; the elements and their order are unchanged."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def load_split_arrays(folder: Path, meta: DatasetMeta, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [N,S,S,3]) and labels (int [N]) of a split, in shard order."""
    import tensorflow as tf

    images, labels = [], []
    ds = tf.data.TFRecordDataset(shard_paths(folder, meta, split)).map(_parse(meta.image_size)).batch(256)
    for img, y in ds.as_numpy_iterator():
        images.append(img)
        labels.append(y)
    if not images:
        return np.zeros((0, meta.image_size, meta.image_size, 3), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def load_examples_by_sha256(folder: Path, meta: DatasetMeta, shards: list[str],
                            sha256s: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [N,S,S,3]) and labels of the examples whose sha256 is in `sha256s`,
    read from the named shards (any split), in shard order."""
    import tensorflow as tf

    spec = feature_spec()
    size = meta.image_size
    images, labels = [], []
    for raw in tf.data.TFRecordDataset([str(folder / name) for name in shards]).as_numpy_iterator():
        ex = tf.io.parse_single_example(raw, spec)
        if ex["sha256"].numpy().decode() in sha256s:
            images.append(np.frombuffer(ex["image"].numpy(), np.uint8).reshape(size, size, 3))
            labels.append(int(ex["label"].numpy()))
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def class_weights(meta: DatasetMeta) -> dict[int, float]:
    """Balanced weights n / (C * n_c) from the train counts (labels with no images get 1)."""
    counts = meta.counts.get("train", {})
    total = sum(counts.values())
    c = len(meta.labels)
    return {
        i: (total / (c * counts[label]) if counts.get(label) else 1.0) for i, label in enumerate(meta.labels)
    }
