"""Weight averaging: validation and the fit's result use the EMA of the weights; training goes on from the raw ones."""

from __future__ import annotations

import numpy as np
import pytest

from training.averaging import check_momentum, weight_average_callback

MOMENTUM = 0.9


def _fit(callbacks_after_average, epochs=3):
    import keras
    import tensorflow as tf

    from training.model import build_model

    keras.utils.set_random_seed(3)
    net = build_model(2, 32, 32, width=4, depth=3, seed=7)
    net.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy())
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(48, 32, 32, 3)).astype(np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32)
    train = tf.data.Dataset.from_tensor_slices((images[:32], labels[:32])).batch(8)
    val = tf.data.Dataset.from_tensor_slices((images[32:], labels[32:])).batch(8)
    initial = [w.numpy().copy() for w in net.weights]
    history = net.fit(train, validation_data=val, epochs=epochs, verbose=0,
                      callbacks=[weight_average_callback(MOMENTUM), *callbacks_after_average]).history
    return keras, net, val, initial, history


def _recorder():
    import keras

    class Recorder(keras.callbacks.Callback):
        """The raw weights after each batch, and the weights each batch starts from."""

        def on_train_begin(self, logs=None):
            self.after, self.before = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.before.append([w.numpy().copy() for w in self.model.weights])

        def on_train_batch_end(self, batch, logs=None):
            self.after.append([w.numpy().copy() for w in self.model.weights])

    return Recorder()


def test_the_fit_ends_with_the_moving_average_of_every_batchs_weights():
    recorder = _recorder()
    keras, net, val, initial, history = _fit([recorder])
    expected = [w.astype(np.float64) for w in initial]
    for weights in recorder.after:
        expected = [e * MOMENTUM + w * (1 - MOMENTUM) for e, w in zip(expected, weights)]
    for weight, average in zip(net.weights, expected):
        np.testing.assert_allclose(weight.numpy(), average, rtol=1e-4, atol=1e-5)
    assert not np.allclose(net.weights[0].numpy(), recorder.after[-1][0])  # not simply the last raw weights


def test_validation_scores_the_average_and_training_resumes_from_the_raw_weights():
    recorder = _recorder()
    keras, net, val, initial, history = _fit([recorder])
    assert history["val_loss"][-1] == pytest.approx(net.evaluate(val, verbose=0), rel=1e-4)
    batches_per_epoch = len(recorder.after) // len(history["loss"])
    second_epoch_start = recorder.before[batches_per_epoch]
    for started, raw in zip(second_epoch_start, recorder.after[batches_per_epoch - 1]):
        np.testing.assert_array_equal(started, raw)


def test_early_stopping_keeps_and_restores_averaged_weights():
    import keras

    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    keras, net, val, initial, history = _fit([early], epochs=4)
    best = int(np.argmin(history["val_loss"]))
    assert net.evaluate(val, verbose=0) == pytest.approx(history["val_loss"][best], rel=1e-4)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_a_momentum_outside_0_1_is_a_clear_error(momentum):
    with pytest.raises(ValueError, match="EMA momentum"):
        check_momentum(momentum)
    assert check_momentum(0.0) == 0.0


def test_the_ema_lever_has_its_own_key_and_refuses_precise_batchnorm():
    from training.batchnorm import PRECISE_BN_AFTER_FIT
    from training.experiment import FolderData, Lever, fit, lever_key

    assert lever_key("x", "c", Lever()) != lever_key("x", "c", Lever(ema_momentum=MOMENTUM))
    data = FolderData(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]), ["0" * 64] * 4, ["a", "b"], None)
    idx = {"train": np.arange(2), "val": np.arange(2, 4)}
    with pytest.raises(ValueError, match="choose one"):
        fit(data, idx, Lever(input_size=8, ema_momentum=MOMENTUM, precise_bn=PRECISE_BN_AFTER_FIT))
    with pytest.raises(ValueError, match="EMA momentum"):
        fit(data, idx, Lever(input_size=8, ema_momentum=1.0))
