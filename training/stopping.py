"""Why a training run ended, and the callbacks that make the end reproducible.

The default run ends by `EPOCHS` or by early stopping on validation loss (best weights
restored). Early stopping watches only from `EARLY_STOPPING_START_EPOCH` on: a warm-up epoch's
low but noisy validation loss can neither end the run nor be the weights it restores (in a 3-fold
estimate two of three models had stopped with epoch 2-3 weights). With a fixed seed and deterministic ops the same data gives the same model on a
busy or an idle machine. The wall-clock budget (`TRAIN_TIME_BUDGET_S`) is only a safety stop;
when it fires the model depends on the machine's speed, and the run says so in its
`stop_reason` (one of STOP_REASONS), logged to MLflow as a tag and a param.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

EPOCHS = "epochs"
EARLY_STOPPING = "early_stopping"
TIME_BUDGET = "time_budget"
STOP_REASONS = (EPOCHS, EARLY_STOPPING, TIME_BUDGET)
TAG_STOP_REASON = "stop_reason"


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops (and tf.data) deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except (AttributeError, RuntimeError):  # pragma: no cover - very old or already-running TF
        pass


@dataclass
class Stops:
    """The stopping callbacks of one fit, read after it to name the stop reason."""

    early: Any
    budget: Any


def stop_reason(stops: Stops, epochs_run: int, max_epochs: int) -> str:
    """epochs | early_stopping | time_budget for a finished fit."""
    if stops.budget.stopped_for_budget:
        return TIME_BUDGET
    if stops.early.stopped_epoch > 0 or epochs_run < max_epochs:
        return EARLY_STOPPING
    return EPOCHS


def time_budget_callback(budget_s: float):
    import keras

    class TimeBudget(keras.callbacks.Callback):
        """Safety stop: end before the next epoch would overrun the wall-clock budget."""

        def __init__(self) -> None:
            super().__init__()
            self.budget_s = budget_s
            self.stopped_for_budget = False

        def on_train_begin(self, logs=None):
            self.start = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= self.params.get("epochs", float("inf")):
                return  # the last epoch: EPOCHS ends the run, not the budget
            elapsed = time.monotonic() - self.start
            if elapsed + elapsed / (epoch + 1) > self.budget_s:
                self.stopped_for_budget = True
                self.model.stop_training = True

    return TimeBudget()


def reproducible_callbacks(patience: int, time_budget_s: float, start_epoch: int = 0,
                           reduce_on_plateau: bool = True) -> tuple[list[Any], Stops]:
    """NaN guard, early stopping on val_loss (best weights restored even when the last epoch
    or the budget ends the run), LR halving on plateaus (a constant-rate fit only: see
    training.schedule), and the wall-clock safety stop.

    `start_epoch` (0-based) is the warm-up: before it early stopping neither counts patience nor
    keeps weights, so a run lasts at least start_epoch + patience + 1 epochs (or all of them) and
    the restored weights are those of the best epoch from start_epoch on."""
    import keras

    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True,
                                          start_from_epoch=start_epoch, verbose=0)
    budget = time_budget_callback(time_budget_s)
    callbacks = [keras.callbacks.TerminateOnNaN(), early]
    if reduce_on_plateau:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                           patience=max(1, patience // 3), min_lr=1e-5))
    callbacks.append(budget)
    return callbacks, Stops(early=early, budget=budget)
