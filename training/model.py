"""The CNN: a small from-scratch network whose head makes Grad-CAM free at serving time.

Architecture (no pretrained weights can be downloaded here):

    image [S, S, 3] float 0..255  (exactly what `contracts.imaging.prepare_image` returns)
      -> Rescaling(1/255) -> Resizing(TRAIN_INPUT_SIZE)       normalisation lives IN the model
      -> optional per-image stain normalisation "stain_norm" (MODEL_STAIN_NORMALISATION)
      -> MODEL_DEPTH conv blocks (3x3 conv, BatchNorm, ReLU; width doubles per block, capped;
         optionally depthwise-separable after the stem),
         every block but the last halves the resolution with max-pooling
      -> "features" A [h, w, K]  -> GlobalAveragePooling "pooled_features" [K] -> Dropout
      -> Dense(C) "logits" -> softmax "probabilities"

`pooled_features` is the named embedding an out-of-distribution detector can be fitted on
(`pooled_feature_model`); the training-data profile (drift, contracts.drift) samples it too.
Temperature scaling (training.calibration) is applied as a fixed division of the logits
(`with_temperature`), in the Keras model and in the exported graph, so thresholds, canaries and
served probabilities all use the calibrated probabilities.

Because the head is GAP -> Dense, the Grad-CAM weights of class c are the dense kernel's
column W[:, c] (divided by h*w), so `class_maps = einsum(A, W)` is Grad-CAM up to that constant.
The export graph returns it next to the probabilities, and serving needs no TensorFlow.

An ensemble (MODEL_ENSEMBLE_SIZE > 1, `assemble_ensemble`) keeps that head: its members' conv
towers run side by side, "features" is their concatenation and the Dense kernel stacks theirs / M,
so the served logits, Grad-CAM maps and pooled features are one graph's, as for one network.
"""

from __future__ import annotations

from typing import Any

from contracts.bundle import OUTPUT_CLASS_MAPS, OUTPUT_FEATURES, OUTPUT_PROBABILITIES

FEATURES_LAYER = "features"
POOLED_FEATURES_LAYER = "pooled_features"
TEMPERATURE_LAYER = "temperature"
LOGITS_LAYER = "logits"
PROBABILITIES_LAYER = "probabilities"
INPUT_NAME = "image"
MAX_FILTERS = 256
DROPOUT = 0.3
WEIGHT_DECAY = 1e-4
# BatchNorm's moving statistics follow the last few batches (Keras' default is 0.99): at 2e-3 the
# weights move fast, and statistics that lag them made validation (inference mode) collapse to
# one class between epochs while training accuracy rose smoothly. Leukemia validation, cosine
# schedule: momentum 0.99 / 0.9 / 0.5 -> val loss 0.244 / 0.120 / 0.116, accuracy 0.930 / 0.988 /
# 0.993, and the worst epoch's val accuracy 0.10 / 0.11 / 0.50 (benchmarks/levers.py bn99, bn50).
BN_MOMENTUM = 0.5
# Stain normalisation inside the network, so training and serving (TFLite) apply the same one:
# "per_image" standardises each channel of each image to mean 0, std 1 over its pixels (a
# Reinhard-style colour transfer to a fixed reference, in RGB; the first conv absorbs the
# reference). It removes a lab's global stain intensity and colour cast, not local colour.
# Epsilon 1e-4 (0..1 units): the blue channel's per-image std is ~0.05 on both built-in sets
# (variance 0.0025), so Keras' 1e-3 would leave it only part-normalised.
STAIN_EPSILON = 1e-4
STAIN_NONE = "none"
STAIN_PER_IMAGE = "per_image"
STAIN_NORMALISATIONS = (STAIN_NONE, STAIN_PER_IMAGE)
STAIN_LAYER = "stain_norm"
# Macenko's two-stain normalisation (training.stain): a lever build_model accepts, not a setting,
# because TFLite cannot export it yet.
STAIN_MACENKO = "macenko"
LEVER_STAIN_NORMALISATIONS = (*STAIN_NORMALISATIONS, STAIN_MACENKO)
MACENKO_LAYER = "stain_macenko"
# Convolutions of the blocks after the stem: "separable" is a depthwise 3x3 then a pointwise 1x1
# (MobileNet's), ~1/8 of the multiply-adds of a full 3x3 at the same width, so a wider network
# fits the same CPU budget. The stem stays a full conv (a depthwise conv of 3 channels sees no colour mix).
CONV_STANDARD = "standard"
CONV_SEPARABLE = "separable"
CONV_TYPES = (CONV_STANDARD, CONV_SEPARABLE)


