"""Fit and evaluate one model on a processed dataset version: data -> Keras fit -> metrics.

No MLflow here: the caller (training/train.py) logs what `fit_and_evaluate` returns and passes
`on_epoch` to see each epoch. TensorFlow/Keras are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.processed import DatasetMeta
from contracts.settings import Settings
from training.errors import Diverged

log = logging.getLogger("training")
# bundle.json key and MLflow metric: how many networks the served model averages (the param
# model_ensemble_size says how many were asked for; the time budget may leave some out).
ENSEMBLE_MEMBERS_KEY = "ensemble_members"


@dataclass(frozen=True)
class FitRequest:
    """What one fit needs: settings (training fields), the processed version and its local copy."""

    settings: Settings
    meta: DatasetMeta
    folder: Path
    verbose: int = 0  # Keras' fit verbosity (the CLI shows a progress bar)
    on_epoch: Callable[[int, dict], None] | None = None
    initial_weights: list[Any] | None = None  # warm start (training/warm_start.py); None = random init


@dataclass
class FitResult:
    """The served model (input IMAGE_SIZE) and everything measured on it."""

    model: Any
    history: dict[str, list[float]]
    model_params: int
    stop_reason: str  # epochs | early_stopping | time_budget (training.stopping)
    ensemble_members: int  # networks in the served model (ENSEMBLE_MEMBERS_KEY)
    calibration: dict[str, Any]  # bundle.json `calibration` (training.calibration.calibrate)
    labels: list[str]
    positive_label: str | None  # binary tasks only
    threshold: float | None  # chosen on validation for the target sensitivity (binary tasks)
    threshold_rule: str | None  # how (training.evaluate.THRESHOLD_RULES); None for multiclass
    target_sensitivity: float | None  # what for; None for multiclass
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    val_x: np.ndarray
    val_y: np.ndarray
    val_p: np.ndarray  # the (calibrated) model's probabilities on val_x
    test_y: np.ndarray
    test_p: np.ndarray

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    @property
    def stopped_for_time_budget(self) -> bool:
        from training.stopping import TIME_BUDGET

        return self.stop_reason == TIME_BUDGET

    @property
    def epochs_run(self) -> int:
        return len(self.history["loss"])

    def threshold_rule_record(self) -> dict[str, Any]:
        """bundle.json's `threshold_rule` entry (contracts.bundle.THRESHOLD_RULE_KEY), so the served model
        can say how its threshold was read off validation; nothing for multiclass."""
        from contracts.bundle import THRESHOLD_RULE_KEY

        if self.threshold_rule is None:
            return {}
        return {THRESHOLD_RULE_KEY: {"rule": self.threshold_rule, "target_sensitivity": self.target_sensitivity}}


def _callbacks(s: Settings, budget_s: float, on_epoch: Callable[[int, dict], None] | None):
    """Early stopping / epochs end the run; the wall-clock budget is a safety stop (training.stopping)."""
    import keras

    from training.schedule import reduces_on_plateau
    from training.stopping import reproducible_callbacks

    class EpochHook(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if on_epoch is not None:
                on_epoch(epoch, dict(logs or {}))

    callbacks, stops = reproducible_callbacks(s.early_stopping_patience, budget_s,
                                             s.early_stopping_start_epoch, reduces_on_plateau(s.lr_schedule))
    return [*callbacks, EpochHook()], stops


def _finite(history: dict[str, list[float]], model) -> bool:
    losses = history.get("loss", [])
    if not losses or any(not math.isfinite(v) for v in losses):
        return False
    return all(np.isfinite(w).all() for w in model.get_weights())


def pick_canaries(images: np.ndarray, y: np.ndarray, labels: list[str], count: int):
    """Up to `count` images, round-robin over labels, so every class has a canary when possible."""
    order: list[int] = []
    per_label = [list(np.flatnonzero(y == k)) for k in range(len(labels))]
    while len(order) < min(count, len(y)) and any(per_label):
        for bucket in per_label:
            if bucket and len(order) < count:
                order.append(int(bucket.pop(0)))
    return images[order], [labels[int(y[i])] for i in order]


@dataclass
class _Member:
    """One trained network of the (possibly one-member) ensemble."""

    net: Any
    history: dict[str, list[float]]
    stop_reason: str  # training.stopping.STOP_REASONS


def _fit_member(req: FitRequest, seed: int, budget_s: float, first_epoch: int) -> _Member:
    """Train one network at the network's input size with `seed` (init, shuffling, augmentation)."""
    import keras

    from training.data import class_weights, make_dataset
    from training.model import build_model
    from training.schedule import make_optimizer, steps_per_epoch
    from training.stopping import enable_determinism, stop_reason

    s, meta, folder = req.settings, req.meta, req.folder
    enable_determinism(seed)
    size = s.train_input_size
    train_ds = make_dataset(folder, meta, "train", s.batch_size, training=True, seed=seed, resize_to=size,
                            colour_strength=s.train_colour_strength)
    val_ds = make_dataset(folder, meta, "val", s.batch_size, resize_to=size)
    # BatchNorm on TensorFlow's fused kernel: the same function, 0.69x the step time here (README, Benchmarks)
    net = build_model(len(meta.labels), size, size, s.model_width, s.model_depth, seed=seed,
                      stain_normalisation=s.model_stain_normalisation, fused_batchnorm=True)
    if req.initial_weights is not None:
        net.set_weights(req.initial_weights)
    net.compile(
        optimizer=make_optimizer(s.learning_rate, s.lr_schedule, s.epochs,
                                 steps_per_epoch(sum(meta.counts.get("train", {}).values()), s.batch_size)),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    on_epoch = req.on_epoch
    hook = None if on_epoch is None else (lambda epoch, logs: on_epoch(first_epoch + epoch, logs))
    callbacks, stops = _callbacks(s, budget_s, hook)
    history = net.fit(
        train_ds, validation_data=val_ds, epochs=s.epochs, class_weight=class_weights(meta),
        callbacks=callbacks, verbose=req.verbose,
    ).history
    if not _finite(history, net):
        raise Diverged(f"training of {meta.dataset} {meta.dataset_version} diverged (NaN/inf loss); "
                       "the run is marked FAILED and nothing was registered", net.count_params())
    return _Member(net, history, stop_reason(stops, len(history["loss"]), s.epochs))


def ensemble_stop_reason(reasons: list[str], members_wanted: int) -> str:
    """The run's stop reason from its members' (`reasons`, of the members that began): the clock if it
    cut any member or left one untrained, else early stopping if any member stopped early, else epochs."""
    from training.stopping import EARLY_STOPPING, EPOCHS, TIME_BUDGET

    if TIME_BUDGET in reasons or len(reasons) < members_wanted:
        return TIME_BUDGET
    return EARLY_STOPPING if EARLY_STOPPING in reasons else EPOCHS


@dataclass(frozen=True)
class _Fitted:
    """The served model of `_fit` and how its training went."""

    model: Any
    history: dict[str, list[float]]  # every member's epochs in turn
    stop_reason: str
    members: int


def _fit(req: FitRequest) -> _Fitted:
    """Train MODEL_ENSEMBLE_SIZE networks (seeds SEED, SEED+1, ...) within one wall-clock budget and
    assemble the ones that finished into the served model."""
    import time

    from training.data import configure_threads
    from training.model import assemble_ensemble
    from training.stopping import TIME_BUDGET

    s, meta = req.settings, req.meta
    configure_threads()
    started, members, reasons = time.monotonic(), [], []
    for i in range(s.model_ensemble_size):
        elapsed = time.monotonic() - started
        if members and s.train_time_budget_s - elapsed < elapsed / len(members):
            log.warning("ensemble member %d of %d not trained: the %.0f s training budget leaves less than a "
                        "member's fit", i + 1, s.model_ensemble_size, s.train_time_budget_s)
            break
        first_epoch = sum(len(m.history["loss"]) for m in members)
        member = _fit_member(req, s.seed + i, s.train_time_budget_s - elapsed, first_epoch)
        reasons.append(member.stop_reason)
        if members and member.stop_reason == TIME_BUDGET:  # a later member the clock cut is under-trained
            log.warning("ensemble member %d of %d dropped: the training budget cut it", i + 1, s.model_ensemble_size)
            break
        members.append(member)
    history = {k: [v for m in members for v in m.history.get(k, [])] for k in members[0].history}
    # The served model (input IMAGE_SIZE, Resizing inside) gets the trained weights.
    model = assemble_ensemble([m.net for m in members], len(meta.labels), meta.image_size, s.train_input_size,
                              s.model_width, s.model_depth)
    return _Fitted(model, history, ensemble_stop_reason(reasons, s.model_ensemble_size), len(members))


def fit_and_evaluate(req: FitRequest) -> FitResult:
    """Fit, then evaluate: temperature and threshold are chosen on validation, the figures come from test."""
    from training import evaluate as ev
    from training.calibration import calibrate
    from training.data import load_split_arrays

    s, meta = req.settings, req.meta
    fitted = _fit(req)
    labels = list(meta.labels)
    val_x, val_y = load_split_arrays(req.folder, meta, "val")
    test_x, test_y = load_split_arrays(req.folder, meta, "test")
    model, calibration = calibrate(fitted.model, val_x, val_y, test_x, test_y)
    val_p = model.predict(val_x.astype(np.float32), batch_size=64, verbose=0)
    test_p = model.predict(test_x.astype(np.float32), batch_size=64, verbose=0)
    positive = meta.positive_label if len(labels) == 2 else None
    threshold = None
    if positive is not None:
        pos = labels.index(positive)
        threshold = ev.choose_threshold(val_y == pos, val_p[:, pos], s.target_sensitivity, s.threshold_rule)
        positives = int((val_y == pos).sum())
        by_rank = s.threshold_rule in (ev.THRESHOLD_CONFORMAL, ev.THRESHOLD_QUANTILE)
        if by_rank and not ev.conformal_guarantee_holds(positives, s.target_sensitivity):
            log.warning("only %d %s images in validation: too few for the %s threshold to keep sensitivity "
                        "%.3f on unseen images; the threshold is the lowest of their scores", positives, positive,
                        s.threshold_rule, s.target_sensitivity)
    return FitResult(
        model=model, history=fitted.history, model_params=fitted.model.count_params(),
        stop_reason=fitted.stop_reason, ensemble_members=fitted.members, calibration=calibration, labels=labels,
        positive_label=positive, threshold=threshold, threshold_rule=s.threshold_rule if positive else None,
        target_sensitivity=s.target_sensitivity if positive else None,
        val_metrics=ev.compute_metrics(val_y, val_p, labels, positive, threshold),
        test_metrics=ev.compute_metrics(test_y, test_p, labels, positive, threshold),
        val_x=val_x, val_y=val_y, val_p=val_p, test_y=test_y, test_p=test_p,
    )
