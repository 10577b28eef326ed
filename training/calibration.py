"""Temperature scaling: make `confidence` mean what it says.

One scalar T > 0 divides the logits before the softmax; it is fitted on the VALIDATION
split by minimising the negative log-likelihood (a 1-D bounded search over log T), so it
never changes which class is the argmax, only how confident the probabilities are. The
fitted T travels in the bundle (`bundle.json` -> `calibration.temperature`) and serving
divides the logits by it. Pure NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels at temperature T."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), np.asarray(y, np.int64)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """T minimising validation NLL; 1.0 when there is nothing to fit on."""
    from scipy.optimize import minimize_scalar

    logits, y = np.asarray(logits, np.float64), np.asarray(y, np.int64)
    if logits.ndim != 2 or len(y) == 0 or len(y) != len(logits):
        return 1.0
    found = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(found.x))
    return t if nll(logits, y, t) <= nll(logits, y, 1.0) else 1.0


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """log p: logits up to a per-row constant (softmax-equivalent), for models that export probabilities."""
    return np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))


def logits_of(model, images: np.ndarray) -> np.ndarray:
    """Pre-softmax logits of `images` (float64)."""
    from training.model import logits_model

    return np.asarray(logits_model(model).predict(images.astype(np.float32), batch_size=64, verbose=0), np.float64)


def calibrate(model, val_x: np.ndarray, val_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray):
    """Fit T on validation logits; returns (the model with T applied, the bundle's `calibration` record).

    ECE before/after is reported on validation (where T was fitted) and on test (measured only)."""
    from training.evaluate import expected_calibration_error
    from training.model import with_temperature

    val_z, test_z = logits_of(model, val_x), logits_of(model, test_x)
    t = fit_temperature(val_z, val_y)
    record = {"method": "temperature", "temperature": t, "fitted_on": "validation", "applied_in_model": True}
    for split, z, y in (("val", val_z, val_y), ("test", test_z, test_y)):
        if len(y):
            record[f"{split}_ece_before"] = expected_calibration_error(y, softmax(z))
            record[f"{split}_ece_after"] = expected_calibration_error(y, softmax(z, t))
    return with_temperature(model, t), record