def block_filters(width: int, depth: int) -> list[int]:
    """Filters per conv block: doubling from `width`, capped to keep the model CPU-sized."""
    return [min(width * 2**i, MAX_FILTERS) for i in range(depth)]


def stain_normalisation_layer(stain_normalisation: str) -> Any | None:
    """The weightless layer that normalises stain on 0..1 pixels (None for STAIN_NONE); also what
    benchmarks/stain_invariance.py applies, so it measures the network's own normalisation."""
    from keras import layers

    if stain_normalisation == STAIN_PER_IMAGE:  # statistics over height and width, per image and channel
        return layers.LayerNormalization(axis=[1, 2], center=False, scale=False, epsilon=STAIN_EPSILON,
                                         name=STAIN_LAYER)
    if stain_normalisation == STAIN_MACENKO:
        from training.stain import macenko_layer

        return macenko_layer(MACENKO_LAYER)
    return None


def build_model(
    num_classes: int,
    image_size: int,
    input_size: int,
    width: int,
    depth: int,
    seed: int = 1337,
    dropout: float = DROPOUT,
    bn_momentum: float = BN_MOMENTUM,
    stain_normalisation: str = STAIN_NONE,
    conv: str = CONV_STANDARD,
    fused_batchnorm: bool = False,
) -> Any:
    """Build the (uncompiled) Keras classifier; its output is the softmax probabilities.

    `fused_batchnorm`: train BatchNorm with TensorFlow's fused kernel (training.fused_batchnorm: the same
    function, faster to fit); for networks that are trained, not saved (the served twin is plain)."""
    import keras

    if stain_normalisation not in LEVER_STAIN_NORMALISATIONS:
        raise ValueError(f"stain_normalisation must be one of {LEVER_STAIN_NORMALISATIONS}, "
                         f"not {stain_normalisation!r}")
    if conv not in CONV_TYPES:
        raise ValueError(f"conv must be one of {CONV_TYPES}, not {conv!r}")

    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(WEIGHT_DECAY)
    inputs, x = _input_and_stain(image_size, input_size, stain_normalisation)
    x = _conv_tower(x, width, depth, conv, bn_momentum, reg, fused_batchnorm=fused_batchnorm)
    return keras.Model(inputs, _head(x, num_classes, reg, dropout, seed), name="hemaflow_cnn")


