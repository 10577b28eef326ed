"""The fused BatchNorm kernel computes what Keras' layer computes (up to rounding), and trains the same network."""

from __future__ import annotations

import numpy as np

BN_MOMENTUM = 0.5


def _layers(channels: int, ndim: int = 4):
    import keras

    from training.fused_batchnorm import FusedBatchNormalization

    rng = np.random.default_rng(1)
    plain, fused = keras.layers.BatchNormalization(momentum=BN_MOMENTUM), FusedBatchNormalization(momentum=BN_MOMENTUM)
    gamma, beta = rng.normal(size=channels).astype(np.float32), rng.normal(size=channels).astype(np.float32)
    for layer in (plain, fused):
        layer.build((None, *[16] * (ndim - 2), channels))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return plain, fused


def _train_call(layer, x, upstream):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [layer(x, training=True).numpy(), *(g.numpy() for g in grads)]


def _traces_fused_kernel(layer, x) -> bool:
    """Whether one training-mode call of `layer`, traced, contains a FusedBatchNorm op."""
    import tensorflow as tf

    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(x).graph
    return any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def test_training_step_runs_the_fused_kernel():
    import tensorflow as tf

    x = tf.zeros((2, 4, 4, 3))
    plain, fused = _layers(3)
    assert _traces_fused_kernel(fused, x)
    assert not _traces_fused_kernel(plain, x)


def test_training_step_matches_keras_batchnorm():
    """Outputs, the gradients (input, scale, offset) and the moving mean / biased variance all agree."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, size=(8, 16, 16, 12)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(8, 16, 16, 12)).astype(np.float32))
    plain, fused = _layers(12)
    for want, got in zip(_train_call(plain, x, upstream), _train_call(fused, x, upstream)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    np.testing.assert_allclose(fused.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-5)
    assert not np.allclose(fused.moving_variance.numpy(), 1.0)  # the statistics did move
    np.testing.assert_allclose(fused(x, training=False).numpy(), plain(x, training=False).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_what_the_kernel_cannot_fuse_runs_keras_code():
    """A 2-D input is not NHWC: the layer falls back to Keras' own training step, with the same result."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(2).normal(size=(32, 5)).astype(np.float32))
    plain, fused = _layers(5, ndim=2)
    assert not _traces_fused_kernel(fused, x)
    np.testing.assert_array_equal(fused(x, training=True).numpy(), plain(x, training=True).numpy())
    np.testing.assert_array_equal(fused.moving_variance.numpy(), plain.moving_variance.numpy())


def test_fused_network_has_the_plain_twins_weights():
    """The trained network's weights load into the served (plain) model, which then predicts the same."""
    import keras

    from training.model import build_model, served_twin

    fused = build_model(2, 32, 32, width=4, depth=3, seed=5, fused_batchnorm=True)
    names = {type(layer).__name__ for layer in fused.layers}
    assert "FusedBatchNormalization" in names and "BatchNormalization" not in names
    images = np.random.default_rng(3).uniform(0, 255, size=(16, 32, 32, 3)).astype(np.float32)
    fused.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy())
    fused.fit(images, (images.mean(axis=(1, 2, 3)) > 127).astype(np.int32), epochs=1, batch_size=8, verbose=0)
    served = served_twin(fused, 2, 32, 32, width=4, depth=3)
    assert {type(layer).__name__ for layer in served.layers} >= {"BatchNormalization"}
    assert "FusedBatchNormalization" not in {type(layer).__name__ for layer in served.layers}
    np.testing.assert_allclose(served.predict(images, verbose=0), fused.predict(images, verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_lever_key_unchanged_when_the_kernel_is_plain():
    """Saved k-fold logits of earlier levers keep their keys; the fused lever gets its own."""
    from training.experiment import Lever, lever_key

    assert lever_key("leukemia", "center_crop", Lever()) == lever_key("leukemia", "center_crop",
                                                                      Lever(fused_batchnorm=False))
    assert lever_key("leukemia", "center_crop", Lever(fused_batchnorm=True)) != lever_key("leukemia", "center_crop",
                                                                                          Lever())
