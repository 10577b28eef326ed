"""In-memory training experiments on a folder-per-class dataset, for levers and k-fold estimates.

No stack: images are read from a local folder tree (e.g. ../shared/data/leukemia), decoded
with the pipeline's own `prepare_image`, de-duplicated and split by content hash exactly as
the pipeline does (`contracts.splits`), and a model is fitted with the same network, loss,
class weights, augmentation and callbacks as `training.train`. It is how settings are
CHOSEN: `fit_and_score` measures on validation only; the test split is only touched by
`benchmarks/accuracy.py` and by the k-fold estimate, whose held-out fold is never used to
choose anything.

Content-hash folds: fold f of k holds the images whose split score lies in [f/k, (f+1)/k);
the band just after it (VAL_FRACTION_OF_REST of the rest) is that fold's validation split.
Scores are the pipeline's: a near-duplicate group takes its lowest member's (contracts.splits), so
near-copies of one field never straddle folds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.averaging import EMA_OFF
from training.batchnorm import (
    PRECISE_BN_AFTER_FIT,
    PRECISE_BN_EACH_EPOCH,
    PRECISE_BN_MODES,
    PRECISE_BN_OFF,
    refresh_batchnorm_statistics,
    refresh_before_validation,
    statistics_stride,
)
from training.calibration import logits_of
from training.model import BN_MOMENTUM, CONV_STANDARD, STAIN_NONE
from training.schedule import COSINE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VAL_FRACTION_OF_REST = 0.15 / 0.85


@dataclass
class FolderData:
    """Decoded images (uint8 [N,S,S,3]), label indices, content hashes, fingerprints and label names."""

    images: np.ndarray
    y: np.ndarray
    sha256: list[str]
    labels: list[str]
    positive_label: str | None
    fingerprints: list[str] | None = None  # contracts.near_duplicates; None: no near-duplicate groups
    folders: np.ndarray | None = None  # index into spec.class_folders of each image (Lever.subtypes)

    def fingerprint_map(self) -> dict[str, str | None] | None:
        return None if self.fingerprints is None else dict(zip(self.sha256, self.fingerprints))


@dataclass
class Lever:
    """One training configuration; defaults are the shipped settings (see `from_settings`)."""

    name: str = "baseline"
    input_size: int = 96
    width: int = 16
    depth: int = 5
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 2e-3
    lr_schedule: str = COSINE  # training.schedule.LR_SCHEDULES
    patience: int = 6
    start_epoch: int = 6  # early stopping's warm-up (EARLY_STOPPING_START_EPOCH)
    colour_strength: float = 1.0
    bn_momentum: float = BN_MOMENTUM
    precise_bn: str = PRECISE_BN_OFF  # training.batchnorm.PRECISE_BN_MODES (each_epoch: 2-3x the fit time)
    stain_normalisation: str = STAIN_NONE  # training.model.LEVER_STAIN_NORMALISATIONS (macenko: lever only)
    conv: str = CONV_STANDARD  # training.model.CONV_TYPES
    seed: int = 1337
    weight_decay: float = 0.0  # AdamW's decoupled decay (training.schedule.make_optimizer); 0: Adam
    # Train on the class folders as classes (e.g. leukemia's Benign / Early / Pre / Pro), then sum the
    # folders' probabilities into their labels: the two-class logits every read-out uses.
    subtypes: bool = False
    # Validate, keep and serve an exponential moving average of the weights (training.averaging); 0: off.
    ema_momentum: float = EMA_OFF
    # Train BatchNorm with TensorFlow's fused kernel (training.fused_batchnorm): the same function, faster.
    fused_batchnorm: bool = False


# Fields added after runs were saved: left out of lever_key at their default, so those runs keep their keys.
LEVER_FIELDS_ADDED_LATER = ("weight_decay", "subtypes", "ema_momentum", "fused_batchnorm")
_LEVER_DEFAULTS = vars(Lever())


def lever_from_settings(s, **changes: Any) -> Lever:
    base = Lever(input_size=s.train_input_size, width=s.model_width, depth=s.model_depth, epochs=s.epochs,
                 batch_size=s.batch_size, learning_rate=s.learning_rate, lr_schedule=s.lr_schedule,
                 patience=s.early_stopping_patience,
                 start_epoch=s.early_stopping_start_epoch,
                 colour_strength=s.train_colour_strength, seed=s.seed,
                 stain_normalisation=s.model_stain_normalisation)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def load_folder(root: Path, spec, image_size: int, crop: str, cache_dir: Path | None = None) -> FolderData:
    """Decode every image under root/<class folder>/ once (cached as .npz in `cache_dir`)."""
    from contracts.imaging import ImageRejected, prepare_image

    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = cache_dir / f"{spec.name}-{image_size}-{crop}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if "fingerprints" in z.files:  # a cache from before fingerprints is rebuilt
                hashes = [str(h) for h in z["sha256"]]
                folders = z["folders"] if "folders" in z.files else folder_indices(root, spec, hashes)
                return FolderData(z["images"], z["y"], hashes, spec.labels, spec.positive_label,
                                  [str(f) for f in z["fingerprints"]], folders)
    from contracts.near_duplicates import image_fingerprint

    index = spec.label_index
    seen: set[str] = set()
    images, ys, hashes, prints, folders = [], [], [], [], []
    for f, folder in enumerate(spec.class_folders):
        for path in sorted((root / folder).glob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                continue  # byte-identical duplicate: one copy, as the pipeline keeps
            try:
                images.append(prepare_image(data, image_size, crop=crop))
            except ImageRejected:
                continue
            prints.append(image_fingerprint(data))
            seen.add(sha)
            ys.append(index[spec.label_of(folder)])
            hashes.append(sha)
            folders.append(f)
    out = FolderData(np.stack(images), np.asarray(ys, np.int64), hashes, spec.labels, spec.positive_label, prints,
                     np.asarray(folders, np.int64))
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=out.images, y=out.y, sha256=np.asarray(hashes), fingerprints=np.asarray(prints),
                 folders=out.folders)
        tmp.replace(cache)
    return out


def files_by_hash(root: Path, spec) -> dict[str, tuple[int, Path]]:
    """sha256 -> (class-folder index, file) of every image under root/<class folder>/, in load_folder's
    order; a byte-identical copy keeps its first file, as load_folder keeps one."""
    found: dict[str, tuple[int, Path]] = {}
    for f, folder in enumerate(spec.class_folders):
        for path in sorted((root / folder).glob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), (f, path))
    return found


def folder_indices(root: Path, spec, hashes: list[str]) -> np.ndarray:
    """Each image's class-folder index (into spec.class_folders), found by content hash (for caches
    saved before folders were kept)."""
    found = files_by_hash(root, spec)
    missing = set(hashes) - found.keys()
    if missing:
        raise ValueError(f"{len(missing)} cached images are no longer under {root}: delete the cache")
    return np.asarray([found[h][0] for h in hashes], np.int64)


def pipeline_splits(data: FolderData, s) -> dict[str, np.ndarray]:
    """Index arrays of train/val/test exactly as the pipeline assigns them."""
    from contracts.splits import assign_splits

    assigned = assign_splits(((h, data.labels[int(y)]) for h, y in zip(data.sha256, data.y)),
                             s.val_fraction, s.test_fraction, s.split_salt, data.fingerprint_map())
    names = np.asarray([assigned[h] for h in data.sha256])
    return {split: np.flatnonzero(names == split) for split in ("train", "val", "test")}


def fold_splits(data: FolderData, k: int, fold: int, salt: str) -> dict[str, np.ndarray]:
    """Content-hash fold `fold` of `k` as test; a hash band of the rest as validation."""
    from contracts.splits import grouped_scores

    by_sha = grouped_scores(data.sha256, salt, data.fingerprint_map())
    scores = np.asarray([by_sha[h] for h in data.sha256])
    lo, hi = fold / k, (fold + 1) / k
    test = (scores >= lo) & (scores < hi)
    # Rotate the remaining scores so the validation band starts right after the test fold.
    rest = (scores - hi) % 1.0 / (1.0 - (hi - lo))
    val = ~test & (rest < VAL_FRACTION_OF_REST)
    return {"train": np.flatnonzero(~test & ~val), "val": np.flatnonzero(val), "test": np.flatnonzero(test)}


def _dataset(images: np.ndarray, y: np.ndarray, lever: Lever, training: bool):
    import tensorflow as tf

    from training.data import augment_image

    ds = tf.data.Dataset.from_tensor_slices((images, y.astype(np.int32)))
    size = images.shape[1]
    if lever.input_size != size:
        ds = ds.map(lambda im, t: (tf.image.resize(tf.cast(im, tf.float32), [lever.input_size] * 2,
                                                   method="bilinear"), t))
    ds = ds.cache()
    if training:
        ds = ds.shuffle(len(y), seed=lever.seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=lever.seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, sd: (augment_image(pair[0], sd, lever.colour_strength), pair[1]))
    else:
        ds = ds.map(lambda im, t: (tf.cast(im, tf.float32), t))
    return ds.batch(lever.batch_size).prefetch(2)


def fit(data: FolderData, idx: dict[str, np.ndarray], lever: Lever, time_budget_s: float = 1e9, verbose: int = 0):
    """Fit one model as training.train does; returns (served-size model, history, stop reason)."""
    import keras

    from training.averaging import check_momentum, weight_average_callback
    from training.data import configure_threads
    from training.model import build_model, served_twin
    from training.schedule import make_optimizer, reduces_on_plateau, steps_per_epoch
    from training.stopping import enable_determinism, reproducible_callbacks, stop_reason

    if lever.precise_bn not in PRECISE_BN_MODES:
        raise ValueError(f"precise_bn must be one of {PRECISE_BN_MODES}, not {lever.precise_bn!r}")
    if check_momentum(lever.ema_momentum) != EMA_OFF and lever.precise_bn != PRECISE_BN_OFF:
        raise ValueError("ema_momentum and precise_bn each set the BatchNorm statistics: choose one")
    configure_threads()
    enable_determinism(lever.seed)
    n_labels = len(data.labels)
    tr, va = idx["train"], idx["val"]
    counts = np.bincount(data.y[tr], minlength=n_labels)
    weights = {i: (len(tr) / (n_labels * c) if c else 1.0) for i, c in enumerate(counts)}
    targets, n_classes = data.y, n_labels
    if lever.subtypes:  # each folder a class, weighted as its label is, so the labels keep their balance
        targets, folder_label = data.folders, subtype_labels(data)
        n_classes = len(folder_label)
        weights = {f: weights[label] for f, label in enumerate(folder_label)}
    net = build_model(n_classes, lever.input_size, lever.input_size, lever.width, lever.depth, seed=lever.seed,
                      bn_momentum=lever.bn_momentum, stain_normalisation=lever.stain_normalisation,
                      conv=lever.conv, fused_batchnorm=lever.fused_batchnorm)
    steps = steps_per_epoch(len(tr), lever.batch_size)
    net.compile(optimizer=make_optimizer(lever.learning_rate, lever.lr_schedule, lever.epochs, steps,
                                         lever.weight_decay),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    callbacks, stops = reproducible_callbacks(lever.patience, time_budget_s, lever.start_epoch,
                                              reduces_on_plateau(lever.lr_schedule))
    statistics = None  # un-augmented training images for precise BatchNorm
    if lever.precise_bn != PRECISE_BN_OFF:
        sample = tr[:: statistics_stride(len(tr))]
        statistics = _dataset(data.images[sample], data.y[sample], lever, False)
    if lever.precise_bn == PRECISE_BN_EACH_EPOCH:
        callbacks = [refresh_before_validation(statistics), *callbacks]
    if lever.ema_momentum != EMA_OFF:  # first, so validation and early stopping see the average
        callbacks = [weight_average_callback(lever.ema_momentum), *callbacks]
    history = net.fit(_dataset(data.images[tr], targets[tr], lever, True),
                      validation_data=_dataset(data.images[va], targets[va], lever, False),
                      epochs=lever.epochs, class_weight=weights, callbacks=callbacks, verbose=verbose).history
    if lever.precise_bn == PRECISE_BN_AFTER_FIT:
        refresh_batchnorm_statistics(net, statistics)
    model = served_twin(net, n_classes, data.images.shape[1], lever.input_size, lever.width, lever.depth)
    if lever.subtypes:
        model = summed_into_labels(model, subtype_labels(data), n_labels)
    return model, history, stop_reason(stops, len(history["loss"]), lever.epochs)


def subtype_labels(data: FolderData) -> list[int]:
    """The label index of each class folder (folder index -> label index), from the images themselves."""
    if data.folders is None:
        raise ValueError("the subtypes lever needs each image's class folder (FolderData.folders)")
    pairs = dict(zip(data.folders.tolist(), data.y.tolist()))
    return [pairs[f] for f in range(max(pairs) + 1)]


def summed_into_labels(model: Any, folder_label: list[int], n_labels: int) -> Any:
    """A folder-class model as a label model: its LOGITS_LAYER gives log(sum of each label's folders'
    probabilities), so every read-out (temperature, thresholds, TTA) works on label logits."""
    import keras

    from training.model import LOGITS_LAYER, PROBABILITIES_LAYER

    members = np.zeros((len(folder_label), n_labels), np.float32)
    members[np.arange(len(folder_label)), folder_label] = 1.0
    folder_logits = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output, name="folder_logits")
    inputs = keras.Input(shape=model.inputs[0].shape[1:], name=model.inputs[0].name)
    summed = keras.layers.Lambda(
        lambda z: keras.ops.log(keras.ops.matmul(keras.ops.softmax(z), members) + 1e-12), name=LOGITS_LAYER
    )(folder_logits(inputs))
    outputs = keras.layers.Activation("softmax", dtype="float32", name=PROBABILITIES_LAYER)(summed)
    return keras.Model(inputs, outputs, name=model.name)


def score(data: FolderData, idx: np.ndarray, logits: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """compute_metrics on one split (probabilities = softmax of logits)."""
    from training.calibration import softmax
    from training.evaluate import compute_metrics

    return compute_metrics(data.y[idx], softmax(logits), data.labels, data.positive_label, threshold)


def sensitivity_at_specificity(is_pos: np.ndarray, p_pos: np.ndarray, min_specificity: float) -> float:
    """Best sensitivity over thresholds that keep specificity >= min_specificity (an ROC read-out)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_pos.astype(int), p_pos)
    ok = fpr <= 1.0 - min_specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def lever_key(dataset: str, crop: str, lever: Lever, splits: str = "pipeline") -> str:
    """Identity of one (dataset, crop, training configuration, split) run, for its saved logits."""
    from contracts.splits import SPLITS_VERSION

    payload = {k: v for k, v in vars(lever).items()
               if k != "name" and not (k in LEVER_FIELDS_ADDED_LATER and v == _LEVER_DEFAULTS[k])}
    identity = (dataset, crop, sorted(payload.items()), splits)
    if SPLITS_VERSION > 1:  # logits saved on the splits before near-duplicate groups keep their old keys
        identity += (SPLITS_VERSION,)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def fit_and_score(data: FolderData, idx: dict[str, np.ndarray], lever: Lever, time_budget_s: float = 1e9,
                  verbose: int = 0, save_logits: Path | None = None,
                  extra_arrays: Callable[[Any], dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Train one lever and report its VALIDATION figures (never the test split).

    With `save_logits`, the val and test logits are written there (npz) unread, so the
    configuration finally chosen on validation is measured on test without retraining;
    `extra_arrays(model)` adds arrays to that file (e.g. pooled features for the out-of-scope detector)."""
    from training.calibration import fit_temperature

    started = time.monotonic()
    model, history, reason = fit(data, idx, lever, time_budget_s, verbose)
    fit_s = time.monotonic() - started
    val_logits = logits_of(model, data.images[idx["val"]])
    if save_logits is not None:
        save_logits.parent.mkdir(parents=True, exist_ok=True)
        extra = extra_arrays(model) if extra_arrays is not None else {}
        tmp = save_logits.with_suffix(".tmp.npz")
        np.savez(tmp, val_idx=idx["val"], test_idx=idx["test"], val_logits=val_logits,
                 test_logits=logits_of(model, data.images[idx["test"]]), epochs_run=len(history["loss"]),
                 stop_reason=reason, fit_s=fit_s, **extra)
        tmp.replace(save_logits)
    val = score(data, idx["val"], val_logits)
    out = {"lever": lever.name, "epochs_run": len(history["loss"]), "stop_reason": reason,
           "fit_s": round(fit_s, 1), "val_loss": float(min(history["val_loss"])),
           "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "val_roc_auc": val["roc_auc"],
           "val_ece": val["ece"], "temperature": fit_temperature(val_logits, data.y[idx["val"]]),
           "val_accuracy_by_epoch": [round(float(v), 4) for v in history["val_accuracy"]]}
    if data.positive_label is not None:
        pos = data.labels.index(data.positive_label)
        from training.calibration import softmax

        out["val_sens_at_spec97"] = sensitivity_at_specificity(data.y[idx["val"]] == pos,
                                                               softmax(val_logits)[:, pos], 0.97)
    return out
