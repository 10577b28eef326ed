"""BatchNorm's training step as TensorFlow's fused kernel: the same function as Keras' layer, fitted faster.

Keras 3's BatchNormalization trains with separate ops (the batch moments, then the normalisation)
and autodiff differentiates each: several passes over every activation, memory-bound on a small
CPU. TensorFlow's FusedBatchNormV3 (oneDNN on x86) computes the forward pass and its gradient in
one kernel each. Same batch statistics, same moving-average update (biased variance, as Keras),
same gradient; only the rounding differs. Inference (`training=False`) is Keras' own code, so the
served model (plain BatchNormalization with these weights, training.model.served_twin) computes
what the trained network was validated with.

Training networks only: nothing saves a model containing this layer (the served twin and the
ensemble are rebuilt from plain layers), so it needs no Keras serialisation.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training-mode call is one FusedBatchNormV3 (NHWC, last axis)."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or not self._fusable(inputs):
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel returns the batch variance with Bessel's correction; Keras' moving average uses the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), unbiased_variance.dtype)
        variance = unbiased_variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs

    def _fusable(self, inputs) -> bool:
        """Only what the fused kernel computes the same way: 4-D float32, channels last, scale and centre, no renorm."""
        return (len(inputs.shape) == 4 and self.axis in (-1, 3) and self.scale and self.center
                and not self.renorm and not self.synchronized and inputs.dtype == tf.float32
                and self.epsilon >= 1.001e-5)
