"""The optimiser and its learning-rate schedule: one place for every fit (training.fitting, training.experiment).

`cosine` (the default): a linear warm-up over the first epoch up to LEARNING_RATE, then a cosine
decay to LR_FLOOR_FRACTION x LEARNING_RATE at the last epoch. The rate at every step depends only
on the step and EPOCHS, so the run is as reproducible as before, and the last epochs train at a
small rate: the weights and BatchNorm statistics early stopping restores come from a settled
model rather than one still taking 2e-3 steps (a constant rate let a 128 px leukemia run swing
between 0.97 and 0.11 validation accuracy from one epoch to the next).

`plateau` (before): a constant LEARNING_RATE halved by ReduceLROnPlateau on val_loss plateaus.
"""

from __future__ import annotations

import math
from typing import Any

COSINE = "cosine"
PLATEAU = "plateau"
LR_SCHEDULES = (COSINE, PLATEAU)
WARMUP_EPOCHS = 1
LR_FLOOR_FRACTION = 0.01
NO_WEIGHT_DECAY = ("bias", "gamma", "beta")  # variable names AdamW leaves alone


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    return max(1, math.ceil(train_images / batch_size))


def learning_rate_schedule(learning_rate: float, schedule: str, epochs: int, steps: int) -> Any:
    """The rate Adam is given: a float (plateau) or a Keras schedule of the step (cosine).

    `steps` = optimiser steps per epoch."""
    import keras

    if schedule == PLATEAU:
        return float(learning_rate)
    if schedule != COSINE:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    warmup = steps * WARMUP_EPOCHS if epochs > WARMUP_EPOCHS else 0
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate * (LR_FLOOR_FRACTION if warmup else 1.0),
        decay_steps=max(1, steps * epochs - warmup),
        alpha=LR_FLOOR_FRACTION, warmup_target=learning_rate if warmup else None, warmup_steps=warmup,
    )


def make_optimizer(learning_rate: float, schedule: str, epochs: int, steps: int, weight_decay: float = 0.0) -> Any:
    """Adam with the named schedule; with `weight_decay` > 0, AdamW (decoupled: each step shrinks a
    weight by rate x weight_decay), sparing biases and BatchNorm's gamma and beta."""
    import keras

    rate = learning_rate_schedule(learning_rate, schedule, epochs, steps)
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, not {weight_decay}")
    if weight_decay == 0:
        return keras.optimizers.Adam(rate)
    optimizer = keras.optimizers.AdamW(rate, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def reduces_on_plateau(schedule: str) -> bool:
    """Whether the fit also halves the rate on plateaus (only a constant rate can be changed by a callback)."""
    return schedule == PLATEAU
