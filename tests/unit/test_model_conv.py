"""Depthwise-separable blocks (a benchmarks/levers.py lever); the served twin keeps them: test_training_bundle."""

from __future__ import annotations

import pytest


def test_separable_blocks_keep_a_full_stem_and_cost_fewer_weights():
    from keras import layers

    from training.model import build_model

    standard = build_model(2, 32, 32, width=8, depth=3, seed=3)
    separable = build_model(2, 32, 32, width=8, depth=3, seed=3, conv="separable")
    kinds = {layer.name: type(layer) for layer in separable.layers if layer.name.startswith("b")}
    assert kinds["b0_conv0"] is layers.Conv2D  # the stem mixes the colour channels
    assert kinds["b1_conv0"] is layers.SeparableConv2D and kinds["b2_conv1"] is layers.SeparableConv2D
    assert separable.count_params() < standard.count_params() / 3


def test_unknown_conv_type_is_a_clear_error():
    from training.model import build_model

    with pytest.raises(ValueError, match="conv must be one of"):
        build_model(2, 24, 24, width=4, depth=2, conv="dilated")
