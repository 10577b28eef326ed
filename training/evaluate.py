"""Honest evaluation: metrics on a held-out split, threshold choice on validation, plots.

Binary tasks decide "positive" when P(positive) >= threshold; the threshold is chosen on
the VALIDATION split by THRESHOLD_RULE (`choose_threshold`), and the test split only
measures it. Multiclass tasks use argmax. AUCs are one-vs-rest macro averages for
multiclass. Calibration: Brier score (mean squared error of the probability vector) and ECE
(15 equal-width bins of the top probability).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.conformal import lower_conformal_rank

ECE_BINS = 15
THRESHOLD_VALIDATION = "validation"
THRESHOLD_CONFORMAL = "conformal"
THRESHOLD_QUANTILE = "quantile"
THRESHOLD_RULES = (THRESHOLD_VALIDATION, THRESHOLD_CONFORMAL, THRESHOLD_QUANTILE)  # contracts.settings.ThresholdRule


def choose_threshold(is_positive: np.ndarray, p_positive: np.ndarray, target_sensitivity: float,
                     rule: str = THRESHOLD_VALIDATION) -> float:
    """The threshold on P(positive) for the target sensitivity, from the given (validation) data.

    validation: the highest t whose sensitivity on these data reaches the target. It lets
    floor((1 - target) n) of the n positives fall below t, so an unseen positive falls below it
    with probability (that + 1) / (n + 1): above 1 - target (0.99 with n = 250 gives ~0.988).
    conformal: the j-th lowest positive score with j = floor((1 - target)(n + 1)), so an unseen
    exchangeable positive falls below it with probability j / (n + 1) <= 1 - target (split-conformal,
    as training.ood). When n is too small for that (j = 0) it is the lowest positive score.
    quantile: the (1 - target)(n + 1)-th lowest positive score, interpolated in logit space between the
    two around it, so an unseen positive falls below it with probability ~(1 - target): aimed at the
    target itself, between the other two (README, "Model quality"); too few positives: the lowest."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, not {rule!r}")
    scores = np.sort(np.asarray(p_positive, dtype=np.float64)[np.asarray(is_positive, bool)])
    if scores.size == 0:
        return 0.5
    below = lower_conformal_rank(scores.size, 1.0 - target_sensitivity)  # the rank-based rules' lower rank
    if rule == THRESHOLD_CONFORMAL:
        return float(scores[max(below, 1) - 1])
    if rule == THRESHOLD_QUANTILE:
        return _interpolated_rank(scores, below, (1.0 - target_sensitivity) * (scores.size + 1) - below)
    k = max(1, math.ceil(target_sensitivity * scores.size - 1e-9))  # positives kept at or above t
    return float(scores[scores.size - k])


def _interpolated_rank(scores: np.ndarray, below: int, fraction: float) -> float:
    """The sorted probabilities' score `fraction` of the way from the `below`-th lowest (1-based) to the
    next, in logit space (probabilities near 0 or 1 stay apart); below 1: the lowest."""
    if below < 1:
        return float(scores[0])
    pair = np.clip(scores[[below - 1, min(below, scores.size - 1)]], 1e-12, 1 - 1e-12)
    lo, hi = np.log(pair) - np.log1p(-pair)
    return float(1.0 / (1.0 + math.exp(-(lo + max(fraction, 0.0) * (hi - lo)))))


def conformal_guarantee_holds(positives: int, target_sensitivity: float) -> bool:
    """Whether `positives` validation positives are enough for the conformal rule's promise
    (at least 1 / (1 - target) - 1 of them: 99 for 0.99)."""
    return lower_conformal_rank(positives, 1.0 - target_sensitivity) >= 1


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def predict_labels(probs: np.ndarray, labels: list[str], positive_label: str | None, threshold: float | None):
    if positive_label is not None and threshold is not None and len(labels) == 2:
        pos = labels.index(positive_label)
        return np.where(probs[:, pos] >= threshold, pos, 1 - pos)
    return probs.argmax(axis=1)


def _safe(fn, *args, **kwargs) -> float | None:
    try:
        value = float(fn(*args, **kwargs))
    except ValueError:  # e.g. a class absent from y_true
        return None
    return None if math.isnan(value) else value


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    positive_label: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """All figures for one split; flat scalars plus `per_class` and `confusion_matrix`."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(labels)
    y_pred = predict_labels(probs, labels, positive_label, threshold)
    idx = list(range(n_classes))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=idx, zero_division=0
    )
    onehot = np.eye(n_classes)[y_true]
    out: dict[str, Any] = {
        "n": int(y_true.size),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean([r for r, s in zip(recall, support) if s > 0])) if y_true.size else 0.0,
        "macro_f1": float(np.mean(f1)),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error(y_true, probs),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=idx).tolist(),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
    }
    if n_classes == 2:
        pos = labels.index(positive_label) if positive_label in labels else 1
        is_pos = (y_true == pos).astype(int)
        out["roc_auc"] = _safe(skm.roc_auc_score, is_pos, probs[:, pos])
        out["pr_auc"] = _safe(skm.average_precision_score, is_pos, probs[:, pos])
        if positive_label is not None:
            out["sensitivity"] = float(recall[pos])
            out["specificity"] = float(recall[1 - pos])
            out["threshold"] = float(threshold) if threshold is not None else 0.5
    else:
        out["roc_auc"] = _safe(skm.roc_auc_score, onehot, probs, average="macro", multi_class="ovr")
        out["pr_auc"] = _safe(skm.average_precision_score, onehot, probs, average="macro")
    return out


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The flat numeric figures (for MLflow metrics and tags)."""
    flat = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    for label, row in metrics.get("per_class", {}).items():
        for key in ("precision", "recall", "f1"):
            flat[f"{prefix}{key}_{label}"] = float(row[key])
    return flat


def classification_report(metrics: dict[str, Any], labels: list[str]) -> str:
    lines = [f"{'label':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label in labels:
        row = metrics["per_class"][label]
        lines.append(f"{label:<16}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9d}")
    lines.append("")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc", "sensitivity", "specificity",
                "threshold", "brier", "ece"):
        if metrics.get(key) is not None:
            lines.append(f"{key:<20}{metrics[key]:.4f}")
    cm = metrics["confusion_matrix"]
    lines += ["", "confusion matrix (rows = true, columns = predicted): " + ", ".join(labels)]
    lines += ["  " + " ".join(f"{v:>6d}" for v in row) for row in cm]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(metrics: dict[str, Any], labels: list[str], path: Path) -> Path:
    plt = _figure()
    cm = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.7 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(y_true: np.ndarray, probs: np.ndarray, labels: list[str], positive_label: str | None, path: Path) -> Path:
    from sklearn.metrics import roc_curve

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [labels.index(positive_label)] if positive_label in labels else range(len(labels))
    for c in targets:
        is_c = (np.asarray(y_true) == c).astype(int)
        if 0 < is_c.sum() < is_c.size:
            fpr, tpr, _ = roc_curve(is_c, probs[:, c])
            ax.plot(fpr, tpr, label=labels[c])
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(y_true: np.ndarray, probs: np.ndarray, path: Path, bins: int = ECE_BINS) -> Path:
    plt = _figure()
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, bins + 1)
    centres, accs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            centres.append(confidence[m].mean())
            accs.append(correct[m].mean())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.plot(centres, accs, "o-", label="model")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Calibration (test)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(history: dict[str, list[float]], path: Path) -> Path:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", axes[0]), ("accuracy", axes[1])):
        for name in (key, f"val_{key}"):
            if history.get(name):
                ax.plot(range(1, len(history[name]) + 1), history[name], label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
