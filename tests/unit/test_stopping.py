"""Stop reason: epochs, early stopping on validation, or the wall-clock safety stop; and determinism."""

from __future__ import annotations

import numpy as np

from training.stopping import EARLY_STOPPING, EPOCHS, TIME_BUDGET, enable_determinism, reproducible_callbacks, stop_reason


def _fit(epochs: int, patience: int, budget_s: float, learning_rate: float = 1e-2, seed: int = 3,
         start_epoch: int = 0, weights_per_epoch: list | None = None):
    import keras

    from training.model import build_model
    from training.synthetic import synthetic_images

    enable_determinism(seed)
    y = np.array([i % 2 for i in range(64)])
    x = synthetic_images(list(y), 24, seed=seed).astype(np.float32)
    model = build_model(2, 24, 24, width=4, depth=2, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    callbacks, stops = reproducible_callbacks(patience, budget_s, start_epoch)
    if weights_per_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: weights_per_epoch.append(model.get_weights())))
    history = model.fit(x[:48], y[:48], validation_data=(x[48:], y[48:]), epochs=epochs, batch_size=16,
                        callbacks=callbacks, verbose=0, shuffle=False).history
    return model, history, stop_reason(stops, len(history["loss"]), epochs), x, stops


def test_all_epochs_run_is_epochs():
    _, history, reason, _, _ = _fit(epochs=2, patience=50, budget_s=1e9)
    assert len(history["loss"]) == 2 and reason == EPOCHS


def test_no_validation_improvement_is_early_stopping():
    # A learning rate of ~0 cannot improve val_loss after epoch 1: patience 1 stops at epoch 2.
    _, history, reason, _, _ = _fit(epochs=10, patience=1, budget_s=1e9, learning_rate=1e-12)
    assert len(history["loss"]) < 10 and reason == EARLY_STOPPING


def test_budget_exceeded_is_time_budget():
    _, history, reason, _, _ = _fit(epochs=10, patience=50, budget_s=1e-6)
    assert len(history["loss"]) == 1 and reason == TIME_BUDGET


def test_budget_after_the_last_epoch_is_epochs():
    # The run ended because EPOCHS were done; the budget's forecast for a next epoch does not matter.
    _, history, reason, _, _ = _fit(epochs=1, patience=50, budget_s=1e-6)
    assert len(history["loss"]) == 1 and reason == EPOCHS


def test_same_seed_same_model():
    a, ha, _, x, _ = _fit(epochs=2, patience=50, budget_s=1e9)
    b, hb, _, _, _ = _fit(epochs=2, patience=50, budget_s=1e9)
    assert ha["val_loss"] == hb["val_loss"]
    assert all(np.array_equal(wa, wb) for wa, wb in zip(a.get_weights(), b.get_weights()))


def test_early_stopping_cannot_stop_in_the_warm_up():
    # The same fit that stops after 2 epochs without a warm-up (above) runs at least
    # start_epoch + patience + 1 epochs with one: warm-up epochs count no patience.
    _, history, reason, _, stops = _fit(epochs=12, patience=1, budget_s=1e9, learning_rate=1e-12, start_epoch=5)
    assert len(history["loss"]) >= 5 + 1 + 1
    assert stops.early.best_epoch >= 5


def test_restored_weights_come_from_after_the_warm_up():
    # Without a warm-up early stopping restores the weights of the epoch with the lowest validation
    # loss; with a warm-up that starts just after that epoch, it restores the best epoch's weights
    # from start_epoch on, never the (better) one inside the warm-up.
    _, history0, _, _, stops0 = _fit(epochs=8, patience=50, budget_s=1e9, learning_rate=0.05)
    best0 = stops0.early.best_epoch
    assert history0["val_loss"][best0] == min(history0["val_loss"])
    assert best0 < 7, "the fixture needs its best epoch before the last one"
    start = best0 + 1
    seen: list = []
    model, history, _, _, stops = _fit(epochs=8, patience=50, budget_s=1e9, learning_rate=0.05, start_epoch=start,
                                       weights_per_epoch=seen)
    assert history["val_loss"] == history0["val_loss"]  # the same fit: only what is restored differs
    best = stops.early.best_epoch
    assert best >= start and history["val_loss"][best] == min(history["val_loss"][start:])
    assert history["val_loss"][best] > history["val_loss"][best0]
    assert all(np.array_equal(w, b) for w, b in zip(model.get_weights(), seen[best]))
