"""Weight averaging: an exponential moving average (EMA) of the model's weights during a fit.

The average is updated after every training batch (trainable weights and BatchNorm statistics,
every floating-point model weight, as timm's ModelEmaV2 does) and swapped in for each epoch's
validation, so early stopping watches, keeps and restores the averaged weights; training itself
goes on from the raw weights (swapped back at the next epoch). The network that comes out is an
ordinary one: same layers, same serving cost. A lever (benchmarks/levers.py `ema`), measured on
content-hash folds before any default uses it.
"""

from __future__ import annotations

from typing import Any

# Keras' own default `ema_momentum` for its optimisers; not tuned here.
EMA_MOMENTUM = 0.99
EMA_OFF = 0.0


def check_momentum(momentum: float) -> float:
    """0 turns averaging off; otherwise the weight of the old average in each update, in (0, 1)."""
    if momentum != EMA_OFF and not 0.0 < momentum < 1.0:
        raise ValueError(f"EMA momentum must be 0 (off) or in (0, 1), not {momentum}")
    return momentum


def weight_average_callback(momentum: float = EMA_MOMENTUM) -> Any:
    """A Keras callback keeping the EMA of the model's floating-point weights (see the module doc).

    Put it first in the callback list: its on_test_begin then swaps the average in before any other
    callback reads the epoch's validation figures or keeps its weights."""
    import keras

    check_momentum(momentum)

    class WeightAverage(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._weights = [w for w in self.model.weights if "float" in str(w.dtype)]
            # A copy: a Keras Variable made from another's `value` would share its storage.
            self._average = [keras.Variable(keras.ops.copy(w.value), trainable=False, name=f"ema_{i}")
                             for i, w in enumerate(self._weights)]
            self._raw: list[Any] | None = None  # the raw weights while the average is swapped in
            self._training = True

        def on_train_batch_end(self, batch, logs=None):
            for average, weight in zip(self._average, self._weights):
                average.assign(average * momentum + weight.value * (1.0 - momentum))

        def on_test_begin(self, logs=None):
            if self._training and self._raw is None:
                self._raw = [keras.ops.copy(w.value) for w in self._weights]
                for weight, average in zip(self._weights, self._average):
                    weight.assign(average.value)

        def on_epoch_begin(self, epoch, logs=None):
            if self._raw is not None:
                for weight, raw in zip(self._weights, self._raw):
                    weight.assign(raw)
                self._raw = None

        def on_train_end(self, logs=None):
            """Without validation the average was never swapped in: it is the fit's result all the same."""
            if self._raw is None:
                for weight, average in zip(self._weights, self._average):
                    weight.assign(average.value)
            self._raw, self._training = None, False

    return WeightAverage()
