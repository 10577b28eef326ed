"""The learning-rate schedule every fit uses (training.schedule)."""

from __future__ import annotations

import numpy as np
import pytest

from training.schedule import (
    COSINE,
    LR_FLOOR_FRACTION,
    PLATEAU,
    learning_rate_schedule,
    make_optimizer,
    reduces_on_plateau,
    steps_per_epoch,
)
from training.stopping import reproducible_callbacks


def test_cosine_warms_up_for_one_epoch_then_decays_to_the_floor():
    schedule = learning_rate_schedule(2e-3, COSINE, epochs=10, steps=50)
    rates = np.array([float(schedule(step)) for step in range(0, 501, 10)])
    peak = int(np.argmax(rates)) * 10
    assert rates[0] == pytest.approx(2e-3 * LR_FLOOR_FRACTION)
    assert peak == 50 and rates.max() == pytest.approx(2e-3, rel=1e-5)
    assert np.all(np.diff(rates[:6]) > 0) and np.all(np.diff(rates[5:]) <= 1e-12)
    assert rates[-1] == pytest.approx(2e-3 * LR_FLOOR_FRACTION, rel=1e-3)


def test_one_epoch_cosine_has_no_warm_up():
    schedule = learning_rate_schedule(1e-3, COSINE, epochs=1, steps=20)
    assert float(schedule(0)) == pytest.approx(1e-3, rel=1e-5)
    assert float(schedule(20)) == pytest.approx(1e-3 * LR_FLOOR_FRACTION, rel=1e-3)


def test_plateau_is_a_constant_rate_with_the_plateau_callback():
    opt = make_optimizer(2e-3, PLATEAU, epochs=10, steps=50)
    assert float(opt.learning_rate) == pytest.approx(2e-3)
    names = lambda s: [type(c).__name__ for c in reproducible_callbacks(3, 60.0, 0, reduces_on_plateau(s))[0]]
    assert "ReduceLROnPlateau" in names(PLATEAU)
    assert "ReduceLROnPlateau" not in names(COSINE)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        make_optimizer(1e-3, "linear", epochs=3, steps=5)


def test_steps_per_epoch_rounds_up_and_is_never_zero():
    assert steps_per_epoch(65, 32) == 3
    assert steps_per_epoch(0, 32) == 1


def test_settings_accept_exactly_the_schedules_training_knows():
    from typing import get_args

    from contracts.settings import Settings
    from training.schedule import LR_SCHEDULES

    field = Settings.model_fields["lr_schedule"]
    assert set(get_args(field.annotation)) == set(LR_SCHEDULES)
    assert field.default == COSINE


def test_weight_decay_shrinks_kernels_and_spares_biases_and_batchnorm():
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs)))
    net = keras.Model(inputs, outputs)
    for layer in net.layers[1:]:
        for v in layer.weights:
            v.assign(np.ones(v.shape, "float32"))
    optimizer = make_optimizer(1e-1, PLATEAU, epochs=1, steps=1, weight_decay=0.5)
    before = {v.path: v.numpy().copy() for v in net.trainable_variables}
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in net.trainable_variables])
    for v in net.trainable_variables:
        name = v.path.rsplit("/", 1)[-1]
        shrunk = v.numpy() < before[v.path]
        assert shrunk.all() if name == "kernel" else not shrunk.any(), name
    assert type(make_optimizer(1e-3, COSINE, 2, 5)).__name__ == "Adam"
    with pytest.raises(ValueError, match="weight decay must be >= 0"):
        make_optimizer(1e-3, COSINE, 2, 5, weight_decay=-1.0)
