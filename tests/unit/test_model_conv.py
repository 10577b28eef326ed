"""Depthwise-separable blocks (a benchmarks/levers.py lever): built, carried to the served twin, exported."""

from __future__ import annotations

import numpy as np
import pytest

from training.synthetic import synthetic_images


def test_separable_blocks_keep_a_full_stem_and_cost_fewer_weights():
    from keras import layers

    from training.model import build_model

    standard = build_model(2, 32, 32, width=8, depth=3, seed=3)
    separable = build_model(2, 32, 32, width=8, depth=3, seed=3, conv="separable")
    kinds = {layer.name: type(layer) for layer in separable.layers if layer.name.startswith("b")}
    assert kinds["b0_conv0"] is layers.Conv2D  # the stem mixes the colour channels
    assert kinds["b1_conv0"] is layers.SeparableConv2D and kinds["b2_conv1"] is layers.SeparableConv2D
    assert separable.count_params() < standard.count_params() / 3


def test_served_twin_keeps_separable_blocks_and_computes_the_same_function():
    import tensorflow as tf
    from keras import layers

    from training.model import build_model, served_twin

    net = build_model(3, 16, 16, width=4, depth=3, seed=3, conv="separable")
    served = served_twin(net, 3, 40, 16, width=4, depth=3)  # read from the trained network, not passed
    assert any(isinstance(layer, layers.SeparableConv2D) for layer in served.layers)
    images = synthetic_images([0, 1, 2, 0], 40, seed=2).astype(np.float32)
    resized = tf.image.resize(images, [16, 16], method="bilinear").numpy()
    assert np.max(np.abs(served.predict(images, verbose=0) - net.predict(resized, verbose=0))) <= 1e-5


def test_unknown_conv_type_is_a_clear_error():
    from training.model import build_model

    with pytest.raises(ValueError, match="conv must be one of"):
        build_model(2, 24, 24, width=4, depth=2, conv="dilated")