def _input_and_stain(image_size: int, input_size: int, stain_normalisation: str):
    """(input, tensor): 0..255 pixels rescaled to 0..1, resized to the network's side, stain-normalised."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if input_size != image_size:
        x = layers.Resizing(input_size, input_size, interpolation="bilinear", name="resize")(x)
    stain = stain_normalisation_layer(stain_normalisation)
    return inputs, (stain(x) if stain is not None else x)


def _conv_tower(x, width: int, depth: int, conv: str, bn_momentum: float, reg, prefix: str = "",
                fused_batchnorm: bool = False):
    """The conv blocks; the last ReLU is `prefix + FEATURES_LAYER`; every layer name starts with `prefix`."""
    from keras import layers

    batchnorm = layers.BatchNormalization
    if fused_batchnorm:
        from training.fused_batchnorm import FusedBatchNormalization as batchnorm
    filters = block_filters(width, depth)
    for i, f in enumerate(filters):
        last = i == len(filters) - 1
        # The first block is a single conv at full resolution (cheap stem); deeper blocks
        # stack two convs, where the resolution is small enough to afford them on a CPU.
        n_convs = 1 if i == 0 else 2
        for j in range(n_convs):
            name = f"{prefix}b{i}_conv{j}"
            if conv == CONV_SEPARABLE and i > 0:
                x = layers.SeparableConv2D(f, 3, padding="same", use_bias=False, depthwise_regularizer=reg,
                                           pointwise_regularizer=reg, name=name)(x)
            else:
                x = layers.Conv2D(f, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=name)(x)
            x = batchnorm(momentum=bn_momentum, name=f"{prefix}b{i}_bn{j}")(x)
            relu = FEATURES_LAYER if (last and j == n_convs - 1) else f"b{i}_relu{j}"
            x = layers.ReLU(name=prefix + relu)(x)
        if not last:
            x = layers.MaxPooling2D(2, name=f"{prefix}b{i}_pool")(x)
    return x


def _head(features, num_classes: int, reg, dropout: float, seed: int):
    """GAP "pooled_features" -> Dropout -> Dense "logits" -> softmax "probabilities"."""
    from keras import layers

    x = layers.GlobalAveragePooling2D(name=POOLED_FEATURES_LAYER)(features)
    if dropout > 0:
        x = layers.Dropout(dropout, seed=seed, name="dropout")(x)
    logits = layers.Dense(num_classes, kernel_regularizer=reg, name=LOGITS_LAYER)(x)
    return layers.Activation("softmax", dtype="float32", name=PROBABILITIES_LAYER)(logits)


def served_twin(trained: Any, num_classes: int, image_size: int, input_size: int, width: int, depth: int) -> Any:
    """The served model (input [image_size], Resizing inside) with the weights of `trained`.

    Training runs on a model whose input is already `input_size` (images resized once in
    tf.data, before the cache, with the same bilinear op as the Resizing layer), which keeps
    augmentation and decoding cheap on a small CPU. Resizing, Rescaling and the stain
    normalisation have no weights, so both models have the same weight list; the stain
    normalisation and the conv type are read from `trained`, so a twin cannot silently drop them.
    """
    stain, conv = _stain_and_conv(trained)
    served = build_model(num_classes, image_size, input_size, width, depth, stain_normalisation=stain, conv=conv)
    served.set_weights(trained.get_weights())
    return served


def _stain_and_conv(trained: Any) -> tuple[str, str]:
    """The stain normalisation and conv type a trained network was built with (read from its layers)."""
    from keras import layers

    names = {layer.name for layer in trained.layers}
    stain = STAIN_PER_IMAGE if STAIN_LAYER in names else STAIN_MACENKO if MACENKO_LAYER in names else STAIN_NONE
    separable = any(isinstance(layer, layers.SeparableConv2D) for layer in trained.layers)
    return stain, CONV_SEPARABLE if separable else CONV_STANDARD


def member_prefix(index: int) -> str:
    """Name prefix of ensemble member `index`'s layers in an assembled model."""
    return f"m{index}_"


def assemble_ensemble(members: list[Any], num_classes: int, image_size: int, input_size: int, width: int,
                      depth: int) -> Any:
    """One served model (input [image_size]) whose logits are the mean of the trained `members`' logits.

    The members' conv towers run side by side on the shared input and stain normalisation; their
    last features are concatenated into "features" [h, w, M*K], and the head is one Dense over the
    concatenated pooled features with kernel [W_1; ...; W_M] / M and bias mean(b_m). So the model
    keeps the single network's interface (pooled features for the out-of-scope detector, GAP ->
    Dense for Grad-CAM, one exported graph) and its Grad-CAM is the mean of the members'. One
    member: exactly `served_twin`.
    """
    import keras
    import numpy as np
    from keras import layers

    if len(members) == 1:
        return served_twin(members[0], num_classes, image_size, input_size, width, depth)
    stain, conv = _stain_and_conv(members[0])
    reg = keras.regularizers.L2(WEIGHT_DECAY)
    inputs, x = _input_and_stain(image_size, input_size, stain)
    towers = [_conv_tower(x, width, depth, conv, BN_MOMENTUM, reg, member_prefix(i)) for i in range(len(members))]
    features = layers.Concatenate(name=FEATURES_LAYER)(towers)
    served = keras.Model(inputs, _head(features, num_classes, reg, DROPOUT, 0), name="hemaflow_ensemble")
    for i, member in enumerate(members):
        for layer in member.layers:
            if layer.weights and layer.name != LOGITS_LAYER:
                served.get_layer(member_prefix(i) + layer.name).set_weights(layer.get_weights())
    kernels, biases = zip(*(head_weights(member) for member in members))
    served.get_layer(LOGITS_LAYER).set_weights([np.concatenate(kernels) / len(members), np.mean(biases, axis=0)])
    return served


