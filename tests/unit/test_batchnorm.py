"""Precise BatchNorm: after the refresh, inference normalises with the data's own statistics."""

from __future__ import annotations

import numpy as np
import pytest

from training.batchnorm import (
    PRECISE_BN_AFTER_FIT,
    batchnorm_layers,
    refresh_batchnorm_statistics,
    refresh_before_validation,
    statistics_stride,
)

def _model_and_batches():
    import keras
    import tensorflow as tf

    from training.model import build_model

    net = build_model(2, 32, 32, width=4, depth=3, seed=7)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(40, 32, 32, 3)).astype(np.float32)
    # Training-mode calls with very different inputs leave moving statistics that do not fit `images`.
    net(np.full((8, 32, 32, 3), 250.0, np.float32), training=True)
    batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(40, np.int32))).batch(16)
    return keras, net, images, batches


def test_every_batchnorm_layer_gets_its_inputs_population_mean_and_variance():
    keras, net, images, batches = _model_and_batches()
    assert refresh_batchnorm_statistics(net, batches) == len(batchnorm_layers(net)) == 5
    for layer in batchnorm_layers(net):
        inputs = np.asarray(keras.Model(net.input, layer.input)(images, training=False), np.float64)
        inputs = inputs.reshape(-1, inputs.shape[-1])
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(axis=0), rtol=1e-3, atol=1e-5)


def test_after_the_refresh_inference_outputs_are_normalised_on_that_data():
    keras, net, images, batches = _model_and_batches()
    layer = batchnorm_layers(net)[-1]
    before = np.asarray(keras.Model(net.input, layer.output)(images, training=False)).reshape(-1, layer.output.shape[-1])
    refresh_batchnorm_statistics(net, batches)
    after = np.asarray(keras.Model(net.input, layer.output)(images, training=False)).reshape(-1, layer.output.shape[-1])
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    np.testing.assert_allclose(after.mean(axis=0), beta, atol=1e-3)
    np.testing.assert_allclose(after.std(axis=0), np.abs(gamma), rtol=1e-2)
    assert not np.allclose(before.mean(axis=0), beta, atol=1e-2)  # the stale statistics did not fit the data


def test_no_batches_is_a_clear_error():
    keras, net, images, batches = _model_and_batches()
    with pytest.raises(ValueError, match="at least one batch"):
        refresh_batchnorm_statistics(net, batches.take(0))


def test_the_sample_is_every_kth_image_capped_at_the_limit():
    assert statistics_stride(100, limit=4096) == 1
    assert statistics_stride(8300, limit=4096) == 3
    assert len(range(0, 8300, statistics_stride(8300, limit=4096))) <= 4096


def test_the_callback_refreshes_the_statistics_before_each_validation():
    keras, net, images, batches = _model_and_batches()
    net.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(batchnorm_layers(net)[0].moving_mean.numpy().copy())

    net.fit(batches, validation_data=batches, epochs=2, verbose=0,
            callbacks=[refresh_before_validation(batches), Record()])
    first = batchnorm_layers(net)[0]
    inputs = np.asarray(keras.Model(net.input, first.input)(images, training=False), np.float64)
    np.testing.assert_allclose(seen[-1], inputs.reshape(-1, inputs.shape[-1]).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_the_precise_bn_lever_leaves_the_served_model_with_the_training_images_statistics():
    import keras

    from training import experiment as ex

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    data = ex.FolderData(images=images, y=np.arange(48) % 2, sha256=[str(i) for i in range(48)],
                         labels=["a", "b"], positive_label=None)
    idx = {"train": np.arange(32), "val": np.arange(32, 48)}
    lever = ex.Lever(input_size=32, width=4, depth=2, epochs=1, batch_size=16, precise_bn=PRECISE_BN_AFTER_FIT)
    model, _, _ = ex.fit(data, idx, lever)
    first = batchnorm_layers(model)[0]
    inputs = np.asarray(keras.Model(model.input, first.input)(images[:32].astype(np.float32), training=False))
    np.testing.assert_allclose(first.moving_mean.numpy(), inputs.reshape(-1, inputs.shape[-1]).mean(axis=0),
                               rtol=1e-4, atol=1e-5)


def test_an_unknown_precise_bn_mode_is_a_clear_error():
    from training import experiment as ex

    data = ex.FolderData(images=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 0, 1]), sha256=list("abcd"),
                         labels=["a", "b"], positive_label=None)
    with pytest.raises(ValueError, match="precise_bn must be one of"):
        ex.fit(data, {"train": np.arange(2), "val": np.arange(2, 4)}, ex.Lever(input_size=8, precise_bn="yes"))
