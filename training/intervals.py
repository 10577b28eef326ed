"""95 % bootstrap intervals for the headline figures of one split (or pooled k-fold predictions).

A 401-image test split has a sampling error of about a percentage point on sensitivity: the
intervals say how much a figure could move on another sample of the same kind. Percentile
bootstrap over images (N_BOOT resamples, fixed seed); the decision threshold is kept fixed
(it was chosen on validation), so the intervals describe the test sample, not the threshold choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
BINARY_FIGURES = ("sensitivity", "specificity", "roc_auc", "balanced_accuracy", "accuracy")
MULTICLASS_FIGURES = ("accuracy", "macro_f1", "balanced_accuracy")


def roc_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half): sklearn's roc_auc_score to rounding and
    ~15x faster a call, which a bootstrap makes N_BOOT times (benchmarks/bootstrap_speed.py: the whole
    bootstrap 4.9x). NaN unless both classes are present."""
    from scipy.stats import rankdata

    is_pos = np.asarray(is_pos, bool)
    n_pos = int(is_pos.sum())
    n_neg = len(is_pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _figures(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, labels: list[str], pos: int | None) -> dict:
    from sklearn.metrics import f1_score

    n_classes = len(labels)
    recall = [float(np.mean(pred[y == c] == c)) if np.any(y == c) else np.nan for c in range(n_classes)]
    out = {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.nanmean(recall))}
    if pos is not None:
        out["sensitivity"], out["specificity"] = recall[pos], recall[1 - pos]
        out["roc_auc"] = roc_auc(y == pos, probs[:, pos])
    else:
        out["macro_f1"] = float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))
    return out


def bootstrap_intervals(y: np.ndarray, probs: np.ndarray, labels: list[str], positive_label: str | None = None,
                        threshold: float | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """{figure: {"value", "low", "high"}} with percentile intervals at LEVEL."""
    from training.evaluate import predict_labels

    y, probs = np.asarray(y, np.int64), np.asarray(probs, np.float64)
    pred = predict_labels(probs, labels, positive_label, threshold)
    pos = labels.index(positive_label) if positive_label in labels and len(labels) == 2 else None
    point = _figures(y, pred, probs, labels, pos)
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in point}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        for k, v in _figures(y[i], pred[i], probs[i], labels, pos).items():
            samples[k].append(v)
    alpha = (1 - LEVEL) / 2
    out = {}
    for k, v in point.items():
        arr = np.asarray(samples[k], np.float64)
        arr = arr[np.isfinite(arr)]
        low, high = (np.quantile(arr, [alpha, 1 - alpha]) if arr.size else (np.nan, np.nan))
        out[k] = {"value": float(v), "low": float(low), "high": float(high)}
    return out


def format_intervals(intervals: dict[str, Any], figures: tuple[str, ...]) -> str:
    return "  ".join(f"{k}={intervals[k]['value']:.4f} [{intervals[k]['low']:.4f}, {intervals[k]['high']:.4f}]"
                     for k in figures if k in intervals)