def with_temperature(model: Any, temperature: float) -> Any:
    """The same network (shared layers and weights) whose probabilities are softmax(logits / T)."""
    import keras
    from keras import layers

    logits = model.get_layer(LOGITS_LAYER).output
    scaled = layers.Rescaling(1.0 / float(temperature), name=TEMPERATURE_LAYER)(logits)
    outputs = layers.Activation("softmax", dtype="float32", name=PROBABILITIES_LAYER)(scaled)
    return keras.Model(model.inputs, outputs, name=model.name)


def temperature_of(model: Any) -> float:
    """The temperature `with_temperature` applied (1.0 for an uncalibrated model)."""
    try:
        return 1.0 / float(model.get_layer(TEMPERATURE_LAYER).scale)
    except ValueError:
        return 1.0


def logits_model(model: Any) -> Any:
    """Sub-model: image -> pre-softmax logits [N, C] (what temperature scaling works on)."""
    import keras

    return keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output, name="hemaflow_logits")


def pooled_feature_model(model: Any) -> Any:
    """Sub-model: image -> pooled features [N, K] (the embedding for an OOD detector)."""
    import keras

    return keras.Model(model.inputs, model.get_layer(POOLED_FEATURES_LAYER).output, name="hemaflow_pooled")


def feature_model(model: Any) -> Any:
    """Sub-model: image -> last conv features A [N, h, w, K]."""
    import keras

    return keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output, name="hemaflow_features")


def head_weights(model: Any):
    """(W [K, C], b [C]) of the dense head, as numpy arrays."""
    kernel, bias = model.get_layer(LOGITS_LAYER).get_weights()
    return kernel, bias


def serving_function(model: Any, image_size: int):
    """(fn, input_signature) of the serving graph: image -> {probabilities, class_maps, features}.

    `features` are the pooled features [N, K] (the GAP output) the bundle's out-of-scope
    detector (contracts/ood.py) scores.

    The head is recomputed from the features with the trained dense weights, which is
    exactly the inference path of `model` (dropout is off at inference).
    """
    import tensorflow as tf

    feats_model = feature_model(model)
    dense = model.get_layer(LOGITS_LAYER)
    temperature = temperature_of(model)

    def serve(image):
        feats = tf.cast(feats_model(image, training=False), tf.float32)
        logits = tf.matmul(tf.reduce_mean(feats, axis=[1, 2]), dense.kernel) + dense.bias
        return {
            OUTPUT_PROBABILITIES: tf.nn.softmax(logits / temperature, axis=-1),
            OUTPUT_CLASS_MAPS: tf.einsum("nhwk,kc->nhwc", feats, dense.kernel),
            OUTPUT_FEATURES: tf.reduce_mean(feats, axis=[1, 2]),
        }

    return serve, [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=INPUT_NAME)]


def gradcam_keras(model: Any, images, class_index: int):
    """Reference Grad-CAM with tf.GradientTape (pre-ReLU, un-normalised): sum_k alpha_k A_k.

    alpha_k = mean over positions of d logit_c / d A_k. Used by tests to prove the exported
    `class_maps` equal Grad-CAM (class_maps / (h*w) == this).
    """
    import keras
    import tensorflow as tf

    grad_model = keras.Model(
        model.inputs, [model.get_layer(FEATURES_LAYER).output, model.get_layer(LOGITS_LAYER).output]
    )
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        feats, logits = grad_model(x, training=False)
        target = logits[:, class_index]
    grads = tape.gradient(target, feats)
    alpha = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
    return tf.reduce_sum(alpha * feats, axis=-1).numpy()
